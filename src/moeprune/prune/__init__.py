"""Expert pruning: streaming checkpoint surgery and its verification.

- :mod:`moeprune.prune.surgery`: :func:`prune_checkpoint` / :func:`run_prune` (the ``invoke prune`` stage).
- :mod:`moeprune.prune.verify`: :func:`verify_prune` (the ``invoke verify-prune`` check).
"""

from __future__ import annotations

from moeprune.prune.surgery import PruneError, prune_checkpoint, run_prune
from moeprune.prune.verify import PruneVerifyReport, verify_prune

__all__ = ["PruneError", "PruneVerifyReport", "prune_checkpoint", "run_prune", "verify_prune"]
