"""``invoke audit``: check a pruned MoE that moeprune may not have made.

Reads the seed's layout (``expert_drop_metadata.json`` + ``gpqa_results/`` + README card) and
moeprune's own (through ``invoke verify``'s checks: one engine). See :mod:`moeprune.audit.engine`.
"""

from __future__ import annotations

from moeprune.audit.engine import audit, audit_directory
from moeprune.audit.report import AuditReport, print_report, write_report_json
from moeprune.audit.seed import AuditError

__all__ = ["AuditError", "AuditReport", "audit", "audit_directory", "print_report", "write_report_json"]
