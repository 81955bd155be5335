"""Expert pruning as streaming checkpoint surgery.

The model family's adapter (:mod:`moeprune.arch`) says which tensors are indexed by expert. Fused
expert tensors and router tensors (weight rows, biases, correction biases, per-expert scales) are
sliced along their expert axis (dimension 0) by each MoE layer's sorted keep indices; in a
per-expert layout the kept experts' tensors are copied under their new index and the dropped
ones left out. Every other tensor (attention, dense MLP, shared experts, norms, embeddings, vision
and audio towers) is copied byte for byte. Slices of a contiguous row-major tensor along dim 0 are
contiguous byte runs, so the surgery never decodes a tensor: it copies byte ranges from the base
shards into the output shards, one tensor at a time, and memory stays flat however large the model is.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.arch import ArchError, ModelSpec, MoeArch, read_config
from moeprune.arch.base import EXPERT, ExpertTensor
from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import INDEX_NAME, SINGLE_FILE_NAME, Checkpoint, TensorInfo
from moeprune.dropmap.types import DropMap
from moeprune.io.writer import ShardedWriter

DROP_MAP_NAME = "expert_drop_metadata.json"

# Companion files copied unchanged from the base model directory (names or glob patterns).
COMPANION_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
)


class PruneError(MoepruneError):
    """A prune that cannot be done as asked (bad drop map, unsupported checkpoint)."""


@dataclass(frozen=True)
class PrunePlan:
    """What the surgery will do: validated against both the checkpoint and the drop map."""

    num_experts: int
    num_experts_kept: int
    keep_by_layer: dict[int, list[int]]
    sliced: dict[str, int]  # fused tensor name -> MoE layer index (sliced on the expert axis)
    arch: MoeArch | None = None
    per_expert: dict[str, ExpertTensor] | None = None  # per-expert tensors (kept ones renamed, dropped ones left out)

    def output_shape(self, info: TensorInfo) -> tuple[int, ...]:
        if info.name in self.sliced:
            return (self.num_experts_kept, *info.shape[1:])
        return info.shape

    def output_name(self, name: str) -> str | None:
        """The tensor's name in the pruned checkpoint; None for a dropped expert's tensor."""
        tensor = (self.per_expert or {}).get(name)
        if tensor is None:
            return name
        keep = self.keep_by_layer[tensor.layer]
        if tensor.expert not in keep:
            return None
        return tensor.renamed(keep.index(tensor.expert))


def spec_of(config: dict[str, Any], source: Path | str) -> ModelSpec:
    """The :class:`ModelSpec` of a config dict (PruneError for an unknown family)."""
    try:
        return ModelSpec.from_config(config, source)
    except ArchError as exc:
        raise PruneError(str(exc)) from None


def config_num_experts(config: dict[str, Any], source: Path | str) -> int:
    spec = spec_of(config, source)
    try:
        return spec.num_experts
    except ArchError as exc:
        raise PruneError(str(exc)) from None


def pruned_config(config: dict[str, Any], num_experts_kept: int) -> dict[str, Any]:
    """A copy of ``config`` with the expert count set to ``num_experts_kept``."""
    return spec_of(config, "config.json").with_num_experts(num_experts_kept)


def read_model_config(path: Path, what: str) -> dict[str, Any]:
    return read_config(path, what, PruneError)


def load_drop_map_file(path: Path) -> DropMap:
    """The drop map, schema- and invariant-checked by the drop-map stage's loader."""
    from moeprune.dropmap.io import load_drop_map

    return load_drop_map(path)


def moe_expert_tensors(checkpoint: Checkpoint, arch: MoeArch) -> dict[str, ExpertTensor]:
    """Expert-indexed tensors of the text model, by name. Refuses unknown ones."""
    found: dict[str, ExpertTensor] = {}
    for info in checkpoint.tensors():
        try:
            tensor = arch.classify_tensor(info.name)
        except ArchError as exc:
            raise PruneError(f"{checkpoint.directory}: {exc}") from None
        if tensor is not None:
            found[info.name] = tensor
    return found


