"""`invoke reproduce`: run the stage graph for one recipe, natively or in the container."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from moeprune.layout import RunLayout
from moeprune.pipeline.graph import Context, Stage, StageResult
from moeprune.pipeline.stages import build_pipeline
from moeprune.pipeline.view import LiveView, summary_table
from moeprune.recipe import Recipe


def _in_container(stage: Stage, runner: Any, recipe: Recipe) -> Stage:
    """The same stage, its action run as `invoke stage NAME` inside the image."""
    from moeprune.runner import recipe_mounts

    def action(ctx: Context) -> dict[str, Any]:
        log_path = ctx.layout.logs_dir / f"{stage.name}.container.log"
        runner.run_stage(["stage", stage.name, "--recipe", str(recipe.source_path)],
                         mounts=recipe_mounts(recipe), log_path=log_path)
        return {}

    return replace(stage, action=action)


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
    """Run (or resume) the pipeline for ``recipe``; return each stage's result."""
    layout = layout or RunLayout.for_recipe(recipe.name)
    kind = runner_kind or recipe.runner.kind
    pipeline = build_pipeline()
    ctx = Context(recipe=recipe, layout=layout, runner=kind)
    if kind == "docker":
        from moeprune.runner import get_runner

        runner = get_runner("docker", recipe)
        ctx.tools["image_digest"] = runner.describe().get("image_id")
        pipeline.stages = [_in_container(stage, runner, recipe) for stage in pipeline.stages]
    view = LiveView(pipeline.names, {s.name: s.description for s in pipeline.stages})
    if live:
        with view.showing():
            results = pipeline.run(ctx, force=force, from_stage=from_stage, until_stage=until_stage, listener=view)
    else:
        results = pipeline.run(ctx, force=force, from_stage=from_stage, until_stage=until_stage, listener=view)
    view.console.print(summary_table(results))
    view.console.print(f"run directory: {Path(layout.root).resolve()}")
    return results
