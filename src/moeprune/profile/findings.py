"""The card's findings, computed: pure functions over contribution arrays.

Every function takes a ``[num_layers, num_experts]`` array of non-negative scores (normally the
per-expert sum of weighted output norms) or one row of it, and returns plain numbers or arrays.
No model, no file: each is tested on hand-computed arrays.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np


def _as_2d(scores: np.ndarray) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2:
        raise ValueError(f"expected [layers, experts] scores, got shape {array.shape}")
    if np.any(array < 0) or not np.all(np.isfinite(array)):
        raise ValueError("scores must be finite and non-negative")
    return array


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores of each layer, ``[layers, k]``; ties go to the lower index."""
    array = _as_2d(scores)
    k = min(k, array.shape[1])
    # A stable sort of the negated scores keeps equal scores in index order: deterministic picks.
    return np.argsort(-array, axis=1, kind="stable")[:, :k]


def top_k_overlap(scores_a: np.ndarray, scores_b: np.ndarray, k: int) -> np.ndarray:
    """Per layer, how many of the top-k experts of ``a`` are also top-k in ``b`` (ints, ``[layers]``)."""
    top_a = top_k_indices(scores_a, k)
    top_b = top_k_indices(scores_b, k)
    return np.array([len(set(row_a) & set(row_b)) for row_a, row_b in zip(top_a, top_b)], dtype=np.int64)


def top_k_share(scores: np.ndarray, k: int) -> np.ndarray:
    """Per layer, the fraction of the layer's total held by its k largest experts (0 for an empty layer)."""
    array = _as_2d(scores)
    k = min(k, array.shape[1])
    top = -np.sort(-array, axis=1)[:, :k].sum(axis=1)
    total = array.sum(axis=1)
    return np.divide(top, total, out=np.zeros_like(total), where=total > 0)


def bottom_n_share(scores: np.ndarray, n: int) -> np.ndarray:
    """Per layer, the fraction of the layer's total held by its n smallest experts."""
    array = _as_2d(scores)
    n = min(n, array.shape[1])
    bottom = np.sort(array, axis=1)[:, :n].sum(axis=1)
    total = array.sum(axis=1)
    return np.divide(bottom, total, out=np.zeros_like(total), where=total > 0)


def experts_to_reach(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Per layer, the fewest experts (largest first) whose sum reaches ``fraction`` of the total.

    ``fraction`` is in (0, 1]. A layer whose total is 0 needs 0 experts.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    array = _as_2d(scores)
    ordered = -np.sort(-array, axis=1)
    cumulative = np.cumsum(ordered, axis=1)
    total = cumulative[:, -1]
    needed = np.zeros(array.shape[0], dtype=np.int64)
    for layer, (row, layer_total) in enumerate(zip(cumulative, total)):
        if layer_total <= 0:
            continue
        # A relative tolerance keeps 'reach 100%' reachable despite float rounding of the cumsum.
        target = fraction * layer_total * (1.0 - 1e-12)
        needed[layer] = int(np.searchsorted(row, target, side="left")) + 1
    return needed


def gini(scores: np.ndarray) -> np.ndarray:
    """Per layer, the Gini coefficient of the experts' scores (0: all equal; (n-1)/n: one expert has all).

    G = sum_i (2i - n - 1) x_(i) / (n sum x), with x sorted ascending and i = 1..n. 0 for an all-zero layer.
    """
    array = _as_2d(scores)
    n = array.shape[1]
    ordered = np.sort(array, axis=1)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    numerator = ((2 * ranks - n - 1) * ordered).sum(axis=1)
    total = ordered.sum(axis=1)
    return np.divide(numerator, n * total, out=np.zeros_like(total), where=total > 0)


def pooled_top_k_share(scores: np.ndarray, k: int) -> float:
    """Fraction of the total over all layers held by each layer's top-k experts."""
    array = _as_2d(scores)
    total = float(array.sum())
    if total <= 0:
        return 0.0
    k = min(k, array.shape[1])
    return float(-np.sort(-array, axis=1)[:, :k].sum() / total)


def domain_overlaps(per_domain: dict[str, np.ndarray], k: int) -> list[dict[str, Any]]:
    """Top-k overlap for every pair of domains: per layer, mean and minimum over layers.

    Domains whose scores are all zero (no tokens) are left out.
    """
    names = [name for name in sorted(per_domain) if float(np.sum(per_domain[name])) > 0]
    pairs = []
    for first, second in combinations(names, 2):
        per_layer = top_k_overlap(per_domain[first], per_domain[second], k)
        pairs.append(
            {
                "domains": [first, second],
                "k": int(min(k, np.asarray(per_domain[first]).shape[-1])),
                "mean": float(per_layer.mean()),
                "min": int(per_layer.min()),
                "per_layer": [int(v) for v in per_layer],
            }
        )
    return pairs


def concentration_ranking(scores: np.ndarray, k: int) -> np.ndarray:
    """Layer positions ordered from most to least concentrated (by top-k share, ties by position)."""
    share = top_k_share(scores, k)
    return np.argsort(-share, kind="stable")


def compute_findings(
    scores: np.ndarray,
    layers: list[int],
    per_domain: dict[str, np.ndarray],
    *,
    overlap_k: int,
    share_k: int,
    coverage_fraction: float,
    num_extremes: int = 3,
) -> dict[str, Any]:
    """All findings of the card for one ``[layers, experts]`` score array, as JSON-ready data.

    ``layers`` names the model layer index of each row; ``per_domain`` maps a domain to its own
    ``[layers, experts]`` scores.
    """
    array = _as_2d(scores)
    if len(layers) != array.shape[0]:
        raise ValueError(f"{len(layers)} layer names for {array.shape[0]} rows")
    num_experts = array.shape[1]
    share = top_k_share(array, share_k)
    top1 = top_k_share(array, 1)
    needed = experts_to_reach(array, coverage_fraction)
    gini_per_layer = gini(array)
    bottom_half = bottom_n_share(array, num_experts // 2)
    order = concentration_ranking(array, share_k)

    def layer_entry(position: int) -> dict[str, Any]:
        return {
            "layer": int(layers[position]),
            "top1_share": float(top1[position]),
            "top_k_share": float(share[position]),
            "gini": float(gini_per_layer[position]),
        }

    extremes = min(num_extremes, len(layers))
    return {
        "top_share_k": int(min(share_k, num_experts)),
        "top_k_share_pooled": pooled_top_k_share(array, share_k),
        "top_k_share_mean": float(share.mean()),
        "coverage_fraction": float(coverage_fraction),
        "experts_to_coverage_mean": float(needed.mean()),
        "experts_to_coverage_min": int(needed.min()),
        "experts_to_coverage_max": int(needed.max()),
        "gini_mean": float(gini_per_layer.mean()),
        "gini_min": float(gini_per_layer.min()),
        "gini_max": float(gini_per_layer.max()),
        "bottom_half_share_mean": float(bottom_half.mean()),
        "most_concentrated_layers": [layer_entry(int(p)) for p in order[:extremes]],
        "least_concentrated_layers": [layer_entry(int(p)) for p in order[::-1][:extremes]],
        "domain_overlap": domain_overlaps(per_domain, overlap_k),
    }