def check_experts_match_config(checkpoint: Checkpoint, config: dict[str, Any], config_path: Path
                               ) -> tuple[MoeArch, int, dict[str, ExpertTensor], list[int]]:
    """The expert tensors (headers only) agree with the config's expert count, layer by layer.

    Returns (adapter, expert count, expert tensors by name, MoE layers). Raises PruneError naming
    the config key, its value and the tensor shape found: prune's own check, which ``invoke check``
    runs too, so a config that disagrees with its checkpoint is refused before any work.
    """
    spec = spec_of(config, config_path)
    arch = spec.adapter
    num_experts = config_num_experts(config, config_path)
    key = spec.num_experts_path
    expert_tensors = moe_expert_tensors(checkpoint, arch)
    if not expert_tensors:
        labels = ", ".join(p.label for p in arch.expert_patterns)
        raise PruneError(f"{checkpoint.directory}: no {arch.family} expert tensors ({labels}) found")
    moe_layers = sorted({t.layer for t in expert_tensors.values()})
    for layer in moe_layers:
        tensors = [t for t in expert_tensors.values() if t.layer == layer]
        present = {t.label for t in tensors}
        missing = [label for label in arch.required_labels({t.role for t in tensors}) if label not in present]
        if missing:
            raise PruneError(f"{checkpoint.directory}: MoE layer {layer} lacks tensor(s) {', '.join(missing)}")
        for label in sorted({t.label for t in tensors if t.role == EXPERT}):
            experts = sorted(t.expert for t in tensors if t.label == label)
            if experts != list(range(num_experts)):
                raise PruneError(
                    f"{config_path}: {key} = {num_experts} but MoE layer {layer} of {checkpoint.directory} has "
                    f"'{label}' for experts {_brief(experts)}; the checkpoint and its config disagree: fix "
                    f"{key} or re-download the model"
                )
    for name, tensor in expert_tensors.items():
        if tensor.role == EXPERT:
            continue
        info = checkpoint[name]
        if tensor.axis != 0:
            raise PruneError(f"{info.shard}: tensor '{name}' has its experts on axis {tensor.axis}; only axis 0 is supported")
        if not info.shape or info.shape[0] != num_experts:
            raise PruneError(
                f"{config_path}: {key} = {num_experts} but tensor '{name}' ({info.shard.name}) has shape "
                f"{list(info.shape)}, {info.shape[0] if info.shape else 0} experts on axis 0; the checkpoint "
                f"and its config disagree: fix {key} or re-download the model"
            )
    return arch, num_experts, expert_tensors, moe_layers


def plan_prune(checkpoint: Checkpoint, config: dict[str, Any], config_path: Path,
               drop_map: DropMap, drop_map_path: Path) -> PrunePlan:
    """Check that the drop map fits this checkpoint and say which tensors get which rows."""
    arch, num_experts, expert_tensors, moe_layers = check_experts_match_config(checkpoint, config, config_path)

    if drop_map.num_experts != num_experts:
        raise PruneError(
            f"{drop_map_path}: drop map is for {drop_map.num_experts} experts per layer but the checkpoint "
            f"{checkpoint.directory} has {num_experts}; it was made for another model: rebuild it "
            "from this model's profile"
        )
    map_layers = drop_map.moe_layers
    if map_layers != moe_layers:
        raise PruneError(
            f"{drop_map_path}: drop map covers MoE layers {_brief(map_layers)} but the checkpoint "
            f"{checkpoint.directory} has MoE layers {_brief(moe_layers)}; it was made for another "
            "model: rebuild it from this model's profile"
        )
    counts = {entry.layer: len(entry.keep) for entry in drop_map.layers}
    if not drop_map.uniform:
        shown = ", ".join(f"layer {layer}: {count}" for layer, count in list(counts.items())[:6])
        raise PruneError(
            f"{drop_map_path}: non-uniform drop map (strategy '{drop_map.strategy_name}'; kept experts per layer: {shown}"
            f"{', ...' if len(counts) > 6 else ''}). A {arch.family} config has one {arch.num_experts_key} for all "
            "layers, so transformers and llama.cpp could not load the result; build a uniform drop map "
            "(dropmap.strategy = 'uniform-min-retention' or 'uniform-count')"
        )
    try:
        spec_of(config, config_path).check_drop_map(drop_map, drop_map_path)
    except ArchError as exc:
        raise PruneError(str(exc)) from None
    kept = int(drop_map.num_experts_kept)  # a uniform map states its one count (checked when loaded)
    sliced = {name: t.layer for name, t in expert_tensors.items() if t.role != EXPERT}
    per_expert = {name: t for name, t in expert_tensors.items() if t.role == EXPERT}
    return PrunePlan(num_experts=num_experts, num_experts_kept=kept, keep_by_layer=drop_map.keep_by_layer,
                     sliced=sliced, arch=arch, per_expert=per_expert)


