"""Preflight: refuse, before any real work, a recipe that would fail (or mislead) hours later.

``invoke check`` runs every check; each stage runs those that concern it before its first real
work (``require_preflight``). A check reads files and configs only: no weights are loaded, no
model is downloaded, nothing is built. Each problem names the recipe field and what to do.

Checks (and the stages they guard):

``gpu-build`` (serve, eval)
    ``serve.n_gpu_layers > 0`` needs a llama.cpp built with CUDA; a CPU-only build would
    silently run the evaluation on the CPU (days instead of hours).
``slots`` (serve, eval)
    each server slot must hold a prompt plus ``eval.max_gen_toks``: ``ctx_size / parallel``
    tokens, or all of ``ctx_size`` with a unified KV cache; the reasoning budget must leave room
    for the answer.
``moe-model`` (profile, dropmap, prune)
    the base model's config.json must describe a mixture of experts.
``calibration`` (profile, quantize with an imatrix)
    every line of the prompts file well-formed, the domains complete, and no prompt (plus
    ``calibration.max_new_tokens``) longer than the model's context, measured with its tokenizer.
``revision`` (the stages that read the base: profile, dropmap, prune, convert-base)
    a Hub base pinned by a branch or tag name gets a warning: the run records the commit it
    downloads, but the recipe alone does not reproduce it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.recipe import Recipe

# Tokens left in a server slot for the prompt (chat template, instructions, question) beside
# eval.max_gen_toks. GPQA's zero-shot CoT prompts are ~200-700 tokens.
PROMPT_RESERVE_TOKENS = 1024


class PreflightError(MoepruneError):
    """A recipe that a stage refuses before doing any work."""


@dataclass
class PreflightReport:
    """What the checks found: errors refuse the run, warnings are printed."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors


# --- the checks ------------------------------------------------------------------------------
def check_gpu_build(recipe: Recipe, report: PreflightReport) -> None:
    """``serve.n_gpu_layers > 0`` with a llama.cpp that would be built (or was) without CUDA."""
    from moeprune.llamacpp.build import LlamaCppBuildError, use_cuda

    layers = recipe.serve.n_gpu_layers
    if layers == 0:
        return
    try:
        cuda = use_cuda(recipe.llamacpp)
    except LlamaCppBuildError as exc:
        report.errors.append(f"field 'llamacpp.cuda' = {json.dumps(recipe.llamacpp.cuda)}: {exc}")
        return
    if not cuda:
        why = ("llamacpp.cuda = \"off\"" if recipe.llamacpp.cuda == "off"
               else "llamacpp.cuda = \"auto\" and this machine has no nvcc or no NVIDIA GPU")
        report.errors.append(
            f"field 'serve.n_gpu_layers' = {layers}: the llama.cpp build would be CPU-only ({why}), so "
            "llama-server would offload nothing and evaluate on the CPU; set llamacpp.cuda = \"on\" "
            "on a machine with CUDA, or serve.n_gpu_layers = 0 to run on the CPU on purpose"
        )


def check_slots(recipe: Recipe, report: PreflightReport) -> None:
    """Each llama-server slot must hold a prompt plus the generation budget."""
    serve, gen = recipe.serve, recipe.eval.max_gen_toks
    unified = bool(getattr(serve, "kv_unified", False))
    per_slot = serve.ctx_size if unified or serve.parallel == 1 else serve.ctx_size // serve.parallel
    need = gen + PROMPT_RESERVE_TOKENS
    if per_slot < need:
        split = "" if serve.parallel == 1 else f" / serve.parallel = {serve.parallel} slots"
        report.errors.append(
            f"field 'serve.ctx_size' = {serve.ctx_size}{split} gives each slot {per_slot} tokens, fewer "
            f"than eval.max_gen_toks = {gen} plus {PROMPT_RESERVE_TOKENS} for the prompt ({need}); answers "
            f"would be cut off. Set serve.ctx_size >= {need * (1 if unified else serve.parallel)}"
            + ("" if unified or serve.parallel == 1 else ", use a unified KV cache, or lower serve.parallel")
        )
    budget = serve.reasoning_budget
    if budget >= 0 and budget >= gen:
        report.errors.append(
            f"field 'serve.reasoning_budget' = {budget}: not below eval.max_gen_toks = {gen}, so thinking "
            "can use the whole generation budget and leave no tokens for the answer"
        )


def _base_config(recipe: Recipe, report: PreflightReport) -> tuple[dict[str, Any], Path] | None:
    """The base model's config.json (local, or from the HF cache); None (with a warning) if absent."""
    from moeprune.base_model import BaseModelError, resolve_base

    try:
        base_dir = resolve_base(recipe, download=False).local_dir
    except BaseModelError as exc:
        if recipe.base_is_local:
            report.errors.append(str(exc))
        else:
            warning = (f"model.base = {recipe.model.base!r} is not downloaded yet, so the model and "
                       "calibration checks run when the profile stage downloads it")
            if warning not in report.warnings:
                report.warnings.append(warning)
        return None
    path = base_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")), base_dir
    except (OSError, ValueError) as exc:
        report.errors.append(f"field 'model.base' = {json.dumps(recipe.model.base)}: cannot read {path} ({exc})")
        return None


