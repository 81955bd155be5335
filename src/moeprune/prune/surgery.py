"""Expert pruning as streaming checkpoint surgery.

For every MoE layer the four expert-indexed tensors are sliced along dimension 0 by the layer's
sorted keep indices: ``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I],
``router.proj.weight`` [E, H] and ``router.per_expert_scale`` [E]. Every other tensor (attention,
dense MLP, norms, embeddings, vision and audio towers) is copied byte for byte. Slices of a
contiguous row-major tensor along dim 0 are contiguous byte runs, so the surgery never decodes a
tensor: it copies byte ranges from the base shards into the output shards, one tensor at a time,
and memory stays flat however large the model is.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import INDEX_NAME, SINGLE_FILE_NAME, Checkpoint, TensorInfo
from moeprune.io.writer import ShardedWriter

DROP_MAP_NAME = "expert_drop_metadata.json"

# Tensors indexed by expert along dim 0, per MoE layer (Gemma 4 naming).
EXPERT_TENSOR_SUFFIXES: tuple[str, ...] = (
    "experts.gate_up_proj",
    "experts.down_proj",
    "router.proj.weight",
    "router.per_expert_scale",
)
_SUFFIX_ALTERNATIVES = "|".join(map(re.escape, EXPERT_TENSOR_SUFFIXES))
_EXPERT_TENSOR_RE = re.compile(
    r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<suffix>" + _SUFFIX_ALTERNATIVES + r")$"
)
# Any other tensor under a layer's experts module would be expert-indexed too (quantized
# scales, per-expert split weights): we must not copy those unsliced.
_OTHER_EXPERT_RE = re.compile(r"(?:^|\.)layers\.\d+\.experts\.")
# Multimodal towers have their own "layers.N" but never experts; skip them explicitly anyway.
_TOWER_MARKERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "vision_model", "audio_model")

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
    sliced: dict[str, int]  # tensor name -> MoE layer index

    def output_shape(self, info: TensorInfo) -> tuple[int, ...]:
        if info.name in self.sliced:
            return (self.num_experts_kept, *info.shape[1:])
        return info.shape


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text part of a (possibly multimodal) config: ``text_config`` if present, else the config."""
    nested = config.get("text_config")
    return nested if isinstance(nested, dict) else config


def config_num_experts(config: dict[str, Any], source: Path | str) -> int:
    value = text_config(config).get("num_experts")
    if not isinstance(value, int) or value < 1:
        raise PruneError(f"{source}: no integer num_experts (text_config.num_experts or num_experts); not an MoE model")
    return value


def pruned_config(config: dict[str, Any], num_experts_kept: int) -> dict[str, Any]:
    """A copy of ``config`` with the expert count set to ``num_experts_kept``."""
    updated = json.loads(json.dumps(config))
    text_config(updated)["num_experts"] = num_experts_kept
    return updated


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PruneError(f"{path}: {what} not found") from None
    except (OSError, ValueError) as exc:
        raise PruneError(f"{path}: {what} is not readable JSON ({exc})") from None
    if not isinstance(value, dict):
        raise PruneError(f"{path}: {what} must be a JSON object")
    return value


def load_drop_map_file(path: Path) -> dict[str, Any]:
    """The drop map, schema- and invariant-checked by the drop-map stage's loader."""
    from moeprune.dropmap.io import load_drop_map

    return load_drop_map(path)


def moe_expert_tensors(checkpoint: Checkpoint) -> dict[str, tuple[int, str]]:
    """Expert-indexed tensors of the text model: name -> (layer, suffix). Refuses unknown ones."""
    found: dict[str, tuple[int, str]] = {}
    for info in checkpoint.tensors():
        if any(marker in info.name for marker in _TOWER_MARKERS):
            continue
        match = _EXPERT_TENSOR_RE.match(info.name)
        if match:
            found[info.name] = (int(match["layer"]), match["suffix"])
        elif _OTHER_EXPERT_RE.search(info.name):
            raise PruneError(
                f"{checkpoint.directory}: unsupported expert tensor '{info.name}' (only fused bf16/fp "
                f"{', '.join(EXPERT_TENSOR_SUFFIXES[:2])} are supported; quantized or per-expert split "
                "checkpoints must be converted first)"
            )
    return found


