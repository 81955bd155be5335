"""A cached, resumable chain of stages.

Each stage declares what it reads (files, recipe values, its own code, tool versions) and what it
writes. A stage reruns only when one of those changed or an output is missing or altered; after
success its lock entry is written. Interrupting a run
at any point leaves the finished stages and their lock entries intact, and the next run resumes
at the interrupted stage. Outputs are replaced by the stages' atomic writers, never deleted first.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.atomic import describe_write_error, is_disk_error
from moeprune.deleted import DeletedFiles, intermediates, last_reader
from moeprune.pipeline.code import CodeRoots, ImportGraph, action_roots, package_graph
from moeprune.pipeline.fingerprint import Anchors, HashCache, dep_key
from moeprune.pipeline.lock import Lock, stage_key
from moeprune.recipe import Recipe
from moeprune.runlock import run_writer


@dataclass
class Context:
    """What a stage action receives."""

    recipe: Recipe
    layout: RunLayout
    runner: str = "native"
    tools: dict[str, Any] = field(default_factory=dict)  # e.g. llama.cpp build, image digest
    cache: dict[str, Any] = field(default_factory=dict)  # values computed once per run


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline.

    ``deps``/``outs`` return paths (files or directories); ``params`` returns the recipe values
    the stage reads; ``tools`` returns versions of external tools (llama.cpp build key, image
    digest) it uses. ``action`` does the work and returns headline numbers for the summary.
    ``code`` is computed from ``action`` when the pipeline is built (:mod:`moeprune.pipeline.code`);
    it is a field so that a stage whose action is wrapped (run in the container) keeps the code
    of the action it wraps.
    """

    name: str
    description: str
    action: Callable[[Context], dict[str, Any]]
    deps: Callable[[Context], Sequence[Path]]
    outs: Callable[[Context], Sequence[Path]]
    params: Callable[[Recipe], dict[str, Any]]
    code: CodeRoots | None = None
    tools: Callable[[Context], dict[str, Any]] = lambda ctx: {}
    command: Callable[[Context], str] | None = None


@dataclass
class StageResult:
    name: str
    status: str  # "ran", "skipped", "not selected", "failed", "not run" (after a failure)
    duration_s: float = 0.0
    headline: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    error: str = ""  # a failed stage's error message


class PipelineListener:
    """Receives stage events (the live view implements this)."""

    def stage_started(self, name: str, reason: str) -> None: ...

    def stage_finished(self, result: StageResult) -> None: ...


def anchors_of(ctx: Context) -> Anchors:
    """Where the lock's dependency names are relative to (never an absolute path)."""
    source = getattr(ctx.recipe, "source_path", None)
    return Anchors(run=ctx.layout.root, recipe_dir=Path(source).resolve().parent if source else None)


