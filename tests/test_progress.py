"""Progress: one mechanism (moeprune.progress) for every long stage, inside the live view or alone."""

from __future__ import annotations

import io
import re
from pathlib import Path

from rich.console import Console

from moeprune import progress

SRC = Path(__file__).resolve().parents[1] / "src" / "moeprune"


def test_only_moeprune_progress_draws_progress_bars():
    importers = sorted(str(path.relative_to(SRC)) for path in SRC.rglob("*.py")
                       if re.search(r"^\s*from rich\.progress import|^\s*import rich\.progress",
                                    path.read_text(encoding="utf-8"), re.MULTILINE))
    assert importers == ["progress.py"]


def test_the_long_stages_use_it():
    for stage in ("profile/stage.py", "kld/stage.py"):
        assert re.search(r"^from moeprune\.progress import", (SRC / stage).read_text(encoding="utf-8"),
                         re.MULTILINE), stage


def test_a_phase_goes_into_the_live_view_when_there_is_one(monkeypatch):
    monkeypatch.setattr(progress, "console", Console(file=io.StringIO(), force_terminal=False))
    bars = progress.new_progress()
    with progress.using(bars):
        with progress.phase("phase 2: replay (tokens)", 10) as advance:
            advance(3)
            advance(4)
            assert [(task.description, task.completed, task.total) for task in bars.tasks] == [
                ("phase 2: replay (tokens)", 7, 10)]
        assert bars.tasks == []  # the bar leaves with its stage
        assert list(progress.track(["a", "b"], description="kld")) == ["a", "b"]
        assert bars.tasks == []


def test_a_phase_alone_draws_its_own_bar_on_stderr_and_disabled_draws_nothing(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=False, width=100))
    with progress.phase("phase 1: generate", 2, enabled=False) as advance:
        advance(2)
    assert screen.getvalue() == ""
    with progress.phase("phase 1: generate", 2) as advance:
        advance(2)
    assert "phase 1: generate" in screen.getvalue() and "2/2" in screen.getvalue()