def plan_prune(checkpoint: Checkpoint, config: dict[str, Any], config_path: Path,
               drop_map: dict[str, Any], drop_map_path: Path) -> PrunePlan:
    """Check that the drop map fits this checkpoint and say which tensors get which rows."""
    num_experts = config_num_experts(config, config_path)
    expert_tensors = moe_expert_tensors(checkpoint)
    if not expert_tensors:
        raise PruneError(f"{checkpoint.directory}: no expert tensors ({', '.join(EXPERT_TENSOR_SUFFIXES)}) found")
    moe_layers = sorted({layer for layer, _ in expert_tensors.values()})
    for layer in moe_layers:
        present = {suffix for lyr, suffix in expert_tensors.values() if lyr == layer}
        missing = [s for s in EXPERT_TENSOR_SUFFIXES if s not in present]
        if missing:
            raise PruneError(f"{checkpoint.directory}: MoE layer {layer} lacks tensor(s) {', '.join(missing)}")
    for name in expert_tensors:
        info = checkpoint[name]
        if not info.shape or info.shape[0] != num_experts:
            raise PruneError(
                f"{info.shard}: tensor '{name}' has shape {list(info.shape)} but {config_path} says "
                f"num_experts = {num_experts}; the checkpoint and its config disagree"
            )

    map_experts = drop_map.get("num_experts")
    if map_experts != num_experts:
        raise PruneError(
            f"{drop_map_path}: drop map is for {map_experts} experts per layer but the checkpoint "
            f"{checkpoint.directory} has {num_experts}; it was made for another model: rebuild it "
            "from this model's profile"
        )
    layers = drop_map.get("layers") or []
    map_layers = [entry.get("layer") for entry in layers]
    if map_layers != moe_layers:
        raise PruneError(
            f"{drop_map_path}: drop map covers MoE layers {_brief(map_layers)} but the checkpoint "
            f"{checkpoint.directory} has MoE layers {_brief(moe_layers)}; it was made for another "
            "model: rebuild it from this model's profile"
        )
    counts = {entry["layer"]: len(entry["keep"]) for entry in layers}
    if not drop_map.get("uniform", False) or len(set(counts.values())) != 1:
        strategy = (drop_map.get("strategy") or {}).get("name", "?")
        shown = ", ".join(f"layer {layer}: {count}" for layer, count in list(counts.items())[:6])
        raise PruneError(
            f"{drop_map_path}: non-uniform drop map (strategy '{strategy}'; kept experts per layer: {shown}"
            f"{', ...' if len(counts) > 6 else ''}). A Gemma 4 config has one num_experts for all layers, "
            "so transformers and llama.cpp could not load the result; build a uniform drop map "
            "(dropmap.strategy = 'uniform-min-retention' or 'uniform-count')"
        )
    kept = next(iter(counts.values()))
    if drop_map.get("num_experts_kept") != kept:
        stated = drop_map.get("num_experts_kept")
        raise PruneError(f"{drop_map_path}: num_experts_kept is {stated} but every layer keeps {kept}")
    keep_by_layer: dict[int, list[int]] = {}
    for entry in layers:
        keep = [int(i) for i in entry["keep"]]
        if keep != sorted(set(keep)) or not all(0 <= i < num_experts for i in keep):
            raise PruneError(
                f"{drop_map_path}: layer {entry['layer']}: keep indices must be sorted, unique and "
                f"in [0, {num_experts})"
            )
        keep_by_layer[int(entry["layer"])] = keep
    sliced = {name: layer for name, (layer, _) in expert_tensors.items()}
    return PrunePlan(num_experts=num_experts, num_experts_kept=kept, keep_by_layer=keep_by_layer, sliced=sliced)


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
    config = read_json(config_path, "model config")
    drop_map = load_drop_map_file(drop_map_path)
    with Checkpoint.open(base_dir) as checkpoint:
        plan = plan_prune(checkpoint, config, config_path, drop_map, drop_map_path)
        companions = companion_files(base_dir)
        sliced_nbytes = copied_nbytes = 0
        with ShardedWriter(out_dir, max_shard_bytes, fsync=fsync) as writer:
            for info in checkpoint.tensors():
                layer = plan.sliced.get(info.name)
                if layer is None:
                    writer.add(info.name, info.dtype, info.shape, checkpoint.source(info))
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
        "tensors_sliced": len(plan.sliced),
        "base_total_size": checkpoint.total_nbytes,
        "total_size": writer.total_size,
        "sliced_bytes": sliced_nbytes,
        "copied_bytes": copied_nbytes,
        "max_shard_bytes": max_shard_bytes,
        "shards": writer.shard_names,
        "files_copied": [p.name for p in companions] + [DROP_MAP_NAME],
        "elapsed_s": round(time.monotonic() - started, 3),
    }


def run_prune(recipe: Any, layout: Any) -> dict[str, Any]:
    """The pipeline's prune stage: recipe base model + run drop map -> ``layout.pruned_dir``."""
    base_dir = resolve_base_dir(recipe)
    return prune_checkpoint(base_dir, layout.drop_map_path, layout.pruned_dir, recipe.prune.max_shard_bytes)


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