class Pipeline:
    """Runs stages in order against one run directory."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate stage names in {names}")
        self.stages = [stage if stage.code is not None else replace(stage, code=action_roots(stage.action))
                       for stage in stages]
        self._import_graph: ImportGraph | None = None

    def import_graph(self) -> ImportGraph:
        if self._import_graph is None:
            self._import_graph = package_graph()
        return self._import_graph

    @property
    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def _index(self, name: str | None, flag: str, default: int) -> int:
        if name is None:
            return default
        if name not in self.names:
            raise MoepruneError(f"{flag} {name!r}: no such stage; stages are {', '.join(self.names)}")
        return self.names.index(name)

    def selection(self, from_stage: str | None, until_stage: str | None) -> list[str]:
        first = self._index(from_stage, "--from", 0)
        last = self._index(until_stage, "--until", len(self.stages) - 1)
        if first > last:
            raise MoepruneError(f"--from {from_stage} comes after --until {until_stage}")
        return self.names[first : last + 1]

    def key(self, stage: Stage, ctx: Context, hashes: HashCache) -> dict[str, Any]:
        """Everything that decides whether ``stage`` must rerun, as recorded in the lock. A file
        deleted on purpose counts as its record says (moeprune.deleted)."""
        anchors = anchors_of(ctx)
        deleted = _deleted(ctx)
        deps = {}
        for path in stage.deps(ctx):
            recorded = deleted.digest(path)
            if recorded is not None:
                deps[dep_key(path, anchors)] = recorded
                continue
            if not path.exists():
                raise MoepruneError(
                    f"stage '{stage.name}' needs {path}, which does not exist; "
                    "run the stages before it first (drop --from)"
                )
            deps[dep_key(path, anchors)] = hashes.path_digest(path)
        return {
            "cmd": stage.command(ctx) if stage.command else f"invoke {stage.name}",
            "deps": dict(sorted(deps.items())),
            "params": stage.params(ctx.recipe),
            "code": stage.code.fingerprint(self.import_graph()) if stage.code is not None else None,
            "tools": stage.tools(ctx),
        }

    def outputs(self, stage: Stage, ctx: Context, hashes: HashCache) -> dict[str, Any] | None:
        """Digests of the stage's outputs, or None if one is missing (not deleted on purpose)."""
        deleted = _deleted(ctx)
        digests = {}
        for path in stage.outs(ctx):
            recorded = deleted.digest(path)
            if recorded is not None:
                digests[dep_key(path, anchors_of(ctx))] = recorded
                continue
            if not path.exists():
                return None
            digests[dep_key(path, anchors_of(ctx))] = hashes.path_digest(path)
        return dict(sorted(digests.items()))

    def run(
        self,
        ctx: Context,
        force: bool = False,
        from_stage: str | None = None,
        until_stage: str | None = None,
        listener: PipelineListener | None = None,
    ) -> list[StageResult]:
        listener = listener or PipelineListener()
        selected = set(self.selection(from_stage, until_stage))
        # The task running us holds the run already (the lock is re-entrant); a caller that does
        # not gets it here, so no run is ever written by two processes at once.
        with run_writer(ctx.layout, "moeprune pipeline"):
            lock = Lock.load(ctx.layout.lock_path)
            hashes = HashCache(ctx.layout.root / ".hashcache.json", anchors_of(ctx))
            ctx.cache["deleted"] = DeletedFiles.load(ctx.layout)
            results: list[StageResult] = []
            try:
                for stage in self.stages:
                    if stage.name not in selected:
                        results.append(StageResult(stage.name, "not selected"))
                        continue
                    results.append(self._run_stage(stage, ctx, lock, hashes, force or stage.name == from_stage,
                                                   listener))
                    self._release(stage, ctx, hashes)
            finally:
                hashes.save()  # best effort: never raises, so it cannot hide the stage's own error
        return results

    def _run_stage(
        self,
        stage: Stage,
        ctx: Context,
        lock: Lock,
        hashes: HashCache,
        force: bool,
        listener: PipelineListener,
        because: str = "",
    ) -> StageResult:
        key = self.key(stage, ctx, hashes)
        entry = lock.entry(stage.name)
        reason = because or _why_rerun(entry, key, self.outputs(stage, ctx, hashes) if entry else None, force)
        if reason is None:
            result = StageResult(stage.name, "skipped", headline=dict(entry.get("headline", {})))
            listener.stage_finished(result)
            return result

        if self._regenerate(stage, ctx, lock, hashes, listener):
            key = self.key(stage, ctx, hashes)
        listener.stage_started(stage.name, reason)
        # The previous outputs, and the lock entry describing them, stay until the stage succeeds
        # (its atomic writers replace the outputs), so a failed rerun leaves the last good state in
        # place. Outputs half-replaced by a failed stage no longer match the entry's digests, so the
        # next run reruns the stage. (A killed run's temporaries went when the run lock was taken.)
        started = time.monotonic()
        try:
            headline = stage.action(ctx) or {}
        except OSError as exc:
            listener.stage_finished(StageResult(stage.name, "failed", time.monotonic() - started, reason=reason))
            if is_disk_error(exc):
                target = Path(exc.filename) if exc.filename else ctx.layout.root
                raise MoepruneError(f"stage '{stage.name}': {describe_write_error(target, exc)}") from None
            raise
        except BaseException:
            listener.stage_finished(StageResult(stage.name, "failed", time.monotonic() - started, reason=reason))
            raise
        duration_s = time.monotonic() - started
        outs = self.outputs(stage, ctx, hashes)
        if outs is None:
            missing = [str(p) for p in stage.outs(ctx) if not p.exists()]
            raise MoepruneError(f"stage '{stage.name}' finished without writing {', '.join(missing)}")
        # duration_s is not part of the key: the run plan's time estimates read it (moeprune.plan).
        lock.record(stage.name, {**key, "outs": outs, "headline": headline, "duration_s": round(duration_s, 3)})
        result = StageResult(stage.name, "ran", duration_s, headline, reason)
        listener.stage_finished(result)
        return result

    def producer(self, path: Path, ctx: Context) -> Stage:
        """The stage whose declared outputs include ``path``."""
        target = Path(path).resolve()
        for stage in self.stages:
            if any(Path(out).resolve() == target for out in stage.outs(ctx)):
                return stage
        raise MoepruneError(f"{path}: no stage makes it")

    def _regenerate(self, stage: Stage, ctx: Context, lock: Lock, hashes: HashCache,
                    listener: PipelineListener) -> bool:
        """Make again the inputs of ``stage`` (about to run) that were deleted on purpose: their
        producing stage reruns first. Returns whether any was made."""
        deleted = _deleted(ctx)
        missing = [path for path in stage.deps(ctx) if deleted.record(path) is not None]
        for path in missing:
            self._run_stage(self.producer(path, ctx), ctx, lock, hashes, True, listener,
                            because=f"makes {path.name} again (deleted on purpose) for {stage.name}")
            deleted.forget(path)
        return bool(missing)

    def _release(self, stage: Stage, ctx: Context, hashes: HashCache) -> None:
        """Delete the intermediates (moeprune.deleted) whose last reader ``stage`` is, once it has
        finished (ran or cached), recording each first."""
        if stage.name != last_reader(ctx.recipe):
            return
        deleted = _deleted(ctx)
        for path in intermediates(ctx.recipe, ctx.layout):
            if path.is_file():
                deleted.mark(path, hashes.file(path), self.producer(path, ctx).name, stage.name)
                path.unlink()


