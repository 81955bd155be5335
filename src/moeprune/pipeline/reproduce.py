"""`invoke reproduce`: run the stage graph for one recipe, natively or in the container."""

from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.pipeline.graph import Context, PipelineListener, Stage, StageResult
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


def reproduce(
    recipe: Recipe,
    layout: RunLayout | None = None,
    *,
    runner_kind: str | None = None,
    force: bool = False,
    from_stage: str | None = None,
    until_stage: str | None = None,
    live: bool = True,
) -> list[StageResult]:
    """Run (or resume) the pipeline for ``recipe``; return each stage's result.

    The selected stages' preflight checks run first (nothing runs if one fails). When a stage
    fails, the summary table still prints, with that stage's error, and the returned results
    say "failed" there (later stages: "not run"), as DVC does.
    """
    layout = layout or RunLayout.for_recipe(recipe.name)
    kind = runner_kind or recipe.runner.kind
    pipeline = build_pipeline()
    selected = pipeline.selection(from_stage, until_stage)
    # In the image the build is the image's: its stages check the GPU build themselves.
    require_preflight(recipe, selected, skip=("gpu-build",) if kind == "docker" else (),
                      warn=lambda line: print(line, file=sys.stderr))
    ctx = Context(recipe=recipe, layout=layout, runner=kind)
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
