"""The live view of `invoke reproduce` and its final summary table."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from moeprune import progress as progress_bars
from moeprune.pipeline.graph import PipelineListener, StageResult

STATUS_STYLE = {
    "pending": "dim",
    "running": "bold yellow",
    "ran": "green",
    "skipped": "cyan",
    "not selected": "dim",
    "failed": "bold red",
    "not run": "dim",
}


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_headline(headline: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_format_value(value)}" for key, value in headline.items())


class LiveView(PipelineListener):
    """Stage table (done / skipped / running / pending) above the running stage's own bars."""

    def __init__(self, stage_names: Sequence[str], descriptions: dict[str, str]) -> None:
        self.names = list(stage_names)
        self.descriptions = descriptions
        self.status = {name: "pending" for name in self.names}
        self.detail: dict[str, str] = {}
        self.started_at: dict[str, float] = {}
        self.duration_s: dict[str, float] = {}
        self.bars = progress_bars.new_progress()
        self.console = progress_bars.console
        self._live: Live | None = None

    def _table(self) -> Table:
        table = Table(title="moeprune reproduce", expand=False)
        table.add_column("stage")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("detail", overflow="fold")
        for name in self.names:
            status = self.status[name]
            if status == "running":
                seconds = time.monotonic() - self.started_at[name]
            else:
                seconds = self.duration_s.get(name)
            shown = f"{seconds:.1f} s" if seconds is not None else ""
            table.add_row(name, f"[{STATUS_STYLE[status]}]{status}[/]", shown, self.detail.get(name, ""))
        return table

    def _render(self) -> Group:
        return Group(self._table(), self.bars)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    @contextmanager
    def showing(self) -> Iterator[None]:
        with Live(self._render(), console=self.console, refresh_per_second=4, transient=False,
                  get_renderable=self._render) as live:
            self._live = live
            with progress_bars.using(self.bars):
                try:
                    yield
                finally:
                    self._live = None

    def stage_started(self, name: str, reason: str) -> None:
        self.status[name] = "running"
        self.started_at[name] = time.monotonic()
        self.detail[name] = reason
        if not self.console.is_terminal:
            self.console.print(f"[{name}] running ({reason})", markup=False, highlight=False)
        self._refresh()

    def stage_finished(self, result: StageResult) -> None:
        self.status[result.name] = result.status
        if result.status in ("ran", "failed"):
            self.duration_s[result.name] = result.duration_s
        self.detail[result.name] = format_headline(result.headline) or (
            result.reason if result.status == "failed" else "")
        if not self.console.is_terminal:
            self.console.print(f"[{result.name}] {result.status} {self.detail[result.name]}", markup=False,
                               highlight=False)
        self._refresh()


def summary_table(results: Sequence[StageResult]) -> Table:
    """Final table: each stage's status, its time this run, and its headline numbers."""
    table = Table(title="summary")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time", justify="right")
    table.add_column("headline numbers", overflow="fold")
    total_s = 0.0
    for result in results:
        total_s += result.duration_s
        shown = f"{result.duration_s:.1f} s" if result.status in ("ran", "failed") else ""
        detail = f"[red]{escape(result.error)}[/]" if result.error else format_headline(result.headline)
        table.add_row(result.name, f"[{STATUS_STYLE[result.status]}]{result.status}[/]", shown, detail)
    table.add_row("total", "", f"{total_s:.1f} s", "")
    return table
