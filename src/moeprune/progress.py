"""Progress bars shared by every stage.

Stages call :func:`track` around their main loop. Run alone, a stage gets its own rich progress
bar with an ETA; under `invoke reproduce` the bar appears inside the pipeline's live view, under
the stage table. Output goes to stderr, so stdout stays clean for results.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

console = Console(stderr=True)
_active: Progress | None = None


def new_progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


@contextlib.contextmanager
def using(progress: Progress) -> Iterator[None]:
    """Route :func:`track` bars into ``progress`` (the pipeline's live view) for a while."""
    global _active
    previous, _active = _active, progress
    try:
        yield
    finally:
        _active = previous


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar (ETA included)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if _active is not None:
        task_id = _active.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                _active.advance(task_id)
        finally:
            _active.remove_task(task_id)
        return
    with new_progress() as progress:
        task_id = progress.add_task(description, total=total)
        for item in iterable:
            yield item
            progress.advance(task_id)
