"""The disk plan of a run, and whether the filesystems can hold it: pure functions.

Each stage that will run writes its outputs (:class:`Write`). An output replaced by a rerun is
written beside the old one and renamed over it (``moeprune.atomic``; llama.cpp tools write a
``.tmp-*`` first), so the old bytes are freed only once the new ones exist: at a stage's peak both
are on disk, and only afterwards is the old copy's space free again. :func:`first_shortfall`
walks the stages in order with exactly that rule, per filesystem.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9


@dataclass(frozen=True)
class Write:
    """One output a stage writes."""

    what: str
    path: Path  # where it goes (decides the filesystem)
    new_bytes: int
    old_bytes: int = 0  # the output there now, freed once the new one has replaced it
    bound: bool = False  # new_bytes is an upper bound (e.g. the expert count is not chosen yet)
    transient: bool = False  # deleted within the stage once used, one at a time (disk.delete_intermediates)


@dataclass(frozen=True)
class Free:
    """A file deleted once its stage has finished (moeprune.deleted), cached or not."""

    what: str
    path: Path
    nbytes: int


@dataclass(frozen=True)
class StagePlan:
    stage: str
    runs: bool  # False: cached (its lock entry holds) or not selected: it writes nothing
    writes: tuple[Write, ...] = ()
    memory: str = ""
    time: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)
    frees: tuple[Free, ...] = ()

    @property
    def new_bytes(self) -> int:
        return sum(w.new_bytes for w in self.writes) if self.runs else 0


@dataclass(frozen=True)
class Shortfall:
    stage: str
    filesystem: str  # a path on it
    need_bytes: int
    free_bytes: int

    @property
    def short_bytes(self) -> int:
        return self.need_bytes - self.free_bytes


def stage_peaks(stages: Sequence[StagePlan], filesystem_of: Callable[[Path], str]
                ) -> Iterator[tuple[StagePlan, dict[str, int]]]:
    """Each stage that runs, with the bytes each filesystem holds beyond what it holds now at the
    stage's peak: what earlier stages left, plus this stage's outputs (its transient ones one at a
    time, the largest counted). After the stage, replaced outputs, transient ones and the files it
    frees are gone again."""
    used: dict[str, int] = {}
    for stage in stages:
        if stage.runs:
            peak, transient = dict(used), {}
            for write in stage.writes:
                fs = filesystem_of(write.path)
                if write.transient:
                    transient[fs] = max(transient.get(fs, 0), write.new_bytes)
                else:
                    peak[fs] = peak.get(fs, 0) + write.new_bytes
            for fs, nbytes in transient.items():
                peak[fs] = peak.get(fs, 0) + nbytes
            yield stage, peak
            used = {fs: nbytes - transient.get(fs, 0) for fs, nbytes in peak.items()}
            for write in stage.writes:
                used[filesystem_of(write.path)] -= write.old_bytes
        for free in stage.frees:
            fs = filesystem_of(free.path)
            used[fs] = used.get(fs, 0) - free.nbytes


def first_shortfall(stages: Sequence[StagePlan], free_bytes: Mapping[str, int],
                    filesystem_of: Callable[[Path], str]) -> Shortfall | None:
    """The first stage (in run order) at whose peak a filesystem would hold more than it has free
    now; None when every stage fits. ``free_bytes`` maps each filesystem key (what
    ``filesystem_of`` returns for a path) to its free bytes now."""
    for stage, peak in stage_peaks(stages, filesystem_of):
        for fs, need in peak.items():
            if need > free_bytes.get(fs, 0):
                return Shortfall(stage.stage, fs, need, free_bytes.get(fs, 0))
    return None


def peak_bytes(stages: Sequence[StagePlan]) -> int:
    """The most the run holds at once beyond what is on disk now, all filesystems together."""
    return max((sum(peak.values()) for _, peak in stage_peaks(stages, lambda path: "all")), default=0)


def human(nbytes: int) -> str:
    """Decimal units, as ``df -H`` and the Hub show sizes."""
    for unit, size in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def plan_lines(stages: Sequence[StagePlan]) -> list[str]:
    """The plan as ``invoke check`` / ``reproduce`` print it: one line per stage, then the total."""
    lines = []
    for stage in stages:
        if not stage.runs:
            lines.append(f"  {stage.stage:<16} cached: writes nothing")
            continue
        bound = "<= " if any(w.bound for w in stage.writes) else ""
        parts = ", ".join(f"{w.what} {'<= ' if w.bound else ''}{human(w.new_bytes)}" for w in stage.writes)
        freed = sum(w.old_bytes for w in stage.writes)
        line = (f"  {stage.stage:<16} disk {bound}{human(stage.new_bytes)} ({parts})" if stage.writes
                else f"  {stage.stage:<16} disk: small files only (not counted)")
        if freed:
            line += f"; replaces {human(freed)} once written"
        transient = [w.path.name for w in stage.writes if w.transient]
        if transient:
            line += f"; deletes {', '.join(transient)} once each is used"
        if stage.frees:
            line += "; then deletes " + ", ".join(f"{f.what} {human(f.nbytes)}" for f in stage.frees)
        line += f"; memory: {stage.memory or 'not estimated'}; time: {stage.time or 'no measured rate'}"
        lines.append(line + "".join(f"; {note}" for note in stage.notes))
    total = sum(s.new_bytes for s in stages)
    bound = "<= " if any(w.bound for s in stages if s.runs for w in s.writes) else ""
    lines.append(f"  total written: {bound}{human(total)} ({total} bytes; GGUF sizes are tensor data, "
                 "metadata not counted)")
    if any(s.frees or any(w.transient for w in s.writes) for s in stages):
        peak = peak_bytes(stages)
        gone = sum(w.new_bytes for s in stages if s.runs for w in s.writes if w.transient) + \
            sum(f.nbytes for s in stages for f in s.frees)
        lines.append(f"  peak on disk: {bound}{human(peak)} ({peak} bytes at once, with the deletions of "
                     f"[disk] delete_intermediates; {human(gone)} deleted by the end)")
    return lines
