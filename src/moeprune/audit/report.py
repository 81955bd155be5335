"""The audit's table of checks: one row per check, printed as a table and written as JSON.

A row is ``pass``, ``fail`` or ``not checked``. "not checked" is never a pass: it says what the
audit could not check (a claim it could not parse, a check that needs ``--base`` or
``--reprofile``) and never makes the audit fail either. Any ``fail`` makes ``invoke audit`` exit 1;
its detail names the file, the number and both values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AUDIT_FORMAT_VERSION = 1
PASS, FAIL, NOT_CHECKED = "pass", "fail", "not checked"
SECTIONS = {
    "a": "drop metadata vs config.json and tensor shapes",
    "b": "bit-exact against the base",
    "c": "eval numbers recomputed from the sample logs",
    "d": "card claims",
    "e": "re-profile with the claimed method",
    "verify": "moeprune artifact checks (invoke verify)",
}


@dataclass
class AuditRow:
    section: str
    check: str
    target: str
    status: str
    claimed: Any = None
    recomputed: Any = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "check": self.check,
            "target": self.target,
            "status": self.status,
            "claimed": _plain(self.claimed),
            "recomputed": _plain(self.recomputed),
            "detail": self.detail,
        }


@dataclass
class AuditReport:
    subject: str
    layout: str  # "seed" or "moeprune"
    rows: list[AuditRow] = field(default_factory=list)

    def add(self, section: str, check: str, target: str, status: str, claimed: Any = None,
            recomputed: Any = None, detail: str = "") -> AuditRow:
        row = AuditRow(section, check, target, status, claimed, recomputed, detail)
        self.rows.append(row)
        return row

    def passed(self, section: str, check: str, target: str, detail: str = "", **values: Any) -> AuditRow:
        return self.add(section, check, target, PASS, detail=detail, **values)

    def failed(self, section: str, check: str, target: str, detail: str, **values: Any) -> AuditRow:
        return self.add(section, check, target, FAIL, detail=detail, **values)

    def not_checked(self, section: str, check: str, target: str, detail: str, **values: Any) -> AuditRow:
        return self.add(section, check, target, NOT_CHECKED, detail=detail, **values)

    def compare(self, section: str, check: str, target: str, claimed: Any, recomputed: Any, matches: bool,
                detail: str = "") -> AuditRow:
        """A pass when ``matches``, else a fail whose detail names the target and both values."""
        if matches:
            return self.passed(section, check, target, detail, claimed=claimed, recomputed=recomputed)
        message = f"{target}: {check}: claimed {claimed!r}, recomputed {recomputed!r}" + (f" ({detail})" if detail else "")
        return self.failed(section, check, target, message, claimed=claimed, recomputed=recomputed)

    @property
    def ok(self) -> bool:
        return not any(row.status == FAIL for row in self.rows)

    def counts(self) -> dict[str, int]:
        return {status: sum(1 for row in self.rows if row.status == status) for status in (PASS, FAIL, NOT_CHECKED)}

    def as_dict(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "format_version": AUDIT_FORMAT_VERSION,
            "subject": self.subject,
            "layout": self.layout,
            "ok": self.ok,
            "counts": {"pass": counts[PASS], "fail": counts[FAIL], "not_checked": counts[NOT_CHECKED]},
            "checks": [row.as_dict() for row in self.rows],
        }


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def write_report_json(report: AuditReport, path: Path) -> dict[str, Any]:
    """Validate the report against schemas/audit.schema.json and write it atomically."""
    from moeprune.atomic import write_json
    from moeprune.schemas import validate

    data = report.as_dict()
    validate("audit", data, source=path)
    write_json(Path(path), data)
    return data


def print_report(report: AuditReport) -> None:
    """The checks as a rich table, then a one-line verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"audit {report.subject} ({report.layout} layout)", show_lines=False)
    for column in ("", "check", "target", "result", "claimed", "recomputed", "detail"):
        table.add_column(column, overflow="fold")
    style = {PASS: "[green]pass[/green]", FAIL: "[red]FAIL[/red]", NOT_CHECKED: "[yellow]not checked[/yellow]"}
    for row in report.rows:
        shown = [("" if v is None else str(v)) for v in (row.claimed, row.recomputed)]
        table.add_row(row.section, row.check, row.target, style[row.status], *shown, row.detail)
    console.print(table)
    counts = report.counts()
    verdict = "[green]audit passed[/green]" if report.ok else "[red]audit FAILED[/red]"
    console.print(f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[NOT_CHECKED]} not checked")