def check_moe_model(recipe: Recipe, report: PreflightReport) -> None:
    """The base model is a mixture of experts, read from its config (no weights loaded)."""
    from moeprune.dropmap.io import moe_shape

    found = _base_config(recipe, report)
    if found is None:
        return
    config, base_dir = found
    try:
        moe_shape(config, base_dir / "config.json")
    except MoepruneError as exc:
        report.errors.append(
            f"field 'model.base' = {json.dumps(recipe.model.base)}: not a mixture-of-experts model moeprune "
            f"can prune, read from its config.json ({exc})"
        )


def check_calibration(recipe: Recipe, report: PreflightReport) -> None:
    """Prompts file well-formed, non-empty, and every prompt short enough (tokenizer only)."""
    from moeprune.profile.generate import load_calibration

    section = recipe.calibration
    try:
        prompts = load_calibration(recipe.prompts_path, section.domains, section.prompts_per_domain)
    except MoepruneError as exc:
        report.errors.append(f"field 'calibration.prompts' = {json.dumps(section.prompts)}: {exc}")
        return
    if not prompts:
        report.errors.append(f"field 'calibration.prompts' = {json.dumps(section.prompts)}: "
                             f"{recipe.prompts_path} holds no prompts")
        return
    found = _base_config(recipe, report)
    if found is None:
        return
    config, base_dir = found
    text = config.get("text_config") or config
    context = text.get("max_position_embeddings")
    if not context:
        return
    from moeprune.profile.loading import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    limit = int(context) - section.max_new_tokens
    for prompt in prompts:
        length = len(tokenizer(prompt.prompt, add_special_tokens=True)["input_ids"])
        if length > limit:
            report.errors.append(
                f"field 'calibration.prompts' = {json.dumps(section.prompts)}: prompt '{prompt.id}' is "
                f"{length} tokens; with calibration.max_new_tokens = {section.max_new_tokens} it exceeds "
                f"the model's context of {context} tokens (max_position_embeddings); shorten it"
            )


def check_revision(recipe: Recipe, report: PreflightReport) -> None:
    """A Hub base pinned by a branch or tag name (which moves) instead of a commit sha."""
    from moeprune.base_model import is_commit

    revision = recipe.model.revision
    if recipe.base_is_local or revision is None or is_commit(revision):
        return
    report.warnings.append(
        f"field 'model.revision' = {json.dumps(revision)} is a branch or tag name, not a commit sha: the "
        "run records the commit it downloads, but this recipe may download another one tomorrow; pin "
        "the 40-character commit sha"
    )


Check = Callable[[Recipe, PreflightReport], None]
CHECKS: dict[str, Check] = {
    "gpu-build": check_gpu_build,
    "slots": check_slots,
    "moe-model": check_moe_model,
    "calibration": check_calibration,
    "revision": check_revision,
}
# Which checks a stage (or task) needs before its first real work.
STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "profile": ("revision", "moe-model", "calibration"),
    "dropmap": ("revision", "moe-model"),
    "prune": ("revision", "moe-model"),
    "convert-base": ("revision",),
    "convert-pruned": (),
    "quantize-base": ("calibration-if-imatrix",),
    "quantize-pruned": ("calibration-if-imatrix",),
    "serve": ("gpu-build", "slots"),
    "eval": ("gpu-build", "slots"),
    "eval-base": ("gpu-build", "slots"),
    "eval-pruned": ("gpu-build", "slots"),
}


def checks_for(recipe: Recipe, stages: Iterable[str] | None) -> list[str]:
    """The check names ``stages`` need (every check for None), in a fixed order."""
    if stages is None:
        return list(CHECKS)
    wanted: set[str] = set()
    for stage in stages:
        for name in STAGE_CHECKS.get(stage, ()):
            if name == "calibration-if-imatrix":
                if recipe.quantize.imatrix:
                    wanted.add("calibration")
            else:
                wanted.add(name)
    return [name for name in CHECKS if name in wanted]


def preflight(recipe: Recipe, stages: Iterable[str] | None = None, *, skip: Iterable[str] = ()) -> PreflightReport:
    """Run the checks ``stages`` need (all of them for None), minus ``skip``; return the report."""
    report = PreflightReport()
    for name in checks_for(recipe, stages):
        if name in set(skip):
            continue
        CHECKS[name](recipe, report)
        report.checked += 1
    return report


def require_preflight(recipe: Recipe, stages: Iterable[str] | None = None, *, skip: Iterable[str] = (),
                      warn: Callable[[str], None] | None = None) -> PreflightReport:
    """:func:`preflight`, raising PreflightError (every problem, one per line) when any check fails."""
    report = preflight(recipe, stages, skip=skip)
    if warn is not None:
        for message in report.warnings:
            warn(f"warning: {message}")
    if not report.ok:
        where = recipe.source_path or "<recipe>"
        raise PreflightError(f"{where}: refused before any work:\n  - " + "\n  - ".join(report.errors))
    return report