def _deleted(ctx: Context) -> DeletedFiles:
    """The run's records of deleted intermediates, loaded once per run (a plan reads them afresh)."""
    found = ctx.cache.get("deleted")
    return found if isinstance(found, DeletedFiles) else DeletedFiles.load(ctx.layout)


def _changed_names(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))


def _listed(names: list[str], most: int = 3) -> str:
    """``a, b, c and 4 more``: a reason stays one short line."""
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _why_rerun(
    entry: dict[str, Any] | None, key: dict[str, Any], outs: dict[str, Any] | None, force: bool
) -> str | None:
    """Why a stage must run, or None when its lock entry is still valid."""
    if force:
        return "forced"
    if entry is None:
        return "never completed"
    recorded = stage_key(entry)
    for part in ("cmd", "params", "code", "tools", "deps"):
        old, new = recorded.get(part), key.get(part)
        if old == new:
            continue
        if part == "code" and isinstance(old, dict) and isinstance(new, dict):
            return f"code changed: {_listed(_changed_names(old, new))}"
        if part in ("deps", "params"):
            names = ", ".join(_changed_names(old or {}, new or {}))
            return f"{'input' if part == 'deps' else 'setting'} {names} changed"
        return f"{part} changed"  # cmd, tools; or code recorded as one digest by an older moeprune
    if outs is None:
        return "an output is missing"
    if outs != entry.get("outs"):
        return "an output was modified"
    return None
