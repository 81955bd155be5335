"""The stages of `invoke reproduce`, wired to the stage functions of each package.

profile -> dropmap -> prune -> recalibrate -> convert-{base,pruned,plain} -> mmproj -> quantize-{base,pruned,plain}
-> eval-{base,pruned,plain} -> results -> kld -> card -> manifest

Base and pruned models have stages of their own, so a new drop map reruns only the pruned side:
the base model's GGUF and its evaluation are reused. The plain model is the pruned checkpoint
before recalibration: its stages run only with ``[recalibrate]`` on (the cost side by side). Every stage runs the same way natively and in
the container: ``invoke stage NAME --recipe FILE`` (the docker runner runs that in the image).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from moeprune.errors import MoepruneError
from moeprune.layout import Model
from moeprune.eval.analysis import PRIMARY_FILTER, PRIMARY_METRIC
from moeprune.pipeline.graph import Context, Pipeline, Stage
from moeprune.recipe import Recipe

MODELS = get_args(Model)  # every model a run may measure; measured_models(recipe) says which this one does


# --- shared helpers ------------------------------------------------------------------------------
def base_dir(ctx: Context) -> Path:
    """Local directory of the base model (downloaded once from the Hub for a Hub id)."""
    from moeprune.base_model import resolve_base

    return resolve_base(ctx.recipe).local_dir


def llamacpp_build(ctx: Context):
    if "llamacpp" not in ctx.cache:
        from moeprune.llamacpp.build import ensure_llamacpp

        ctx.cache["llamacpp"] = ensure_llamacpp(ctx.recipe.llamacpp)
    return ctx.cache["llamacpp"]


def llamacpp_tools(ctx: Context) -> dict[str, Any]:
    return {"llamacpp": llamacpp_build(ctx).key, **_image(ctx)}


def _image(ctx: Context) -> dict[str, Any]:
    digest = ctx.tools.get("image_digest")
    return {"image_digest": digest} if digest else {}


def gguf_file(ctx: Context, which: str, gguf_type: str) -> Path:
    return ctx.layout.gguf_path(which, gguf_type)  # type: ignore[arg-type]


def _hf_dir(ctx: Context, which: str) -> Path:
    """The checkpoint converted for ``which``: the pruned side is the recalibrated one when enabled."""
    from moeprune.recalibrate import run_checkpoint

    return base_dir(ctx) if which == "base" else run_checkpoint(ctx.recipe, ctx.layout, which)


def _measured(ctx: Context, which: str) -> bool:
    from moeprune.recalibrate import measured_models

    return which in measured_models(ctx.recipe)


def _if_measured(which: str, paths):
    """A stage's deps or outs for the ``which`` model: nothing when the run does not measure it (the
    plain pruned model of a run without recalibration), so its stages run nothing and write nothing."""
    return lambda ctx: paths(ctx) if _measured(ctx, which) else []


def _section(recipe: Recipe, *names: str) -> dict[str, Any]:
    data = recipe.settings()
    return {name: data[name] for name in names}


def _model_identity(recipe: Recipe) -> dict[str, Any]:
    return {"base": recipe.settings()["model"]["base"], "revision": recipe.model.revision}


# --- actions -------------------------------------------------------------------------------------
def _profile(ctx: Context) -> dict[str, Any]:
    from moeprune.profile.stage import run_profile

    return _headline(run_profile(ctx.recipe, ctx.layout), ("num_sequences", "num_tokens"))


def _dropmap(ctx: Context) -> dict[str, Any]:
    from moeprune.dropmap.stage import run_dropmap

    return _headline(run_dropmap(ctx.recipe, ctx.layout), ("num_experts_kept", "worst_layer", "worst_retained_fraction"))


def _prune(ctx: Context) -> dict[str, Any]:
    from moeprune.prune.surgery import run_prune

    return _headline(run_prune(ctx.recipe, ctx.layout), ("num_shards", "total_size"))


def _recalibrate(ctx: Context) -> dict[str, Any]:
    from moeprune.recalibrate.stage import run_recalibrate

    record = run_recalibrate(ctx.recipe, ctx.layout)
    if record is None:
        return {}
    return {"layers_changed": sum(layer["changed"] for layer in record["layers"])}


def _recalibrate_outs(ctx: Context) -> list[Path]:
    """The recalibrated checkpoint when ``[recalibrate]`` is enabled; nothing (no file) when not."""
    return [ctx.layout.recalibrated_dir] if ctx.recipe.recalibrate.enabled else []


def _recalibrate_deps(ctx: Context) -> list[Path]:
    if not ctx.recipe.recalibrate.enabled:
        return []
    text = [ctx.recipe.recalibrate_text_path] if ctx.recipe.recalibrate.objective == "model-kl" else []
    return [base_dir(ctx), ctx.layout.pruned_dir, ctx.layout.sequences_path, *text]


def _recalibrate_params(recipe: Recipe) -> dict[str, Any]:
    if not recipe.recalibrate.enabled:
        return {"recalibrate": {"enabled": False}}
    return {**_section(recipe, "recalibrate", "prune"), "domains": recipe.calibration.domains,
            "batch_size": recipe.calibration.batch_size}


def _convert(which: str):
    def action(ctx: Context) -> dict[str, Any]:
        from moeprune.llamacpp.stages import convert_stage

        if not _measured(ctx, which):
            return {}
        record = convert_stage(ctx.recipe, which, _hf_dir(ctx, which), layout=ctx.layout,
                               build=llamacpp_build(ctx))
        return {"size_bytes": record["size_bytes"]}

    return action


def _mmproj(ctx: Context) -> dict[str, Any]:
    from moeprune.llamacpp.stages import mmproj_stage

    record = mmproj_stage(ctx.recipe, base_dir(ctx), layout=ctx.layout, build=llamacpp_build(ctx))
    return {} if record is None else {"size_bytes": record["size_bytes"]}


def _mmproj_outs(ctx: Context) -> list[Path]:
    """The projector and its record when the base has a vision tower; nothing for a text-only base."""
    from moeprune.arch import inspect

    if "vision" not in inspect(base_dir(ctx), "base model's config.json").towers:
        return []
    return _with_records([ctx.layout.mmproj_path(ctx.recipe.quantize.convert_outtype)])


def _quantize(which: str):
    def action(ctx: Context) -> dict[str, Any]:
        from moeprune.llamacpp.stages import quantize_stage

        if not _measured(ctx, which):
            return {}
        records = quantize_stage(ctx.recipe, which, layout=ctx.layout, build=llamacpp_build(ctx))
        return {f"{record['qtype']}_size_bytes": record["size_bytes"] for record in records}

    return action


def _eval(which: str):
    def action(ctx: Context) -> dict[str, Any]:
        from moeprune.eval.run import run_eval

        if not _measured(ctx, which):
            return {}
        # One model per stage, so a new drop map re-evaluates only the pruned model.
        section = ctx.recipe.eval.model_copy(update={"models": [which]})
        recipe = ctx.recipe.model_copy(update={"eval": section})
        gguf = gguf_file(ctx, which, ctx.recipe.quantize.eval_type)
        record = run_eval(recipe, ctx.layout, gguf_paths={which: gguf}, combine=False)[which]
        headline = {}
        for task, task_run in record["tasks"].items():
            flexible = task_run["reported"].get(PRIMARY_FILTER, {}).get(PRIMARY_METRIC, {})
            if "value" in flexible:
                headline[f"{which}_{task}_pct"] = round(100 * flexible["value"], 2)
        return headline

    return action


def _results(ctx: Context) -> dict[str, Any]:
    from moeprune.eval.results import write_results

    # results.json takes every eval/<model>/ there is: one this run no longer measures (the plain
    # pruned model's, left by a run with [recalibrate] on) would go on the card as if measured now.
    for which in MODELS:
        stale = ctx.layout.eval_model_dir(which)
        if not _measured(ctx, which) and stale.exists():
            raise MoepruneError(f"{stale}: the evaluation of the '{which}' model, which this recipe does not measure "
                                "(left by a run with recalibrate.enabled = true); move it away, or enable recalibrate")
    results = write_results(ctx.layout.eval_dir)
    return _headline_results(results)


def _kld(ctx: Context) -> dict[str, Any]:
    from moeprune.kld.stage import run_kld

    document = run_kld(ctx.recipe, ctx.layout, llamacpp_build(ctx))
    if not document["enabled"]:
        return {}
    rows = {row["role"]: row for row in document["rows"]}
    return {"pruned_kld": round(rows["pruned-eval"]["mean_kld"]["value"], 5),
            "base_kld": round(rows["base-eval"]["mean_kld"]["value"], 5),
            "rival": document["rival"]["quant_type"],
            "rival_kld": round(next(r for r in document["rows"] if r["label"] == document["rival"]["label"])
                               ["mean_kld"]["value"], 5)}


def _kld_deps(ctx: Context) -> list[Path]:
    recipe = ctx.recipe
    if not recipe.kld.enabled:
        return []
    from moeprune.recalibrate import measured_models

    types = (recipe.quantize.convert_outtype, *recipe.quantize.types)
    files = [gguf_file(ctx, which, t) for which in measured_models(recipe) for t in types]
    return [*dict.fromkeys(files), *([recipe.kld_text_path] if recipe.kld_text_path else [])]


def _card(ctx: Context) -> dict[str, Any]:
    from moeprune.card.render import run_card

    run_card(ctx.recipe, ctx.layout)
    return {}


def _manifest(ctx: Context) -> dict[str, Any]:
    from moeprune.manifest import run_manifest

    manifest = run_manifest(ctx.recipe, ctx.layout, tools={"llamacpp": llamacpp_build(ctx).record, **_image(ctx)})
    return {"files": len(manifest["files"])}


def _headline(summary: dict[str, Any] | None, keys: Sequence[str]) -> dict[str, Any]:
    summary = summary or {}
    return {key: summary[key] for key in keys if key in summary}


def _headline_results(results: dict[str, Any]) -> dict[str, Any]:
    headline = {}
    for model, entry in results.get("models", {}).items():
        for task, task_entry in entry.get("tasks", {}).items():
            flexible = task_entry.get("scores", {}).get(PRIMARY_FILTER, {})
            metric = flexible.get(PRIMARY_METRIC) or next(iter(flexible.values()), None)
            if isinstance(metric, dict) and "value" in metric:
                headline[f"{model}_{task}_pct"] = round(100 * metric["value"], 2)
    return headline


def _card_templates() -> Path:
    """The card templates' directory (card.render's TEMPLATE_PATH.parent), without importing the
    card's numpy stack: deciding whether the card stage runs must stay cheap."""
    from moeprune.resources import data_dir

    return data_dir("model_card")


