"""The plan of one recipe's run directory: shapes, what exists, what will run, and the free space.

:func:`run_plan` gathers the inputs (headers only, no tensor is read, nothing is downloaded) and
returns one :class:`~moeprune.plan.disk.StagePlan` per stage; :func:`shortfall` (the free space,
read in :func:`free_bytes` only) is what ``invoke reproduce`` refuses on before its first stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.kld.paths import kld_work_dir
from moeprune.layout import RunLayout
from moeprune.plan.disk import GB, Free, Shortfall, StagePlan, Write, first_shortfall, human, plan_lines
from moeprune.plan.ggml import GgufTensor, QuantModel, allows_quantization, gguf_bytes, quantized_types, tensor_bytes
from moeprune.plan.shapes import (ModelShapes, gguf_tensors, has_vision_tower, known_shapes, mmproj_tensors,
                                  model_facts, n_gqa, pruned_shapes, read_shapes)


class DiskPlanError(MoepruneError):
    """The run's filesystems cannot hold what the stages that remain will write."""


class ShapesUnknownError(MoepruneError):
    """The base is not on disk and no pinned config gives its shapes."""


@dataclass(frozen=True)
class BaseShapes:
    shapes: ModelShapes
    download_bytes: int  # what the HF cache must still download (0 when the base is on disk)


def base_shapes(recipe: Any) -> BaseShapes | None:
    """The base's shapes: its headers when it is on disk (local or in the HF cache), else the
    tensors of its Hub id's pinned config (and the download it implies); None when neither exists."""
    from moeprune.base_model import BaseModelError, resolve_base

    try:
        return BaseShapes(read_shapes(resolve_base(recipe, download=False).local_dir), 0)
    except BaseModelError:
        if recipe.base_is_local:
            return None
    known = known_shapes(recipe.model.base)
    return BaseShapes(known, known.total_bytes) if known is not None else None


def hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def existing_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a directory; 0 when absent."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _kept_by_layer(recipe: Any, layout: RunLayout, config: dict[str, Any], dropmap_runs: bool
                   ) -> tuple[dict[int, int], int, bool]:
    """(experts kept per MoE layer, experts per layer, whether that is only an upper bound)."""
    facts = model_facts(config)
    num_experts = facts.num_experts
    if not dropmap_runs and layout.drop_map_path.is_file():
        drop_map = json.loads(layout.drop_map_path.read_text(encoding="utf-8"))
        return {int(e["layer"]): len(e["keep"]) for e in drop_map["layers"]}, num_experts, False
    keep = recipe.dropmap.keep_count if recipe.dropmap.strategy == "uniform-count" else None
    layers = facts.moe_layers
    if keep is not None:
        return dict.fromkeys(layers, keep), num_experts, False
    return dict.fromkeys(layers, num_experts), num_experts, True  # not chosen yet: at most all of them


def quant_model(shapes: ModelShapes, tensors: Sequence[Any], experts: int) -> QuantModel:
    """What llama-quantize's rules read of the model whose converted ``tensors`` it quantizes."""
    return QuantModel(n_layer=model_facts(shapes.config).num_layers, n_expert=experts,
                      n_gqa=n_gqa(tensors))


def gguf_size(shapes: ModelShapes, outtype: str, qtype: str | None, experts: int) -> int:
    """Tensor data bytes of the GGUF the pinned tools make of ``shapes``: converted at ``outtype``,
    then quantized to ``qtype`` (None: the converted file itself)."""
    tensors = gguf_tensors(shapes, outtype)
    types = ([t.gguf_type for t in tensors] if qtype is None
             else quantized_types(tensors, qtype, quant_model(shapes, tensors, experts)))
    return gguf_bytes(tensors, types)