def _brief(values: list[Any]) -> str:
    if len(values) <= 8:
        return str(list(values))
    return f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)} layers)"


def companion_files(base_dir: Path) -> list[Path]:
    """Tokenizer, chat template, generation and processor configs present in ``base_dir``."""
    found: dict[str, Path] = {}
    for pattern in COMPANION_PATTERNS:
        for path in sorted(base_dir.glob(pattern)):
            if path.is_file():
                found[path.name] = path
    return [found[name] for name in sorted(found)]


def prune_checkpoint(base_dir: str | Path, drop_map_path: str | Path, out_dir: str | Path,
                     max_shard_bytes: int, *, fsync: bool = True) -> dict[str, Any]:
    """Write ``out_dir``: the base checkpoint with only the drop map's kept experts.

    Streams tensor by tensor; writes atomically (no ``out_dir`` appears on failure; an existing
    one is replaced only on success). Returns a record of what was done.
    """
    started = time.monotonic()
    base_dir, drop_map_path, out_dir = Path(base_dir), Path(drop_map_path), Path(out_dir)
    if out_dir.resolve() == base_dir.resolve():
        raise PruneError(f"output directory {out_dir} is the base model directory; choose another --out")
    config_path = base_dir / "config.json"
    config = read_model_config(config_path, "model config")
    drop_map = load_drop_map_file(drop_map_path)
    with Checkpoint.open(base_dir) as checkpoint:
        plan = plan_prune(checkpoint, config, config_path, drop_map, drop_map_path)
        companions = companion_files(base_dir)
        sliced_nbytes = copied_nbytes = 0
        with ShardedWriter(out_dir, max_shard_bytes, fsync=fsync) as writer:
            for info in checkpoint.tensors():
                layer = plan.sliced.get(info.name)
                if layer is None:
                    name = plan.output_name(info.name)
                    if name is None:  # a dropped expert's own tensor (per-expert layout)
                        continue
                    writer.add(name, info.dtype, info.shape, checkpoint.source(info))
                    copied_nbytes += info.nbytes
                else:
                    source = checkpoint.rows_source(info, plan.keep_by_layer[layer])
                    writer.add(info.name, info.dtype, plan.output_shape(info), source)
                    sliced_nbytes += source.nbytes
            staging = writer.staging_dir
            with open(staging / "config.json", "w", encoding="utf-8") as handle:
                json.dump(pruned_config(config, plan.num_experts_kept), handle, indent=2)
                handle.write("\n")
            for path in companions:
                shutil.copyfile(path, staging / path.name)
            shutil.copyfile(drop_map_path, staging / DROP_MAP_NAME)  # byte for byte: its hash stays valid
    return {
        "base_dir": str(base_dir),
        "drop_map": str(drop_map_path),
        "out_dir": str(out_dir),
        "num_experts": plan.num_experts,
        "num_experts_kept": plan.num_experts_kept,
        "moe_layers": sorted(plan.keep_by_layer),
        "tensors": len(checkpoint.names()),
        "tensors_sliced": len(plan.sliced) + len(plan.per_expert or {}),
        "base_total_size": checkpoint.total_nbytes,
        "total_size": writer.total_size,
        "sliced_bytes": sliced_nbytes,
        "copied_bytes": copied_nbytes,
        "max_shard_bytes": max_shard_bytes,
        "shards": writer.shard_names,
        "files_copied": [p.name for p in companions] + [DROP_MAP_NAME],
        "elapsed_s": round(time.monotonic() - started, 3),
    }


def run_prune(recipe: Any, layout: Any, *, base_dir: Path | None = None, drop_map_path: Path | None = None,
              out_dir: Path | None = None, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """The prune stage (the pipeline's and `invoke prune`'s): recipe base model + run drop map ->
    ``layout.pruned_dir``; each of them can be overridden (`invoke prune --base/--drop-map/--out`)."""
    return prune_checkpoint(base_dir or resolve_base_dir(recipe), drop_map_path or layout.drop_map_path,
                            out_dir or layout.pruned_dir, max_shard_bytes or recipe.prune.max_shard_bytes)


def resolve_base_dir(recipe: Any) -> Path:
    """Local directory of the recipe's base model (a local path, or a Hub snapshot already cached)."""
    from moeprune.base_model import resolve_base

    return resolve_base(recipe, download=False).local_dir


__all__ = [
    "DROP_MAP_NAME",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "PruneError",
    "PrunePlan",
    "companion_files",
    "plan_prune",
    "prune_checkpoint",
    "pruned_config",
    "run_prune",
]
