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
    the base model's config.json must be readable JSON describing a mixture of experts.
``expert-shapes`` (profile, prune)
    its expert count must match the expert tensors' shapes, read from the safetensors headers only
    through the family adapter (prune's own check).
``drop-counts`` (dropmap)
    ``dropmap.keep_count`` at least the model's top-k and at most its experts; ``protect_top_k``
    at most its experts.
``convertible`` (convert-base, convert-pruned)
    the config names its ``architectures``, which ``convert_hf_to_gguf.py`` picks its converter
    by (without it the converter dies with a traceback after the earlier stages ran).
``calibration`` (profile, quantize with an imatrix)
    every line of the prompts file well-formed UTF-8 JSON, the domains complete, and no prompt
    (plus ``calibration.max_new_tokens``) longer than the model's context, measured as the profile
    feeds it: rendered through the chat template and tokenized.
``eval-tasks`` (eval)
    every task YAML under ``eval.include_path`` is UTF-8 and parses (lm-eval skips a broken one
    silently, and the eval then fails hours later calling the task unknown).
``kld-text`` (kld)
    ``kld.text`` is non-empty UTF-8 text.
``rpc-workers`` (serve, eval, kld, and profile when phase 1 runs on llama-server; only with ``serve.rpc``)
    each worker answers over the wire, speaks the pinned build's RPC protocol, serves on its build
    port a build record whose source and flags agree with this node's, and together they
    have the free memory the offloaded layers of the largest served GGUF need; the one check that
    talks to other machines.
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

    def failure(self, where: object, verb: str = "refused before any work") -> str:
        """The refusal as the user sees it: one line for one problem, else one line per problem."""
        if len(self.errors) == 1:
            return f"{where}: {verb}: {self.errors[0]}"
        return f"{where}: {verb}:\n  - " + "\n  - ".join(self.errors)


# --- the checks ------------------------------------------------------------------------------
def check_gpu_build(recipe: Recipe, report: PreflightReport) -> None:
    """``serve.n_gpu_layers > 0`` with a llama.cpp that would be built (or was) without CUDA."""
    from moeprune.llamacpp.build import LlamaCppBuildError, use_cuda

    layers = recipe.serve.n_gpu_layers
    if layers == 0 or recipe.serve.rpc:
        return  # with serve.rpc the layers go to the workers (check_rpc_workers)
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
    from moeprune.arch import read_config
    from moeprune.base_model import BaseModelError, resolve_base
    from moeprune.userfile import UserFileError

    try:
        base_dir = resolve_base(recipe, download=False).local_dir
    except BaseModelError as exc:
        if recipe.base_is_local:
            _add(report, str(exc))
        else:
            warning = (f"model.base = {recipe.model.base!r} is not downloaded yet, so the model and "
                       "calibration checks run when the profile stage downloads it")
            if warning not in report.warnings:
                report.warnings.append(warning)
        return None
    try:
        return read_config(base_dir / "config.json", "base model's config.json", UserFileError), base_dir
    except UserFileError as exc:
        _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: {exc}")
        return None


def _add(report: PreflightReport, error: str) -> None:
    """Record ``error`` once (several checks read the same base config)."""
    if error not in report.errors:
        report.errors.append(error)


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
        _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: not a mixture-of-experts model "
                     f"moeprune can prune, read from its config.json ({exc})")


def _moe_base(recipe: Recipe, report: PreflightReport) -> tuple[dict[str, Any], Path, int, int] | None:
    """(config, directory, experts per layer, top-k) of the base; None when it is absent or not a
    mixture of experts (:func:`check_moe_model` says why)."""
    from moeprune.dropmap.io import moe_shape

    found = _base_config(recipe, report)
    if found is None:
        return None
    config, base_dir = found
    try:
        num_experts, top_k, _ = moe_shape(config, base_dir / "config.json")
    except MoepruneError:
        return None
    return config, base_dir, num_experts, top_k