def kld_reference_bytes(n_vocab: int, chunks: int, ctx_size: int) -> int:
    """llama-perplexity's ``--kl-divergence-base`` file: a 20-byte header, the chunks' tokens (int32),
    then per scored token (the second half of each chunk) ``nv`` uint16 log-probabilities,
    ``nv = 2 * ((n_vocab + 1) // 2) + 4`` (tools/perplexity/perplexity.cpp). The stage runs one
    spare chunk (moeprune.llamacpp.perplexity.SPARE_CHUNKS)."""
    from moeprune.llamacpp.perplexity import SPARE_CHUNKS, scored_tokens

    run_chunks = chunks + SPARE_CHUNKS
    nv = 2 * ((n_vocab + 1) // 2) + 4
    return 20 + run_chunks * ctx_size * 4 + scored_tokens(run_chunks, ctx_size) * nv * 2


def _vocab(shapes: ModelShapes) -> int:
    embed = [t for t in shapes.tensors if t.name.endswith("embed_tokens.weight") and "vision" not in t.name]
    if not embed:
        raise MoepruneError(f"{shapes.source}: no embed_tokens tensor, so the vocabulary size is unknown")
    return embed[0].shape[0]


def offloaded_bytes(gguf: int, n_gpu_layers: int, num_layers: int) -> int:
    """The offloaded layers' share of a served GGUF (on the GPU, or on the serve.rpc workers)."""
    share = min(max(n_gpu_layers, 0), num_layers) / num_layers if num_layers else 0.0
    return int(gguf * share)


def served_offload_bytes(recipe: Any) -> int | None:
    """What the largest GGUF a recipe serves (the base's eval quant; with KLD, its converted file)
    puts on the offload devices, KV cache not counted; None when the base's shapes are unknown."""
    found = base_shapes(recipe)
    if found is None:
        return None
    base, quantize = found.shapes, recipe.quantize
    facts = model_facts(base.config)
    sizes = [gguf_size(base, quantize.convert_outtype, qtype, facts.num_experts)
             for qtype in ([quantize.eval_type] + ([None] if recipe.kld.enabled else []))]
    return offloaded_bytes(max(sizes), recipe.serve.n_gpu_layers, facts.num_layers)


def phase1_offload_bytes(recipe: Any) -> int | None:
    """What phase 1's llama-server (``profile.generate = "llama-server"``) puts on the offload devices:
    the offloaded layers' share of ``profile.generate_gguf``; None when phase 1 serves nothing or the
    file or the base's shapes are not there yet."""
    path = recipe.generate_gguf_path if recipe.profile.generate == "llama-server" else None
    found = base_shapes(recipe) if path is not None and path.is_file() else None
    if path is None or found is None:
        return None
    num_layers = model_facts(found.shapes.config).num_layers
    return offloaded_bytes(path.stat().st_size, recipe.profile.generate_n_gpu_layers, num_layers)


def _served_memory(gguf: int, n_gpu_layers: int, num_layers: int) -> str:
    """A llama.cpp tool's weights: the GGUF, memory-mapped; the offloaded layers' share in VRAM."""
    on_gpu = offloaded_bytes(gguf, n_gpu_layers, num_layers)
    if not on_gpu:
        return f"RAM {human(gguf)} (the GGUF, mapped) + KV cache"
    on_cpu = f", RAM {human(gguf - on_gpu)}" if gguf > on_gpu else ""
    return f"VRAM {human(on_gpu)} (n_gpu_layers={n_gpu_layers}) + KV cache{on_cpu}"


# Stages that load no model: JSON, plots, file digests.
_SMALL_MEMORY = "small (no model loaded)"
_STREAMED = "small (tensors streamed in chunks)"


def _largest(tensors: Sequence[GgufTensor]) -> GgufTensor:
    return max(tensors, key=lambda t: t.numel)


def _convert_memory(shapes: ModelShapes, outtype: str) -> str:
    """The pinned converter writes one tensor at a time: it widens each to F32 and writes it at
    ``outtype``, so its peak is about the largest tensor at 4 + outtype bytes per element."""
    return _convert_memory_of(gguf_tensors(shapes, outtype), outtype)


def _convert_memory_of(tensors: Sequence[GgufTensor], outtype: str) -> str:
    big = _largest(tensors)
    per_element = 4 + tensor_bytes(outtype.upper(), 1, 1)
    return f"RAM ~{human(big.numel * per_element)} (largest tensor {big.name} at F32 + {outtype.upper()})"


def _quantize_memory(shapes: ModelShapes, outtype: str) -> str:
    """llama-quantize memory-maps its input and keeps two buffers of 4 bytes per element of the
    largest tensor it quantizes (the tensor widened to F32, and the output; ``llama-quant.cpp``:
    ``f32_conv_buf``, ``work``), reused from tensor to tensor."""
    big = _largest([t for t in gguf_tensors(shapes, outtype) if allows_quantization(t)])
    return f"RAM ~{human(big.numel * 8)} (largest tensor {big.name}: F32 copy + output buffer)"


def profile_memory(recipe: Any, base: ModelShapes) -> str:
    """The profile's peak per phase from its memory plan (the profile stage refuses a plan that
    does not fit); before the download only the weights' size is known (the plan needs the
    base's tokenizer to size the prompts)."""
    from moeprune.profile.memory_plan import GIB, plan_for_recipe

    try:
        plan = plan_for_recipe(recipe)
    except MoepruneError as exc:
        return f"not estimated ({exc})"
    if plan is None:
        return (f"the memory plan runs once the base is downloaded (it needs the tokenizer); "
                f"the weights alone are {human(base.total_bytes)}")
    return "; ".join(f"{p.name} {p.peak_bytes / GIB:.2f} GiB on {p.device}" for p in plan.phases)


def _recalibrate_memory(recipe: Any, base: ModelShapes, pruned: ModelShapes) -> str:
    """``layer-mse`` replays one decoder layer at a time, as the streamed profile; ``model-kl``
    holds the base and the pruned model whole, in float32 on the CPU, with the activations of one
    batch and their gradients on top."""
    if recipe.recalibrate.objective == "model-kl":
        return (f"RAM ~{human((base.num_params + pruned.num_params) * 4)} + one batch's activations (objective "
                f"'model-kl': the base and the pruned model whole, float32, CPU)")
    return "one decoder layer and its calibration hidden states at a time (objective 'layer-mse', streamed replay)"


def _time(entry: dict[str, Any] | None, new_bytes: int, old_bytes: int) -> str:
    """An estimate only from a measured rate: this stage's duration in the run's lock, scaled by
    the bytes it will write against those its last run wrote."""
    duration = (entry or {}).get("duration_s")
    if duration is None:
        return "no measured rate"
    if new_bytes and old_bytes:
        return f"~{duration * new_bytes / old_bytes:.0f} s (last run: {duration:.0f} s for {human(old_bytes)})"
    return f"~{duration:.0f} s (last run)"


def run_plan(recipe: Any, layout: RunLayout, will_run: Collection[str], stage_names: Sequence[str],
             lock_entries: dict[str, dict[str, Any]] | None = None) -> list[StagePlan]:
    """One plan per stage of ``stage_names`` (those not in ``will_run`` write nothing)."""
    found = base_shapes(recipe)
    if found is None:
        raise ShapesUnknownError(f"model.base = {recipe.model.base!r} is not on disk and has no pinned config "
                                 "under moeprune/plan/known/: its shapes are known only once the profile stage "
                                 "downloads it")
    base, quantize, entries = found.shapes, recipe.quantize, lock_entries or {}
    kept, num_experts, bound = _kept_by_layer(recipe, layout, base.config, "dropmap" in will_run)
    if not bound and "prune" not in will_run and layout.pruned_dir.is_dir():
        pruned = read_shapes(layout.pruned_dir)
    else:
        pruned = pruned_shapes(base, num_experts, kept)
    num_layers = model_facts(base.config).num_layers
    models = {"base": (base, num_experts, False), "pruned": (pruned, max(kept.values(), default=num_experts), bound)}

    def write(what: str, path: Path, new: int, is_bound: bool = False) -> Write:
        return Write(what, path, new, existing_bytes(path), is_bound)

    writes: dict[str, list[Write]] = {name: [] for name in stage_names}
    memory: dict[str, str] = {"profile": profile_memory(recipe, base) if "profile" in will_run else "",
                              "prune": _STREAMED, "kld": _SMALL_MEMORY,
                              **dict.fromkeys(("dropmap", "results", "card", "manifest"), _SMALL_MEMORY)}
    if found.download_bytes:
        writes["profile"].append(Write(f"download of {recipe.model.base} to the HF cache", hf_cache_dir(),
                                       found.download_bytes))
    writes["prune"].append(write("pruned checkpoint", layout.pruned_dir, pruned.total_bytes, bound))
    if recipe.recalibrate.enabled:  # the pruned checkpoint again, its router tensors refitted
        writes["recalibrate"].append(write("recalibrated checkpoint", layout.recalibrated_dir, pruned.total_bytes, bound))
        memory["recalibrate"] = _recalibrate_memory(recipe, base, pruned)
        models["plain"] = models["pruned"]  # the pruned checkpoint before recalibration, measured beside it
    else:
        memory["recalibrate"] = "none ([recalibrate] is off: the stage writes nothing)"
        memory.update(dict.fromkeys((f"{kind}-plain" for kind in ("convert", "quantize", "eval")),
                                    "none ([recalibrate] is off: no plain pruned model to measure)"))
    for which, (shapes, experts, is_bound) in models.items():
        converted = layout.gguf_path(which, quantize.convert_outtype)  # type: ignore[arg-type]
        writes[f"convert-{which}"].append(write(converted.name, converted,
                                                gguf_size(shapes, quantize.convert_outtype, None, experts), is_bound))
        for qtype in quantize.types:
            path = layout.gguf_path(which, qtype)  # type: ignore[arg-type]
            writes[f"quantize-{which}"].append(
                write(path.name, path, gguf_size(shapes, quantize.convert_outtype, qtype, experts), is_bound))
        memory[f"convert-{which}"] = _convert_memory(shapes, quantize.convert_outtype)
        memory[f"quantize-{which}"] = _quantize_memory(shapes, quantize.convert_outtype)
        eval_gguf = gguf_size(shapes, quantize.convert_outtype, quantize.eval_type, experts)
        memory[f"eval-{which}"] = _served_memory(eval_gguf, recipe.serve.n_gpu_layers, num_layers)
    if has_vision_tower(base.config):
        projector = layout.mmproj_path(quantize.convert_outtype)
        tensors = mmproj_tensors(base, quantize.convert_outtype)
        writes["mmproj"].append(write(f"vision projector {projector.name}", projector,
                                      gguf_bytes(tensors, [t.gguf_type for t in tensors])))
        memory["mmproj"] = _convert_memory_of(tensors, quantize.convert_outtype)
    if recipe.kld.enabled:
        work = kld_work_dir(recipe, layout)
        writes["kld"].append(Write("reference log-probabilities", work / "reference.kld",
                                   kld_reference_bytes(_vocab(base), recipe.kld.chunks, recipe.kld.ctx_size)))
        own = {t.upper() for t in quantize.types}  # a rival the run quantized already is its own file
        for qtype in (t for t in recipe.kld.rival_types if t.upper() not in own):
            path = work / f"base-{qtype.upper()}.gguf"
            writes["kld"].append(Write(f"rival {path.name}", path,
                                       gguf_size(base, quantize.convert_outtype, qtype, num_experts),
                                       existing_bytes(path), transient=recipe.disk.delete_intermediates))
        memory["kld"] = _served_memory(gguf_size(base, quantize.convert_outtype, None, num_experts),
                                       recipe.serve.n_gpu_layers, num_layers)
    frees = _frees(recipe, layout, will_run, {w.path: w.new_bytes for ws in writes.values() for w in ws})
    plans = []
    for name in stage_names:
        runs = name in will_run
        stage_writes = tuple(writes.get(name, ()))
        new = sum(w.new_bytes for w in stage_writes)
        old = sum(w.old_bytes for w in stage_writes)
        notes = (f"shapes: {base.source}",) if name == "profile" and found.download_bytes else ()
        plans.append(StagePlan(name, runs, stage_writes, memory.get(name, ""),
                               _time(entries.get(name), new, old) if runs else "", notes, frees.get(name, ())))
    return plans


def _frees(recipe: Any, layout: RunLayout, will_run: Collection[str], planned: dict[Path, int]
           ) -> dict[str, tuple[Free, ...]]:
    """{stage: files deleted once it has finished} under ``[disk] delete_intermediates``
    (moeprune.deleted): each intermediate at its planned size when its stage runs, else as on disk."""
    from moeprune.deleted import intermediates, last_reader

    freed = tuple(Free(path.name, path, planned[path] if path in planned and _made(path, layout, will_run)
                       else existing_bytes(path)) for path in intermediates(recipe, layout))
    return {last_reader(recipe): freed} if freed else {}


def _made(path: Path, layout: RunLayout, will_run: Collection[str]) -> bool:
    """Whether the stage that writes the converted GGUF ``path`` runs (convert-<role>)."""
    return f"convert-{layout.gguf_role(path.name)}" in will_run


# --- the free space --------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    probe = Path(os.path.abspath(path))
    while not probe.exists():
        probe = probe.parent
    return probe


def filesystem_of(path: Path) -> str:
    """The filesystem ``path`` is (or will be) on, named by its nearest existing ancestor's device."""
    return str(_existing_ancestor(path).stat().st_dev)


def free_bytes(paths: Sequence[Path]) -> tuple[dict[str, int], dict[str, Path]]:
    """Free bytes (for an unprivileged writer) per filesystem of ``paths``, and a path on each: the
    one place the plan reads the free space."""
    free: dict[str, int] = {}
    where: dict[str, Path] = {}
    for path in paths:
        probe = _existing_ancestor(path)
        key = str(probe.stat().st_dev)
        if key not in free:
            stat = os.statvfs(probe)
            free[key], where[key] = stat.f_bavail * stat.f_frsize, probe
    return free, where


def shortfall(plans: Sequence[StagePlan]) -> tuple[Shortfall | None, dict[str, Path]]:
    paths = [w.path for p in plans if p.runs for w in p.writes]
    free, where = free_bytes(paths)
    return first_shortfall(plans, free, filesystem_of), where


def shortfall_message(found: Shortfall, where: dict[str, Path]) -> str:
    return (f"disk plan: stage '{found.stage}' would not fit: {where[found.filesystem]} has "
            f"{human(found.free_bytes)} free, the run needs {human(found.need_bytes)} there by the end of that "
            f"stage ({found.short_bytes} bytes = {found.short_bytes / GB:.2f} GB short); free space, or pass "
            "--ignore-disk-plan")


@dataclass(frozen=True)
class PlanReport:
    """What ``invoke check`` and ``invoke reproduce`` print of the plan, and why a run cannot start."""

    lines: tuple[str, ...]
    refusal: str | None  # the first stage that would not fit, in one line; None: it fits, or no plan


def plan_report(recipe: Any, layout: RunLayout, will_run: Collection[str], stage_names: Sequence[str],
                lock_entries: dict[str, dict[str, Any]] | None = None) -> PlanReport:
    """The plan's lines (one per stage, the total, the fit) and the refusal, if any. A base whose
    shapes cannot be known before its download gets one line saying so, and no refusal."""
    try:
        plans = run_plan(recipe, layout, will_run, stage_names, lock_entries)
    except ShapesUnknownError as exc:
        return PlanReport((f"  disk plan: not computed ({exc})",), None)
    found, where = shortfall(plans)
    if found is not None:
        message = shortfall_message(found, where)
        return PlanReport((*plan_lines(plans), "  " + message), message)
    places = ", ".join(str(p) for p in where.values()) or "nothing to write"
    return PlanReport((*plan_lines(plans), f"  disk plan: fits ({places})"), None)
