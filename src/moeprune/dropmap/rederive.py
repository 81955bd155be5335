"""Re-derive a drop map from the profile statistics it names (pure: arrays and dicts in, findings out).

A drop map states, per layer, the experts kept and the fraction of the layer's profile statistic
they retain. Both follow from ``profile/stats.safetensors`` and the recorded strategy, criterion,
threshold (or keep count): :func:`rederive_drop_map` runs the drop-map stage's own selection
(:func:`moeprune.dropmap.select.select_from_profile`) and measures the *stated* keep sets with the
stage's own :func:`~moeprune.dropmap.select.retained_fraction`. Any layer whose keep set or
retained fraction differs is a finding that names the layer and both values.

A map made by hand or by another tool says so with strategy ``manual``: its keep sets are not
re-selected (nothing says how they were chosen), but its retained fractions are still measured on
the statistics and must equal what it states.

Protection (``strategy.protect``) and routing groups (``routing_groups``) are re-derived too: the
super-experts rule is re-run on the profile's ``max_activation_norm`` (profile.json), and each
layer's protected experts, their reasons and the rule's threshold must equal what the map states.
A map that drops an expert the rule protects fails naming the layer and the expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeprune.dropmap.groups import RoutingGroups
from moeprune.dropmap.protect import Protection, ProtectError, protection_for
from moeprune.dropmap.select import (
    DropMapError,
    criterion_scores,
    retained_fraction,
    retention_statistic,
    select_from_profile,
)
from moeprune.dropmap.types import MANUAL

# Retained fractions are exactly rounded sums (math.fsum) stored as JSON floats, which round-trip:
# a re-derivation gives the same float. The tolerance only absorbs a last-bit difference.
FRACTION_TOLERANCE = 1e-12


@dataclass
class Rederivation:
    """What the statistics give for a drop map, and every disagreement with what it states."""

    measure: str
    fractions: dict[int, float] = field(default_factory=dict)
    """Retained fraction of each layer's *stated* keep set, measured on ``measure``."""
    problems: list[str] = field(default_factory=list)
    how: str = ""