def _imatrix(ctx: Context, which: str) -> list[Path]:
    """The importance matrix quantize_stage writes beside the GGUFs, when the recipe asks for one."""
    if not ctx.recipe.quantize.imatrix:
        return []
    return [ctx.layout.imatrix_path(which, ctx.recipe.quantize.convert_outtype)]  # type: ignore[arg-type]


def _with_records(paths: list[Path]) -> list[Path]:
    """GGUF files and the record written beside each (``<file>.gguf.json``)."""
    from moeprune.layout import RunLayout

    return [p for path in paths for p in (path, RunLayout.gguf_record_path(path))]


# --- the graph -----------------------------------------------------------------------------------
def _profile_deps(ctx: Context) -> list[Path]:
    gguf = ctx.recipe.generate_gguf_path if ctx.recipe.profile.generate == "llama-server" else None
    return [base_dir(ctx), ctx.recipe.prompts_path] + ([gguf] if gguf is not None else [])


def build_pipeline() -> Pipeline:
    L = lambda ctx: ctx.layout  # noqa: E731
    stages: list[Stage] = [
        Stage("profile", "generate, then replay with hooks measuring each expert's weighted output norm",
              _profile, deps=_profile_deps, outs=lambda c: [L(c).profile_dir],
              params=lambda r: {**_section(r, "calibration", "profile"), "model": _model_identity(r),
                                "dtype": r.model.dtype}),
        Stage("dropmap", "choose the experts to drop", _dropmap,
              deps=lambda c: [L(c).profile_stats_path, L(c).profile_summary_path, base_dir(c) / "config.json"],
              outs=lambda c: [L(c).drop_map_path],
              params=lambda r: {**_section(r, "dropmap"), "model": _model_identity(r)}),
        Stage("prune", "slice experts, router rows and scales into a sharded checkpoint", _prune,
              deps=lambda c: [base_dir(c), L(c).drop_map_path], outs=lambda c: [L(c).pruned_dir],
              params=lambda r: _section(r, "prune")),
        Stage("recalibrate", "refit the kept router tensors to the base's MoE outputs (recipe [recalibrate])",
              _recalibrate, deps=_recalibrate_deps, outs=_recalibrate_outs, params=_recalibrate_params),
    ]
    for which in MODELS:
        stages.append(Stage(
            f"convert-{which}", f"convert the {which} checkpoint to GGUF", _convert(which),
            deps=_if_measured(which, lambda c, w=which: [_hf_dir(c, w)]),
            outs=_if_measured(which, lambda c, w=which: _with_records([gguf_file(c, w, c.recipe.quantize.convert_outtype)])),
            params=lambda r: {"convert_outtype": r.quantize.convert_outtype, "name": r.model.name}, tools=llamacpp_tools))
    stages.append(Stage(
        "mmproj", "convert the base's vision projector (multimodal bases only; it serves the pruned model too)",
        _mmproj, deps=lambda c: [base_dir(c)], outs=_mmproj_outs,
        params=lambda r: {"convert_outtype": r.quantize.convert_outtype}, tools=llamacpp_tools))
    for which in MODELS:
        stages.append(Stage(
            f"quantize-{which}", f"quantize the {which} GGUF", _quantize(which),
            deps=_if_measured(which, lambda c, w=which: [gguf_file(c, w, c.recipe.quantize.convert_outtype)]
                              + ([c.recipe.prompts_path] if c.recipe.quantize.imatrix else [])),
            outs=_if_measured(which, lambda c, w=which: _with_records([gguf_file(c, w, t) for t in c.recipe.quantize.types]
                                                                      + _imatrix(c, w))),
            params=lambda r: _section(r, "quantize"), tools=llamacpp_tools))
    for which in MODELS:
        stages.append(Stage(
            f"eval-{which}", f"serve the {which} GGUF and evaluate it with lm-eval", _eval(which),
            deps=_if_measured(which, lambda c, w=which: [gguf_file(c, w, c.recipe.quantize.eval_type)]
                              + ([c.recipe.include_path] if c.recipe.include_path else [])),
            outs=_if_measured(which, lambda c, w=which: [L(c).eval_model_dir(w)]),
            params=lambda r: _section(r, "eval", "serve"),
            tools=llamacpp_tools))
    stages += [
        Stage("results", "scores, error analysis and the paired comparison", _results,
              deps=lambda c: [L(c).eval_model_dir(m) for m in MODELS if _measured(c, m)], outs=lambda c: [L(c).results_path],
              params=lambda r: {"bootstrap_resamples": r.eval.bootstrap_resamples, "seed": r.eval.seed}),
        Stage("kld", "KL divergence to the base: pruned, base and the equal-size rival (llama-perplexity)", _kld,
              deps=_kld_deps, outs=lambda c: [L(c).kld_path, L(c).kld_evidence_dir],
              params=lambda r: {"kld": _section(r, "kld")["kld"], "quantize": _section(r, "quantize")["quantize"],
                                "threads": r.serve.threads, "n_gpu_layers": r.serve.n_gpu_layers},
              tools=llamacpp_tools),
        Stage("card", "render the model card and its plots", _card,
              deps=lambda c: [L(c).profile_summary_path, L(c).profile_stats_path, L(c).drop_map_path,
                              L(c).pruned_dir, *_recalibrate_outs(c), L(c).results_path, L(c).kld_path, L(c).gguf_dir, _card_templates()],
              outs=lambda c: [L(c).card_dir],
              params=lambda r: _section(r, "model", "calibration", "profile", "dropmap", "serve", "eval", "card",
                                        "publish")),
        Stage("manifest", "hash every file of the artifact", _manifest,
              deps=lambda c: [L(c).profile_dir, L(c).drop_map_path, L(c).pruned_dir, *_recalibrate_outs(c),
                              L(c).gguf_dir, L(c).eval_dir, L(c).card_dir],
              outs=lambda c: [L(c).manifest_path], params=lambda r: r.settings(), tools=llamacpp_tools),
    ]
    for stage in stages:
        object.__setattr__(stage, "command", _command_for(stage.name))
    return Pipeline(stages)


def _command_for(name: str):
    def command(ctx: Context) -> str:
        # The recipe file is not part of the key (the values a stage reads are, as params), so a
        # recipe moved, copied or edited elsewhere reuses the lock where those values agree.
        return shlex.join(["invoke", "stage", name, "--recipe", "RECIPE"])

    return command


def stage_names() -> list[str]:
    return build_pipeline().names


def run_single_stage(name: str, ctx: Context) -> dict[str, Any]:
    """Run one stage's action (what `stage_cli` does inside a container)."""
    pipeline = build_pipeline()
    for stage in pipeline.stages:
        if stage.name == name:
            return stage.action(ctx)
    raise MoepruneError(f"no stage {name!r}; stages are {', '.join(pipeline.names)}")
