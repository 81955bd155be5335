"""Progress bars: the one mechanism every long stage uses.

A stage wraps its main loop in :func:`track` (an iterable) or :func:`phase` (a count it advances
itself, e.g. tokens replayed): the profile's generation and replay, the KL divergence of each GGUF.
Run alone, a stage gets its own rich progress bar with an ETA; under `invoke reproduce` the bar
appears inside the pipeline's live view, under the stage table. Output goes to stderr, so stdout
stays clean for results. (Evaluation shows lm-eval's own bar; convert and quantize are one
llama.cpp tool each, with its log.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
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


@contextlib.contextmanager
def phase(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Show one bar of ``total`` units while the block runs; yield ``advance(n)``. A no-op when
    ``enabled`` is False."""
    if not enabled:
        yield lambda _n: None
        return
    if _active is not None:
        bars = _active
        task_id = bars.add_task(description, total=total)
        try:
            yield lambda n: bars.advance(task_id, n)
        finally:
            bars.remove_task(task_id)
        return
    with new_progress() as progress:
        task_id = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task_id, n)


def track(iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar (ETA included)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    with phase(description, total) as advance:
        for item in iterable:
            yield item
            advance(1)