def check_expert_shapes(recipe: Recipe, report: PreflightReport) -> None:
    """The config's expert count matches the expert tensors, read from the safetensors headers
    through the family adapter (prune's own check; no weights loaded)."""
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.prune.surgery import check_experts_match_config

    found = _moe_base(recipe, report)
    if found is None:
        return
    config, base_dir, _, _ = found
    try:
        with Checkpoint.open(base_dir) as checkpoint:
            check_experts_match_config(checkpoint, config, base_dir / "config.json")
    except MoepruneError as exc:
        _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: {exc}")


def check_drop_counts(recipe: Recipe, report: PreflightReport) -> None:
    """``dropmap.keep_count`` and ``protect_top_k`` fit the model: at least its top-k routing, at
    most its experts, a multiple of a grouped router's ``n_group``; every listed ``dropmap.protect``
    pair names a MoE layer and an expert (the dropmap stage would refuse them only after the
    profile's hours)."""
    found = _moe_base(recipe, report)
    if found is None:
        return
    _, _, num_experts, top_k = found
    section = recipe.dropmap
    keep = section.keep_count
    if keep is not None and keep < top_k:
        report.errors.append(f"field 'dropmap.keep_count' = {keep}: below the model's top-k routing ({top_k}); "
                             f"keep at least {top_k} experts per layer")
    if keep is not None and keep > num_experts:
        report.errors.append(f"field 'dropmap.keep_count' = {keep}: above the model's {num_experts} experts per "
                             "layer; keep fewer")
    if section.protect_top_k > num_experts:
        report.errors.append(f"field 'dropmap.protect_top_k' = {section.protect_top_k}: above the model's "
                             f"{num_experts} experts per layer")
    from moeprune.arch import ModelSpec
    from moeprune.dropmap.protect import listed_experts

    spec = ModelSpec.from_config(found[0])
    n_group = spec.routing_groups()[0]
    if keep is not None and n_group > 1 and keep % n_group:
        report.errors.append(f"field 'dropmap.keep_count' = {keep}: not a multiple of the model's n_group = {n_group}; "
                             "every routing group keeps the same number")
    if isinstance(section.protect, list):
        try:
            listed_experts(section.protect, list(spec.moe_layers), num_experts)
        except MoepruneError as exc:
            report.errors.append(str(exc))


def check_convertible(recipe: Recipe, report: PreflightReport) -> None:
    """The config names the model class (``architectures``) the GGUF converter dispatches on."""
    from moeprune.arch import ArchError, ModelSpec
    from moeprune.arch.spec import architectures

    found = _base_config(recipe, report)
    if found is None:
        return
    config, base_dir = found
    names = architectures(config)
    if isinstance(names, list) and names and all(isinstance(n, str) and n for n in names):
        return
    try:
        example = f'["{ModelSpec.from_config(config).transformers_class}"]'
    except ArchError:
        example = "the transformers model class"
    _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: {base_dir / 'config.json'} has no "
                 f"'architectures' list (found {json.dumps(names)}); convert_hf_to_gguf.py picks its converter by it: "
                 f"add \"architectures\": {example}")


