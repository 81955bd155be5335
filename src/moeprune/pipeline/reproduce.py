"""`invoke reproduce`: run the stage graph for one recipe, natively or in the container."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.pipeline.fingerprint import HashCache
from moeprune.pipeline.graph import Context, Pipeline, PipelineListener, Stage, StageResult
from moeprune.pipeline.stages import build_pipeline
from moeprune.pipeline.view import LiveView, summary_table
from moeprune.preflight import require_preflight
from moeprune.recipe import Recipe


def _in_container(stage: Stage, runner: Any, recipe: Recipe) -> Stage:
    """The same stage, its action run as `invoke stage NAME` inside the image."""
    from moeprune.runner import recipe_mounts
    from moeprune.runlock import child_env

    def action(ctx: Context) -> dict[str, Any]:
        log_path = ctx.layout.log_path(f"{stage.name}.container")
        # The stage in the image works under this process's writer lock (its token travels along).
        runner.run_stage(["stage", stage.name, "--recipe", str(recipe.source_path)],
                         mounts=recipe_mounts(recipe), log_path=log_path, env=child_env())
        return {}

    return replace(stage, action=action)


class _Recorder(PipelineListener):
    """Forwards stage events to the view and keeps each stage's last result (for the summary
    when a stage fails: the pipeline then raises instead of returning its results)."""

    def __init__(self, view: LiveView) -> None:
        self.view = view
        self.results: dict[str, StageResult] = {}

    def stage_started(self, name: str, reason: str) -> None:
        self.view.stage_started(name, reason)

    def stage_finished(self, result: StageResult) -> None:
        self.results[result.name] = result
        self.view.stage_finished(result)


def _error_text(exc: BaseException) -> str:
    """What the summary table says of a failed stage: a MoepruneError's message as it is (a failed
    tool's is one line, see ``llamacpp.process.failure_line``). Anything else is a bug: its
    traceback goes to stderr, and the table gets the exception's one line, not the traceback
    folded into its narrow column."""
    if isinstance(exc, MoepruneError):
        return str(exc)
    traceback.print_exception(exc, file=sys.stderr)
    return f"internal error (a bug; traceback on stderr): {type(exc).__name__}: {exc}"


def _results_after_failure(pipeline: Any, selected: list[str], recorder: _Recorder, exc: Exception) -> list[StageResult]:
    """Every stage's status once a stage failed: finished ones as they were, the failed one with
    its error, later selected ones "not run"."""
    results, failed_seen = [], False
    for name in pipeline.names:
        done = recorder.results.get(name)
        if name not in selected:
            results.append(StageResult(name, "not selected"))
        elif done is not None and done.status == "failed":
            results.append(replace(done, error=_error_text(exc)))
            failed_seen = True
        elif done is not None and not failed_seen:
            results.append(done)
        else:
            results.append(StageResult(name, "not run"))
    if not failed_seen:  # failed before any stage started (a missing input of --from, ...)
        results.append(StageResult("(pipeline)", "failed", error=_error_text(exc)))
    return results


def _overlaps(a: Path, b: Path) -> bool:
    """Whether one path is, or lies under, the other."""
    a, b = Path(os.path.abspath(a)), Path(os.path.abspath(b))
    return a == b or a in b.parents or b in a.parents


def stages_to_run(pipeline: Pipeline, ctx: Context, selected: list[str], *, force: bool = False,
                  from_stage: str | None = None, hashes: HashCache | None = None) -> list[str]:
    """The selected stages that a run now would run (not skip as cached), without running any.

    The rule is the pipeline's own (:func:`moeprune.pipeline.graph._why_rerun` on each stage's key),
    plus: a stage whose input an earlier stage will rewrite is counted as running (it may still be
    skipped if the rewrite gives the same bytes: the plan errs on the side of more work). A Hub base
    not downloaded yet is never hashed here: every selected stage then counts as running. The
    digests computed go into ``hashes`` (default: the run's digest cache, left unsaved): the caller
    saves them for the run that follows once it has decided to start one.
    """
    from moeprune.base_model import BaseModelError, resolve_base
    from moeprune.pipeline.graph import _why_rerun
    from moeprune.pipeline.lock import Lock

    try:
        resolve_base(ctx.recipe, download=False)
    except BaseModelError:
        return list(selected)
    lock = Lock.load(ctx.layout.lock_path)
    hashes = hashes if hashes is not None else run_hash_cache(ctx)
    will_run: list[str] = []
    rewritten: list[Path] = []
    for stage in pipeline.stages:
        if stage.name not in selected:
            continue
        runs = force or stage.name == from_stage or any(
            _overlaps(dep, out) for dep in stage.deps(ctx) for out in rewritten)
        if not runs:
            try:
                key = pipeline.key(stage, ctx, hashes)
            except MoepruneError:  # an input is missing: an earlier stage writes it (or the run says why)
                runs = True
            else:
                entry = lock.entry(stage.name)
                outs = pipeline.outputs(stage, ctx, hashes) if entry else None
                runs = _why_rerun(entry, key, outs, False) is not None
        if runs:
            will_run.append(stage.name)
            rewritten += list(stage.outs(ctx))
    return _with_regenerated(pipeline, ctx, will_run)


def _with_regenerated(pipeline: Pipeline, ctx: Context, will_run: list[str]) -> list[str]:
    """``will_run`` plus the stages that make again an input deleted on purpose (moeprune.deleted)
    of a stage that will run: the pipeline reruns those first."""
    from moeprune.deleted import DeletedFiles

    deleted = DeletedFiles.load(ctx.layout)
    if not deleted.entries:
        return will_run
    producers = {pipeline.producer(dep, ctx).name for stage in pipeline.stages if stage.name in will_run
                 for dep in stage.deps(ctx) if deleted.record(dep) is not None}
    return [name for name in pipeline.names if name in will_run or name in producers]


def run_hash_cache(ctx: Context) -> HashCache:
    """The run's digest cache (``.hashcache.json``), as the pipeline reads it."""
    from moeprune.pipeline.graph import anchors_of

    return HashCache(ctx.layout.root / ".hashcache.json", anchors_of(ctx))


def _print_plan_or_refuse(recipe: Recipe, layout: RunLayout, pipeline: Pipeline, will_run: list[str],
                          ignore_disk_plan: bool) -> None:
    """Print the whole-run plan of the stages that will run; refuse (one line) when the disk
    cannot hold it, unless ``ignore_disk_plan``."""
    from moeprune.pipeline.lock import Lock
    from moeprune.plan.gather import DiskPlanError, plan_report

    report = plan_report(recipe, layout, set(will_run), pipeline.names, Lock.load(layout.lock_path).stages)
    print(f"run plan ({len(will_run)} of {len(pipeline.names)} stages will run):", file=sys.stderr)
    for line in report.lines:
        print(line, file=sys.stderr)
    if report.refusal is not None:
        if not ignore_disk_plan:
            raise DiskPlanError(f"{recipe.source_path}: refused before any stage ran: {report.refusal}")
        print("  --ignore-disk-plan: running anyway", file=sys.stderr)


def reproduce(
    recipe: Recipe,
    layout: RunLayout | None = None,
    *,
    runner_kind: str | None = None,
    force: bool = False,
    from_stage: str | None = None,
    until_stage: str | None = None,
    live: bool = True,
    ignore_disk_plan: bool = False,
) -> list[StageResult]:
    """Run (or resume) the pipeline for ``recipe``; return each stage's result.

    The lock is read first: when every selected stage is cached nothing else is checked (no
    tokenizer or model is loaded). Otherwise the preflight checks of the stages that will run come
    next, then the disk plan (refused, naming the first stage that would not fit, unless
    ``ignore_disk_plan``): nothing runs if either fails. When a stage fails, the summary table
    still prints, with that stage's error, and the returned results say "failed" there (later
    stages: "not run"), as DVC does.
    """
    layout = layout or RunLayout.for_recipe(recipe.name)
    kind = runner_kind or recipe.runner.kind
    pipeline = build_pipeline()
    selected = pipeline.selection(from_stage, until_stage)
    ctx = Context(recipe=recipe, layout=layout, runner=kind)
    hashes = run_hash_cache(ctx)
    will_run = stages_to_run(pipeline, ctx, selected, force=force, from_stage=from_stage, hashes=hashes)
    if will_run:
        # In the image the build is the image's: its stages check the GPU build themselves.
        require_preflight(recipe, will_run, skip=("gpu-build",) if kind == "docker" else (),
                          warn=lambda line: print(line, file=sys.stderr))
        _print_plan_or_refuse(recipe, layout, pipeline, will_run, ignore_disk_plan)
    hashes.save()  # the run starts: it reads the digests computed above instead of computing them again
    if kind == "docker":
        from moeprune.runner import get_runner

        runner = get_runner("docker", recipe)
        ctx.tools["image_digest"] = runner.describe().get("image_id")
        pipeline.stages = [_in_container(stage, runner, recipe) for stage in pipeline.stages]
    view = LiveView(pipeline.names, {s.name: s.description for s in pipeline.stages})
    recorder = _Recorder(view)
    try:
        with view.showing() if live else contextlib.nullcontext():
            results = pipeline.run(ctx, force=force, from_stage=from_stage, until_stage=until_stage,
                                   listener=recorder)
    except Exception as exc:  # not KeyboardInterrupt: Ctrl-C stops without a summary
        results = _results_after_failure(pipeline, selected, recorder, exc)
    view.console.print(summary_table(results))
    view.console.print(f"run directory: {Path(layout.root).resolve()}")
    return results
