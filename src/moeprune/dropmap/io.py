"""Reading and writing drop maps (``expert_drop_metadata.json``), and model/profile checks.

The file format is the "Drop map" contract of the team notes, checked by
``schemas/drop_map.schema.json``; :func:`load_drop_map` also checks what a schema cannot say
(keep and drop complete and disjoint, counts consistent, the model it was made for).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeprune.arch import ArchError, ModelSpec, read_config
from moeprune.atomic import write_json
from moeprune.dropmap.select import DropMapError, Selection, meets_threshold, validate_keep_drop
from moeprune.dropmap.types import DropMap
from moeprune.schemas import validate

FORMAT_VERSION = 1


# --- the model's MoE shape ----------------------------------------------------------------------


def moe_shape(config: dict[str, Any], source: str | Path = "config.json") -> tuple[int, int, list[int]]:
    """(num_experts, top_k, MoE layer indices) of a Hugging Face config, as its :class:`ModelSpec` says."""
    try:
        return ModelSpec.from_config(config, source).moe_shape()
    except ArchError as exc:
        raise DropMapError(str(exc)) from None


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The ``config.json`` of a local model directory."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise DropMapError(f"{path}: not found; point model.base at a Hugging Face model directory")
    return read_config(path, "base model's config.json", DropMapError)


def check_profile_matches_model(
    layers: list[int], num_experts: int, config: dict[str, Any], profile_source: str | Path, config_source: str | Path
) -> None:
    """Refuse a profile made on another model: expert count and MoE layer list must match."""
    model_experts, _, model_layers = moe_shape(config, config_source)
    if num_experts != model_experts:
        raise DropMapError(
            f"{profile_source}: profile has {num_experts} experts per layer but the model "
            f"({config_source}) has {model_experts}: this profile is of another model; re-run the "
            "profile stage for this recipe"
        )
    if list(layers) != model_layers:
        raise DropMapError(
            f"{profile_source}: profile covers MoE layers {_short(layers)} but the model ({config_source}) "
            f"has MoE layers {_short(model_layers)}: this profile is of another model; re-run the profile stage"
        )


def _short(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{values[0]}..{values[-1]}] ({len(values)} layers)"


# --- building and writing ----------------------------------------------------------------------


def _fraction(value: float) -> float | None:
    # Not rounded: a layer just above the threshold must still read as above it.
    return None if math.isnan(value) else float(value)


def build_drop_map(
    selection: Selection,
    *,
    layers: list[int],
    top_k: int,
    base_model: dict[str, Any],
    profile_stats_sha256: str,
    recipe_sha256: str | None,
    profile_num_tokens: int | None = None,
) -> dict[str, Any]:
    """The drop-map dict (schemas/drop_map.schema.json) for a selection over ``layers``."""
    num_layers, num_experts = selection.keep_mask.shape
    if len(layers) != num_layers:
        raise DropMapError(f"selection has {num_layers} layer rows but {len(layers)} layer indices were given")
    entries = []
    for row, layer in enumerate(layers):
        entries.append(
            {
                "layer": int(layer),
                "keep": selection.keep_indices(row),
                "drop": selection.drop_indices(row),
                "retained_fraction": _fraction(selection.retained_fraction[row]),
                "criterion_retained_fraction": _fraction(selection.criterion_retained_fraction[row]),
            }
        )
        if selection.protection is not None:  # absent without protection: such maps stay as they were
            entries[-1]["protected"] = selection.protection.layer_record(row)
    worst_row = int(selection.retained_fraction.argmin())  # argmin: first (lowest index) on ties
    drop_map = {
        "format_version": FORMAT_VERSION,
        "base_model": {
            "id": str(base_model["id"]),
            "revision": base_model.get("revision"),
            "sha256": base_model.get("sha256"),
        },
        "num_experts": int(num_experts),
        "top_k": int(top_k),
        "num_experts_kept": selection.keep_count,
        "strategy": {
            "name": selection.strategy,
            "criterion": selection.criterion,
            "retention_threshold": selection.retention_threshold,
            "keep_count": selection.keep_count if selection.strategy == "uniform-count" else None,
            "protect_top_k": selection.protect_top_k,
            "seed": selection.seed,
        },
        "layers": entries,
        "hashes": {"profile_stats_sha256": profile_stats_sha256, "recipe_sha256": recipe_sha256},
        "uniform": selection.uniform,
        "summary": {
            "retention_measure": selection.retention_measure,
            "min_keep": selection.min_keep,
            "limited_by_min_keep": selection.limited_by_min_keep,
            "worst_layer": int(layers[worst_row]),
            "worst_retained_fraction": _fraction(selection.retained_fraction[worst_row]),
            "profile_num_tokens": profile_num_tokens,
        },
    }
    if selection.protection is not None:
        drop_map["strategy"]["protect"] = selection.protection.record()
    if selection.groups is not None:
        drop_map["routing_groups"] = selection.groups.record()
    return drop_map


def check_drop_map(
    drop_map: dict[str, Any], source: str | Path = "<drop map>", model_config: dict[str, Any] | None = None
) -> None:
    """Schema plus invariants; with ``model_config``, also that the map fits that model."""
    validate("drop_map", drop_map, source=source)
    num_experts, top_k = drop_map["num_experts"], drop_map["top_k"]
    if top_k > num_experts:
        raise DropMapError(f"{source}: top_k {top_k} exceeds num_experts {num_experts}")
    seen_layers = [entry["layer"] for entry in drop_map["layers"]]
    if seen_layers != sorted(set(seen_layers)):
        raise DropMapError(f"{source}: layers must be listed once each, in increasing order")
    counts = set()
    for entry in drop_map["layers"]:
        validate_keep_drop(entry["keep"], entry["drop"], num_experts, top_k, where=f"{source}: layer {entry['layer']}")
        dropped = [p["expert"] for p in entry.get("protected") or [] if p["expert"] in entry["drop"]]
        if dropped:
            raise DropMapError(f"{source}: layer {entry['layer']}: drops expert {dropped[0]}, which it lists as "
                               "protected; a protected expert is always kept")
        counts.add(len(entry["keep"]))
    threshold = drop_map["strategy"]["retention_threshold"]
    if drop_map["strategy"]["name"] != "uniform-count" and threshold is not None:
        short = [e["layer"] for e in drop_map["layers"] if not meets_threshold(e["retained_fraction"], threshold)]
        if short:
            raise DropMapError(
                f"{source}: layers {short} retain no more than the threshold {threshold} "
                f"that strategy '{drop_map['strategy']['name']}' promises"
            )
    kept = drop_map["num_experts_kept"]
    if drop_map["uniform"]:
        if len(counts) != 1 or kept != next(iter(counts)):
            raise DropMapError(
                f"{source}: uniform is true but layers keep {sorted(counts)} experts and "
                f"num_experts_kept is {kept}"
            )
    elif kept is not None:
        raise DropMapError(f"{source}: num_experts_kept must be null when uniform is false")
    if model_config is not None:
        model_experts, model_top_k, model_layers = moe_shape(model_config)
        if model_experts != num_experts or model_top_k != top_k:
            raise DropMapError(
                f"{source}: made for a model with {num_experts} experts (top-{top_k}) but this model has "
                f"{model_experts} (top-{model_top_k}): the drop map is of another model"
            )
        if seen_layers != model_layers:
            raise DropMapError(
                f"{source}: covers layers {_short(seen_layers)} but the model has MoE layers "
                f"{_short(model_layers)}: the drop map is of another model"
            )
        ModelSpec.from_config(model_config).check_drop_map(drop_map, source)


def write_drop_map(path: Path, drop_map: dict[str, Any], model_config: dict[str, Any] | None = None) -> None:
    """Check a drop map (against ``model_config`` and its family's constraints if given) and write it atomically."""
    check_drop_map(drop_map, source=path, model_config=model_config)
    write_json(Path(path), drop_map)


def load_drop_map(path: str | Path, model_config: dict[str, Any] | None = None) -> DropMap:
    """Read ``expert_drop_metadata.json``, validate the schema and invariants: the typed :class:`DropMap`.

    Pass the model's ``config.json`` contents as ``model_config`` to also refuse a drop map made
    for another model (or one that breaks its family's constraints).
    """
    return DropMap.load(path, model_config=model_config)