def show_fraction(value: Any) -> str:
    """``0.994812 (99.48%)``: the value and the percentage a card shows."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return repr(value)
    return f"{float(value):.6f} ({100 * float(value):.2f}%)"


def _same(a: Any, b: float) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isclose(
        float(a), float(b), rel_tol=0.0, abs_tol=FRACTION_TOLERANCE)


def _indices(values: list[int]) -> str:
    return "[" + ", ".join(str(i) for i in values) + "]"


def rederive_drop_map(drop_map: Mapping[str, Any], layers: list[int], totals: Mapping[str, np.ndarray],
                      per_domain: Mapping[str, Mapping[str, np.ndarray]] | None,
                      source: str = "expert_drop_metadata.json",
                      max_activation_norm: np.ndarray | None = None) -> Rederivation:
    """Recompute ``drop_map`` (a parsed ``expert_drop_metadata.json``) from profile statistics over ``layers``.

    ``max_activation_norm`` is the profile summary's statistic, needed where the map protects super experts.
    """
    strategy = drop_map.get("strategy") or {}
    name = strategy.get("name")
    criterion = strategy.get("criterion")
    summary = drop_map.get("summary") or {}
    manual = name == MANUAL
    measure = summary.get("retention_measure", "contribution_sum") if manual else retention_statistic(str(criterion))
    out = Rederivation(measure=str(measure))
    entries = list(drop_map.get("layers") or [])
    stated_layers = [entry.get("layer") for entry in entries]
    if stated_layers != list(layers):
        out.problems.append(f"{source}: covers layers {stated_layers}, the profile statistics cover {list(layers)}: "
                            "the drop map was not made from these statistics")
        return out
    if measure not in totals:
        out.problems.append(f"{source}: retention is measured on '{measure}', which profile/stats.safetensors lacks")
        return out
    values = np.asarray(totals[measure], dtype=np.float64)
    num_experts = values.shape[1]
    if drop_map.get("num_experts") != num_experts:
        out.problems.append(f"{source}: num_experts = {drop_map.get('num_experts')}, the profile statistics have "
                            f"{num_experts} experts per layer")
        return out
    stated = np.zeros(values.shape, dtype=bool)
    for row, entry in enumerate(entries):
        keep = entry.get("keep") or []
        bad = [i for i in keep if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_experts]
        if bad:
            out.problems.append(f"{source}: layer {entry['layer']}: keep indices {bad} are outside [0, {num_experts})")
            return out
        stated[row, keep] = True

    measured = retained_fraction(values, stated)
    out.fractions = {int(layer): float(measured[row]) for row, layer in enumerate(layers)}
    for row, entry in enumerate(entries):
        if not _same(entry.get("retained_fraction"), measured[row]):
            out.problems.append(
                f"{source}: layer {entry['layer']}: retained_fraction = {show_fraction(entry.get('retained_fraction'))}, "
                f"the profile statistics give {show_fraction(measured[row])} for its keep set ({measure})")
    if summary.get("retention_measure", measure) != measure:
        out.problems.append(f"{source}: summary.retention_measure = {summary.get('retention_measure')!r}, but "
                            f"criterion {criterion!r} measures retention on {measure!r}")
    worst_row = int(np.argmin(measured))
    for key, want in (("worst_layer", int(layers[worst_row])), ("worst_retained_fraction", float(measured[worst_row]))):
        if key in summary and summary[key] != want and not (key == "worst_retained_fraction" and _same(summary[key], want)):
            out.problems.append(f"{source}: summary.{key} = {summary[key]!r}, the profile statistics give {want!r}")

    if manual:
        out.how = (f"strategy 'manual': keep sets made elsewhere, not re-selected; every layer's retained fraction "
                   f"re-measured on {measure}")
        return out

    try:
        protection = protection_for(strategy.get("protect"), layers, num_experts, max_activation_norm)
        selection = select_from_profile(
            totals, per_domain, strategy=str(name), criterion=str(criterion), top_k=int(drop_map.get("top_k") or 0),
            retention_threshold=strategy.get("retention_threshold"), keep_count=strategy.get("keep_count"),
            protect_top_k=int(strategy.get("protect_top_k") or 0), seed=int(strategy.get("seed") or 0),
            protection=protection, groups=RoutingGroups.from_record(drop_map.get("routing_groups")))
    except (DropMapError, ProtectError) as exc:
        out.problems.append(f"{source}: strategy {name!r} cannot be re-run on the profile statistics: {exc}")
        return out
    rule = f"strategy {name} / criterion {criterion} / " + (
        f"keep_count {strategy.get('keep_count')}" if name == "uniform-count"
        else f"threshold {strategy.get('retention_threshold')}")
    if protection is not None:
        out.problems += _protection_problems(protection, strategy.get("protect"), entries, source)
        rule += f" / protect {protection.rule}"
    for row, entry in enumerate(entries):
        mine = selection.keep_indices(row)
        theirs = sorted(entry.get("keep") or [])
        if mine != theirs:
            out.problems.append(
                f"{source}: layer {entry['layer']}: keeps {_indices(theirs)} (retaining "
                f"{show_fraction(measured[row])}), but {rule} on the profile statistics keeps {_indices(mine)} "
                f"(retaining {show_fraction(selection.retained_fraction[row])}); kept only in the drop map: "
                f"{_indices(sorted(set(theirs) - set(mine)))}, only in the re-derivation: "
                f"{_indices(sorted(set(mine) - set(theirs)))}")
    for key, want in (("num_experts_kept", selection.keep_count), ("uniform", selection.uniform)):
        if drop_map.get(key) != want:
            out.problems.append(f"{source}: {key} = {drop_map.get(key)!r}, the re-derivation gives {want!r}")
    for key, want in (("min_keep", selection.min_keep), ("limited_by_min_keep", selection.limited_by_min_keep)):
        if key in summary and summary[key] != want:
            out.problems.append(f"{source}: summary.{key} = {summary[key]!r}, the re-derivation gives {want!r}")
    if criterion != "random":
        scores = criterion_scores(str(criterion), totals, per_domain, seed=int(strategy.get("seed") or 0))
        by_criterion = retained_fraction(scores, stated)
        for row, entry in enumerate(entries):
            claimed = entry.get("criterion_retained_fraction")
            if claimed is not None and not _same(claimed, by_criterion[row]):
                out.problems.append(
                    f"{source}: layer {entry['layer']}: criterion_retained_fraction = {show_fraction(claimed)}, the "
                    f"profile statistics give {show_fraction(by_criterion[row])} ({criterion})")
    out.how = f"every layer's keep set re-selected ({rule}) and its retained fraction re-measured on {measure}"
    return out


def _protection_problems(protection: Protection, stated: Any, entries: list[Any], source: str) -> list[str]:
    """Every protected expert a layer drops (naming layer and expert), and every difference between the
    stated and the re-derived protection record."""
    problems = []
    if protection.record() != stated:
        problems.append(f"{source}: strategy.protect = {stated!r}, the re-derivation gives {protection.record()!r}")
    for row, entry in enumerate(entries):
        dropped = set(entry.get("drop") or [])
        for expert in np.flatnonzero(protection.mask[row]):
            if int(expert) in dropped:
                problems.append(f"{source}: layer {entry['layer']}: drops expert {int(expert)}, which is protected "
                                f"({protection.reason(row, int(expert))})")
        if entry.get("protected") != protection.layer_record(row):
            problems.append(f"{source}: layer {entry['layer']}: protected = {entry.get('protected')!r}, the "
                            f"re-derivation gives {protection.layer_record(row)!r}")
    return problems


__all__ = ["FRACTION_TOLERANCE", "Rederivation", "rederive_drop_map", "show_fraction"]
