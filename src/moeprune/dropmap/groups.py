"""Balanced selection for routers that choose experts within groups (DeepSeek-V3 / GLM ``n_group``).

Such a router splits a layer's E experts into ``n_group`` contiguous blocks of E / n_group, keeps
the ``topk_group`` best blocks per token and routes its top-k inside them. A pruned model routes
the same way only if every block keeps the same number of experts: its config keeps ``n_group``,
and the kept experts, renumbered in order, fall into the same blocks of the new, smaller size.

The selection stays the strategy's own: :func:`interleave` reorders a layer's keep order so its
first ``k * n_group`` entries are the first k of every group's own order (each group's experts
in the order the criterion, and protection, put them). Keeping a multiple of ``n_group`` of that
order keeps the best k of every group, and the retention curve over those counts is nested as
before, so the strategies need nothing else than "counts are multiples of n_group, at least
:func:`min_per_group` per group".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprune.errors import MoepruneError


@dataclass(frozen=True)
class RoutingGroups:
    """The group facts of a router (the family adapter's ``routing_groups``)."""

    n_group: int
    topk_group: int
    min_per_group: int = 1
    """The fewest experts a group may keep (DeepSeek-V3 scores a group by its two best)."""

    @property
    def grouped(self) -> bool:
        return self.n_group > 1

    def record(self) -> dict[str, int]:
        """What the drop map records (``routing_groups``), so a re-derivation needs no config."""
        return {"n_group": self.n_group, "topk_group": self.topk_group, "min_per_group": self.min_per_group}

    @classmethod
    def from_record(cls, record: Any) -> RoutingGroups | None:
        if not isinstance(record, dict):
            return None
        return cls(int(record["n_group"]), int(record["topk_group"]), int(record["min_per_group"]))


def check_groups(groups: RoutingGroups, num_experts: int, top_k: int) -> int:
    """The group size; one-line MoepruneError for group facts no balanced choice can satisfy."""
    if groups.n_group < 1 or num_experts % groups.n_group:
        raise MoepruneError(f"config n_group = {groups.n_group} does not divide the {num_experts} routed experts "
                            "per layer into equal routing groups")
    size = num_experts // groups.n_group
    if not 1 <= groups.topk_group <= groups.n_group:
        raise MoepruneError(f"config topk_group = {groups.topk_group} is outside [1, n_group = {groups.n_group}]")
    if groups.min_per_group > size:
        raise MoepruneError(f"config n_group = {groups.n_group}: routing groups of {size} experts cannot keep the "
                            f"{groups.min_per_group} per group the router needs")
    if size * groups.topk_group < top_k:
        raise MoepruneError(f"config topk_group = {groups.topk_group} x {size} experts per group < top-k {top_k}: "
                            "the router could not choose its top-k")
    return size


def interleave(order: np.ndarray, groups: RoutingGroups) -> np.ndarray:
    """``order`` ([layers, experts], best first) with each group's r-th expert at positions r*G .. r*G+G-1."""
    if not groups.grouped:
        return order
    size = order.shape[1] // groups.n_group
    out = np.empty_like(order)
    for row, ranked in enumerate(order):
        per_group = [ranked[ranked // size == g] for g in range(groups.n_group)]
        out[row] = np.stack(per_group, axis=1).reshape(-1)
    return out


def min_per_group(groups: RoutingGroups, top_k: int, front: np.ndarray, floor: int) -> int:
    """The fewest experts each group must keep.

    At least the router's own minimum, enough groups' worth for the top-k (``topk_group`` groups
    must hold it), ``floor`` experts in all, and every expert of ``front`` ([layers, experts]
    bool: the protected ones, kept first) in its group.
    """
    size = front.shape[1] // groups.n_group
    protected = int(front.reshape(front.shape[0], groups.n_group, size).sum(axis=2).max(initial=0))
    return max(groups.min_per_group, math.ceil(top_k / groups.topk_group), math.ceil(floor / groups.n_group), protected)


__all__ = ["RoutingGroups", "check_groups", "interleave", "min_per_group"]