def check_calibration(recipe: Recipe, report: PreflightReport) -> None:
    """Prompts file well-formed, non-empty, and every prompt short enough as the profile renders it."""
    from moeprune.profile.generate import load_calibration

    section = recipe.calibration
    field = f"field 'calibration.prompts' = {json.dumps(section.prompts)}"
    try:
        prompts = load_calibration(recipe.prompts_path, section.domains, section.prompts_per_domain)
    except MoepruneError as exc:
        report.errors.append(f"{field}: {exc}")
        return
    found = _base_config(recipe, report)
    if found is None:
        return
    _, base_dir = found
    from moeprune.profile.generate import render_prompt_ids
    from moeprune.arch import context_length
    from moeprune.profile.loading import load_config, load_tokenizer

    try:
        context = context_length(load_config(base_dir))
        tokenizer = load_tokenizer(base_dir)
    except MoepruneError as exc:
        _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: {exc}")
        return
    if not context:
        return
    for prompt in prompts:
        try:  # what phase 1 feeds the model: the user turn through the chat template
            length = len(render_prompt_ids(tokenizer, prompt.prompt, section.enable_thinking))
        except Exception as exc:  # a user's chat template failing (jinja, a raise_exception call)
            _add(report, f"field 'model.base' = {json.dumps(recipe.model.base)}: the chat template fails on "
                         f"prompt '{prompt.id}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
            return
        if length + section.max_new_tokens > context:
            report.errors.append(
                f"{field}: {recipe.prompts_path}:{prompt.line}: prompt '{prompt.id}' is {length} tokens "
                f"through the chat template; with calibration.max_new_tokens = {section.max_new_tokens} it "
                f"exceeds the model's context of {context} tokens (max_position_embeddings); shorten it"
            )


def check_eval_tasks(recipe: Recipe, report: PreflightReport) -> None:
    """Every task YAML under ``eval.include_path`` is UTF-8 and parses: lm-eval skips one that does
    not without a word, and the eval then fails much later saying the task is unknown."""
    from moeprune.userfile import UserFileError, read_yaml

    include = recipe.include_path
    if include is None or not include.is_dir():
        return  # check_recipe_inputs names a missing directory
    for path in sorted(p for p in include.rglob("*") if p.suffix in (".yaml", ".yml")):
        try:
            read_yaml(path, "task YAML")
        except UserFileError as exc:
            report.errors.append(f"field 'eval.include_path' = {json.dumps(recipe.eval.include_path)}: {exc}")


def check_kld_text(recipe: Recipe, report: PreflightReport) -> None:
    """The held-out text is UTF-8 text with something in it: llama-perplexity would score the bytes
    of another encoding as whatever tokens they happen to make."""
    from moeprune.userfile import UserFileError, read_text

    path = recipe.kld_text_path
    if path is None:
        return
    field = f"field 'kld.text' = {json.dumps(recipe.kld.text)}"
    try:
        text = read_text(path, "held-out text")
    except UserFileError as exc:
        report.errors.append(f"{field}: {exc}")
        return
    if not text.strip():
        report.errors.append(f"{field}: {path} is empty; point it at a held-out plain-text file")


def check_recalibrate_objective(recipe: Recipe, report: PreflightReport) -> None:
    """``recalibrate.objective = "model-kl"`` runs only on a family whose router the relaxed top-k
    reproduces (the adapter's ``relaxed_top_k_router``): refused here, not after the profile."""
    from moeprune.arch import arch_for_config

    if not (recipe.recalibrate.enabled and recipe.recalibrate.objective == "model-kl"):
        return
    found = _moe_base(recipe, report)
    if found is None:
        return
    config, base_dir, _, _ = found
    try:
        arch = arch_for_config(config, base_dir / "config.json")
    except MoepruneError:
        return  # check_moe_model says why
    if not arch.relaxed_top_k_router:
        _add(report, f"field 'recalibrate.objective' = \"model-kl\": the {arch.family} router has no relaxed top-k "
                     "in moeprune (Gemma 4 only); use objective = \"layer-mse\"")


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


def check_rpc_workers(recipe: Recipe, report: PreflightReport) -> None:
    """Each ``serve.rpc`` worker answers, speaks the pinned build's RPC protocol, runs the same
    llama.cpp build as this node (source and the flags that must agree: the build record it serves on
    its build port), and together they have the memory the plan says the offloaded layers need: of
    the largest GGUF the run serves through them, phase 1's included (moeprune.llamacpp.rpc says
    what may differ and why)."""
    from moeprune.llamacpp.build import resolve_build
    from moeprune.llamacpp.rpc import (RpcWorkerError, build_identity, build_problem, fetch_build, pinned_protocol,
                                       probe, worker_problems)
    from moeprune.plan.gather import phase1_offload_bytes, served_offload_bytes

    if not recipe.serve.rpc:
        return
    if recipe.serve.n_gpu_layers == 0:
        report.errors.append("field 'serve.rpc': serve.n_gpu_layers = 0 offloads no layer, so the workers would "
                             "hold nothing; set serve.n_gpu_layers (99: every layer)")
        return
    infos = []
    for endpoint in recipe.serve.rpc:
        try:
            infos.append(probe(endpoint))
        except RpcWorkerError as exc:
            report.errors.append(str(exc))
    if not infos:
        return  # nothing answered: each worker has its line already
    try:  # this node's build as it is (or would be) built: nothing is compiled here
        source, flags, _, key = resolve_build(recipe.llamacpp)
        protocol = pinned_protocol(source.root)
        needs = [need for need in (served_offload_bytes(recipe), phase1_offload_bytes(recipe)) if need is not None]
        need = max(needs) if needs else None
    except MoepruneError as exc:
        report.errors.append(str(exc))
        return
    head = build_identity(key, source.record.get("llama_cpp_commit"), source.pin_sha256, flags, None)
    for info in infos:
        try:
            problem = build_problem(info.endpoint, head, fetch_build(info.endpoint))
        except RpcWorkerError as exc:
            problem = str(exc)
        if problem is not None:
            report.errors.append(problem)
    report.errors.extend(worker_problems(infos, protocol, need))


Check = Callable[[Recipe, PreflightReport], None]
CHECKS: dict[str, Check] = {
    "gpu-build": check_gpu_build,
    "slots": check_slots,
    "moe-model": check_moe_model,
    "expert-shapes": check_expert_shapes,
    "drop-counts": check_drop_counts,
    "convertible": check_convertible,
    "calibration": check_calibration,
    "eval-tasks": check_eval_tasks,
    "kld-text": check_kld_text,
    "revision": check_revision,
    "recalibrate-objective": check_recalibrate_objective,
    "rpc-workers": check_rpc_workers,
}
# Which checks a stage (or task) needs before its first real work.
STAGE_CHECKS: dict[str, tuple[str, ...]] = {
    "profile": ("revision", "moe-model", "expert-shapes", "calibration", "rpc-workers-if-phase1-rpc"),
    "dropmap": ("revision", "moe-model", "drop-counts"),
    "prune": ("revision", "moe-model", "expert-shapes"),
    "recalibrate": ("moe-model", "recalibrate-objective"),
    "convert-base": ("revision", "convertible"),
    "convert-pruned": ("convertible",),
    "convert-plain": ("convertible",),
    "quantize-base": ("calibration-if-imatrix",),
    "quantize-pruned": ("calibration-if-imatrix",),
    "quantize-plain": ("calibration-if-imatrix",),
    "serve": ("gpu-build", "slots", "rpc-workers-if-rpc"),
    "eval": ("gpu-build", "slots", "eval-tasks", "rpc-workers-if-rpc"),
    "eval-base": ("gpu-build", "slots", "eval-tasks", "rpc-workers-if-rpc"),
    "eval-pruned": ("gpu-build", "slots", "eval-tasks", "rpc-workers-if-rpc"),
    "eval-plain": ("gpu-build", "slots", "eval-tasks", "rpc-workers-if-rpc"),
    "kld": ("kld-text", "rpc-workers-if-rpc"),
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
            elif name == "rpc-workers-if-rpc":
                if recipe.serve.rpc:
                    wanted.add("rpc-workers")
            elif name == "rpc-workers-if-phase1-rpc":  # phase 1's llama-server takes serve.rpc too
                if recipe.serve.rpc and recipe.profile.generate == "llama-server":
                    wanted.add("rpc-workers")
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
        raise PreflightError(report.failure(recipe.source_path or "<recipe>"))
    return report
