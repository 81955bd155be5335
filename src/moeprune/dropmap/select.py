"""Drop-map selection: pure functions over ``[layers, experts]`` arrays.

Nothing here reads a file or a model. The profile stage gives per-expert statistics; these
functions turn them into a score per expert (the *criterion*), an order in which experts are kept
(best first, ties broken by the lower expert index so the result never depends on sort internals),
and a keep set per layer (the *strategy*).

Retention is measured on the contribution sum, the card's "weighted output norm" (sum over
tokens of ``||w_te * E_e(x_t)||_2``), whatever criterion ranks the experts: it is the one
quantity that says how much of a layer's MoE output the kept experts produced on the
calibration data, so strategies with different criteria are compared on the same scale. The one
exception is the seed's own rule, criterion ``sequence-norm-sum`` in the drop-map stage: the seed
ranked *and* thresholded on its per-sequence norm sum (:func:`retention_statistic`), so the keep
count it reproduces is measured on that statistic (``retention_measure`` in the drop map). The
fraction of the ranking criterion's own score that is kept is available too
(:func:`retained_fraction` with the criterion scores) and is recorded in the drop map as
``criterion_retained_fraction``.

Sums use :func:`math.fsum` (exactly rounded), so the retained fraction of a superset is never below
that of a subset and keeping every expert retains exactly 1.0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from moeprune.dropmap.groups import RoutingGroups, check_groups, interleave, min_per_group
from moeprune.dropmap.protect import Protection
from moeprune.dropmap.types import CRITERIA, STRATEGIES
from moeprune.errors import MoepruneError

# Profile statistic a criterion's retention threshold is applied to in the drop-map stage.
_RETENTION_STATISTIC = {"sequence-norm-sum": "sequence_norm_sum"}


class DropMapError(MoepruneError):
    """A selection that cannot be made or a drop map that breaks an invariant."""


# --- inputs ------------------------------------------------------------------------------------


def _check_matrix(values: np.ndarray, name: str) -> np.ndarray:
    """A finite, non-negative 2-D float array, or a DropMapError naming ``name``."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise DropMapError(f"{name}: expected a [layers, experts] array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise DropMapError(f"{name}: contains NaN or infinite values; re-run the profile stage")
    if np.any(array < 0):
        raise DropMapError(f"{name}: contains negative values; expected norms, counts or probabilities")
    return array


def check_threshold(threshold: float) -> float:
    """Return ``threshold`` if it lies in (0, 1], else raise DropMapError."""
    value = float(threshold)
    if not (0.0 < value <= 1.0):
        raise DropMapError(
            f"retention threshold {threshold!r} is outside (0, 1]; use a fraction such as 0.99"
        )
    return value


def _check_contribution(contribution: np.ndarray) -> np.ndarray:
    array = _check_matrix(contribution, "contribution_sum")
    empty = [int(i) for i in np.flatnonzero(array.sum(axis=1) <= 0)]
    if empty:
        raise DropMapError(
            f"contribution_sum: layer rows {empty} have zero total contribution (no tokens were "
            "profiled); re-run the profile stage with calibration prompts"
        )
    return array


def _check_contribution_like(values: np.ndarray, name: str) -> np.ndarray:
    array = _check_matrix(values, name)
    empty = [int(i) for i in np.flatnonzero(array.sum(axis=1) <= 0)]
    if empty:
        raise DropMapError(f"{name}: layer rows {empty} are all zero (no tokens were profiled); re-run the profile stage")
    return array


# --- criteria ----------------------------------------------------------------------------------


def domain_max_scores(per_domain_contribution: Mapping[str, np.ndarray]) -> np.ndarray:
    """Max over domains of each expert's share of that domain's layer total.

    An expert that matters a lot to one domain scores high even if it is rare overall. A domain
    whose layer total is zero contributes 0 for that layer.
    """
    if not per_domain_contribution:
        raise DropMapError("criterion 'domain-max' needs per-domain contribution sums; the profile has no domains")
    shares = []
    for domain, values in sorted(per_domain_contribution.items()):
        array = _check_matrix(values, f"domain/{domain}/contribution_sum")
        totals = array.sum(axis=1, keepdims=True)
        shares.append(np.divide(array, totals, out=np.zeros_like(array), where=totals > 0))
    shapes = {share.shape for share in shares}
    if len(shapes) != 1:
        raise DropMapError(f"per-domain contribution sums have different shapes: {sorted(shapes)}")
    return np.max(np.stack(shares), axis=0)


def random_scores(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded uniform scores in [0, 1): the baseline every real criterion should beat."""
    return np.random.default_rng(seed).random(shape)


def retention_statistic(criterion: str) -> str:
    """The profile statistic the drop-map stage measures retention on for ``criterion``.

    ``contribution_sum`` for every criterion but ``sequence-norm-sum``, whose rule (the seed's)
    keeps the fewest experts such that every layer retains more than the threshold of its
    ``sequence_norm_sum``.
    """
    return _RETENTION_STATISTIC.get(criterion, "contribution_sum")


def criterion_scores(
    criterion: str,
    totals: Mapping[str, np.ndarray],
    per_domain: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Score of every expert under ``criterion`` (higher is kept first), shape [layers, experts].

    ``totals`` holds the profile's pooled statistics (``contribution_sum``, ``routed_count``,
    ``reap_mean``, ...), ``per_domain`` the same per domain.
    """
    if criterion not in CRITERIA:
        raise DropMapError(f"unknown criterion '{criterion}'; choose one of {', '.join(CRITERIA)}")
    contribution = _check_contribution(totals["contribution_sum"])
    if criterion == "contribution-sum":
        return contribution
    if criterion == "sequence-norm-sum":
        if "sequence_norm_sum" not in totals:
            raise DropMapError(
                "criterion 'sequence-norm-sum' needs the profile's sequence_norm_sum, which this "
                "statistics file lacks (made by an older moeprune); rerun `invoke profile`"
            )
        return _check_contribution_like(totals["sequence_norm_sum"], "sequence_norm_sum")
    if criterion == "reap-mean":
        if "reap_mean" in totals:
            return _check_matrix(totals["reap_mean"], "reap_mean")
        counts = _check_matrix(totals["routed_count"], "routed_count")
        return np.divide(contribution, counts, out=np.zeros_like(contribution), where=counts > 0)
    if criterion == "frequency":
        return _check_matrix(totals["routed_count"], "routed_count")
    if criterion == "domain-max":
        per_domain = per_domain or {}
        return domain_max_scores(
            {domain: stats["contribution_sum"] for domain, stats in per_domain.items()}
        )
    return random_scores(contribution.shape, seed)


# --- ordering and retention --------------------------------------------------------------------


def rank_experts(scores: np.ndarray) -> np.ndarray:
    """Expert indices per layer, highest score first; equal scores in ascending index order."""
    array = _check_matrix(scores, "scores")
    # A stable sort of the negated scores keeps equal scores in index order.
    return np.argsort(-array, axis=1, kind="stable")


def keep_order(
    contribution: np.ndarray, scores: np.ndarray, protect_top_k: int = 0
) -> np.ndarray:
    """Order in which experts are kept, per layer: protected experts first, then by ``scores``.

    The protected experts are each layer's ``protect_top_k`` best by contribution. Keeping the
    first N of this order gives nested keep sets, so retention never falls as N grows.
    """
    contribution = _check_contribution(contribution)
    scores = _check_matrix(scores, "scores")
    if scores.shape != contribution.shape:
        raise DropMapError(f"scores shape {scores.shape} differs from contribution shape {contribution.shape}")
    num_experts = contribution.shape[1]
    if not (0 <= protect_top_k <= num_experts):
        raise DropMapError(f"protect_top_k {protect_top_k} is outside [0, {num_experts}]")
    by_score = rank_experts(scores)
    if protect_top_k == 0:
        return by_score
    by_contribution = rank_experts(contribution)
    order = np.empty_like(by_score)
    for layer in range(contribution.shape[0]):
        protected = by_contribution[layer, :protect_top_k]
        rest = by_score[layer][~np.isin(by_score[layer], protected)]
        order[layer] = np.concatenate([protected, rest])
    return order


def retained_fraction(values: np.ndarray, keep_mask: np.ndarray) -> np.ndarray:
    """Per layer, the fraction of ``values`` (usually the contribution sum) held by kept experts."""
    array = _check_matrix(values, "values")
    mask = np.asarray(keep_mask, dtype=bool)
    if mask.shape != array.shape:
        raise DropMapError(f"keep mask shape {mask.shape} differs from values shape {array.shape}")
    fractions = np.zeros(array.shape[0])
    for layer, row in enumerate(array):
        total = math.fsum(row)
        fractions[layer] = math.fsum(row[mask[layer]]) / total if total > 0 else 1.0
    return fractions


def retention_curve(contribution: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``curve[l, n]``: fraction of layer l's contribution kept by the first n experts of ``order``.

    Shape [layers, experts + 1]; column 0 is 0 and the last column is exactly 1.
    """
    contribution = _check_contribution(contribution)
    num_layers, num_experts = contribution.shape
    curve = np.zeros((num_layers, num_experts + 1))
    for layer in range(num_layers):
        ordered = contribution[layer, order[layer]]
        total = math.fsum(ordered)
        for count in range(1, num_experts + 1):
            curve[layer, count] = math.fsum(ordered[:count]) / total
    return curve


def meets_threshold(fractions: np.ndarray | float, threshold: float) -> np.ndarray:
    """``fractions > threshold``; a threshold of exactly 1 asks for everything (``== 1``)."""
    fractions = np.asarray(fractions, dtype=np.float64)
    if threshold >= 1.0:
        return fractions >= 1.0
    return fractions > threshold


# --- strategies --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The outcome of a strategy: which experts each layer keeps, and what it retains.

    ``keep_mask`` is [layers, experts] bool. ``keep_count`` is the uniform count, or None when
    the strategy gives layers different counts (``per-layer-retention``). ``min_keep`` is the floor
    the counts were held to (the model's top-k, or ``protect_top_k`` if larger), and
    ``limited_by_min_keep`` says that floor, not the threshold, set the count.
    """

    strategy: str
    criterion: str
    keep_mask: np.ndarray
    retained_fraction: np.ndarray
    criterion_retained_fraction: np.ndarray
    keep_count: int | None
    retention_threshold: float | None
    protect_top_k: int
    seed: int
    min_keep: int
    limited_by_min_keep: bool
    retention_measure: str = "contribution_sum"
    protection: Protection | None = None
    groups: RoutingGroups | None = None

    @property
    def uniform(self) -> bool:
        return self.keep_count is not None

    @property
    def layer_keep_counts(self) -> np.ndarray:
        return self.keep_mask.sum(axis=1)

    def keep_indices(self, layer_row: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.keep_mask[layer_row])]

    def drop_indices(self, layer_row: int) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.keep_mask[layer_row])]


def _mask_from_order(order: np.ndarray, counts: np.ndarray) -> np.ndarray:
    mask = np.zeros(order.shape, dtype=bool)
    for layer, count in enumerate(counts):
        mask[layer, order[layer, : int(count)]] = True
    return mask


def _min_keep(top_k: int, protect_top_k: int, num_experts: int) -> int:
    if top_k < 1:
        raise DropMapError(f"top-k routing must be at least 1, got {top_k}")
    if top_k > num_experts:
        raise DropMapError(f"top-k routing {top_k} exceeds the {num_experts} experts per layer")
    if protect_top_k > num_experts:
        raise DropMapError(f"protect_top_k {protect_top_k} exceeds the {num_experts} experts per layer")
    return max(top_k, protect_top_k)


def select_experts(
    strategy: str,
    contribution: np.ndarray,
    scores: np.ndarray,
    *,
    top_k: int,
    criterion: str = "contribution-sum",
    retention_threshold: float | None = None,
    keep_count: int | None = None,
    protect_top_k: int = 0,
    seed: int = 0,
    retention_measure: str = "contribution_sum",
    protection: Protection | None = None,
    groups: RoutingGroups | None = None,
) -> Selection:
    """Choose each layer's kept experts.

    - ``uniform-min-retention``: the smallest N (at least ``top_k`` and ``protect_top_k``) such
      that every layer's first N experts retain more than ``retention_threshold`` of the layer's
      contribution; every layer keeps N.
    - ``uniform-count``: every layer keeps ``keep_count``.
    - ``per-layer-retention``: each layer keeps its own smallest count for the threshold (a
      report: transformers and llama.cpp need one count for all layers).

    ``scores`` ranks the experts (see :func:`criterion_scores`); the retained fraction is measured
    on ``contribution``, the profile statistic named by ``retention_measure``
    (:func:`retention_statistic`).

    ``protection`` (moeprune.dropmap.protect) puts its experts first in every layer's order, so
    they are always kept and the counts never fall below the most protected in a layer. With
    ``groups`` of a grouped router (moeprune.dropmap.groups), every routing group keeps the same
    number: counts are multiples of ``n_group`` over the interleaved group orders.
    """
    if strategy not in STRATEGIES:
        raise DropMapError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    contribution = _check_contribution(contribution)
    num_layers, num_experts = contribution.shape
    ranked = _rank(contribution, scores, top_k, protect_top_k, protection, groups)
    limited = False
    threshold = None
    if strategy == "uniform-count":
        counts = _uniform_counts(keep_count, num_layers, num_experts, top_k, protect_top_k, ranked, protection)
    else:
        if retention_threshold is None:
            raise DropMapError(f"strategy '{strategy}' needs retention_threshold, e.g. 0.99")
        threshold = check_threshold(retention_threshold)
        threshold_counts = _threshold_counts(contribution, ranked, threshold)
        # Routing needs top-k experts (and protected ones stay): counts never go below that floor.
        limited = bool(np.any(threshold_counts < ranked.min_keep)) if strategy == "per-layer-retention" else (
            int(threshold_counts.max()) < ranked.min_keep
        )
        layer_counts = np.maximum(threshold_counts, ranked.min_keep)
        if strategy == "uniform-min-retention":
            keep_count = int(layer_counts.max())
            counts = np.full(num_layers, keep_count)
        else:
            counts = layer_counts
            keep_count = None
    mask = _mask_from_order(ranked.order, counts)
    criterion_fraction = retained_fraction(scores, mask) if criterion != "random" else np.full(num_layers, np.nan)
    return Selection(
        strategy=strategy,
        criterion=criterion,
        keep_mask=mask,
        retained_fraction=retained_fraction(contribution, mask),
        criterion_retained_fraction=criterion_fraction,
        keep_count=keep_count,
        retention_threshold=threshold,
        protect_top_k=protect_top_k,
        seed=seed,
        min_keep=ranked.min_keep,
        limited_by_min_keep=limited,
        retention_measure=retention_measure,
        protection=protection,
        groups=groups if groups is not None and groups.grouped else None,
    )


@dataclass(frozen=True)
class _Ranking:
    """Every layer's keep order and the floor under its count: ``front`` marks the experts that
    must stay (top-``protect_top_k`` and protected ones), ``step`` is the count's granularity
    (``n_group`` on a grouped router, else 1)."""

    order: np.ndarray
    front: np.ndarray
    min_keep: int
    step: int


def _rank(
    contribution: np.ndarray,
    scores: np.ndarray,
    top_k: int,
    protect_top_k: int,
    protection: Protection | None,
    groups: RoutingGroups | None,
) -> _Ranking:
    """The keep order (protected experts first, grouped routers' groups interleaved) and its floor."""
    num_experts = contribution.shape[1]
    min_keep = _min_keep(top_k, protect_top_k, num_experts)
    order = keep_order(contribution, scores, protect_top_k)
    front = np.zeros(contribution.shape, dtype=bool)
    np.put_along_axis(front, order[:, :protect_top_k], True, axis=1)
    if protection is not None:
        if protection.mask.shape != contribution.shape:
            raise DropMapError(f"protected experts shape {protection.mask.shape} differs from the statistics' "
                               f"{contribution.shape}")
        order = _protected_first(order, protection.mask)
        front |= protection.mask
        min_keep = max(min_keep, int(front.sum(axis=1).max()))
    step = 1
    if groups is not None and groups.grouped:
        try:
            check_groups(groups, num_experts, top_k)
        except MoepruneError as exc:
            raise DropMapError(str(exc)) from None
        step = groups.n_group
        min_keep = step * min_per_group(groups, top_k, front, min_keep)
        order = interleave(order, groups)
    return _Ranking(order=order, front=front, min_keep=min_keep, step=step)


def _uniform_counts(
    keep_count: int | None,
    num_layers: int,
    num_experts: int,
    top_k: int,
    protect_top_k: int,
    ranked: _Ranking,
    protection: Protection | None,
) -> np.ndarray:
    """``uniform-count``: ``keep_count`` in every layer, refused where routing or protection cannot hold."""
    if keep_count is None:
        raise DropMapError("strategy 'uniform-count' needs keep_count (experts kept per layer)")
    if keep_count < top_k:
        raise DropMapError(
            f"keep_count {keep_count} is below the model's top-k routing ({top_k}); "
            f"keep at least {top_k} experts per layer"
        )
    if keep_count < protect_top_k:
        raise DropMapError(f"keep_count {keep_count} is below protect_top_k {protect_top_k}")
    if keep_count > num_experts:
        raise DropMapError(f"keep_count {keep_count} exceeds the {num_experts} experts per layer")
    if keep_count % ranked.step:
        raise DropMapError(f"dropmap.keep_count = {keep_count} is not a multiple of n_group = {ranked.step}: every "
                           f"routing group must keep the same number; use a multiple of {ranked.step}")
    if keep_count < ranked.min_keep:
        raise DropMapError(_below_floor(keep_count, ranked.min_keep, ranked.front, ranked.step, protection))
    return np.full(num_layers, keep_count)


def _threshold_counts(contribution: np.ndarray, ranked: _Ranking, threshold: float) -> np.ndarray:
    """Each layer's smallest count (a whole round of the groups) whose first experts retain more
    than ``threshold``; retention is monotone in the count, so every larger count passes too."""
    num_experts = contribution.shape[1]
    curve = retention_curve(contribution, ranked.order)
    passes = meets_threshold(curve, threshold)  # [layers, experts + 1]
    passes[:, num_experts] = True  # keeping everything retains exactly 1
    passes[:, np.arange(num_experts + 1) % ranked.step != 0] = False
    return np.argmax(passes, axis=1)


def _protected_first(order: np.ndarray, protected: np.ndarray) -> np.ndarray:
    """``order`` with each layer's protected experts moved to the front, both parts in their order."""
    out = np.empty_like(order)
    for row, ranked in enumerate(order):
        first = protected[row, ranked]
        out[row] = np.concatenate([ranked[first], ranked[~first]])
    return out


def _below_floor(keep_count: int, min_keep: int, front: np.ndarray, step: int, protection: Protection | None) -> str:
    """Why ``keep_count`` cannot hold what must be kept: the layer (and group) with the most protected experts."""
    row = int(np.argmax(front.sum(axis=1)))
    where = protection.layer(row) if protection is not None else f"layer row {row}"
    if step > 1:
        return (f"dropmap.keep_count = {keep_count} is below {min_keep}: each of the {step} routing groups must keep "
                f"{min_keep // step} (the router's minimum per group, its top-k over topk_group groups and the protected "
                f"experts of {where}); keep at least {min_keep}")
    return (f"dropmap.keep_count = {keep_count} is below the {int(front[row].sum())} protected experts of {where}; "
            f"keep at least {min_keep}")


def select_from_profile(
    totals: Mapping[str, np.ndarray],
    per_domain: Mapping[str, Mapping[str, np.ndarray]] | None,
    *,
    strategy: str,
    criterion: str,
    top_k: int,
    retention_threshold: float | None = None,
    keep_count: int | None = None,
    protect_top_k: int = 0,
    seed: int = 0,
    protection: Protection | None = None,
    groups: RoutingGroups | None = None,
) -> Selection:
    """The selection the drop-map stage makes from a profile's statistics and its settings.

    One function for the stage and for ``invoke verify``/``invoke audit``, which re-derive a
    published drop map from its statistics: the two can never rank, threshold or measure
    differently.
    """
    scores = criterion_scores(criterion, totals, per_domain, seed=seed)
    measure = retention_statistic(criterion)
    if measure not in totals:
        raise DropMapError(f"criterion '{criterion}' measures retention on {measure}, which the statistics lack")
    return select_experts(
        strategy,
        totals[measure],
        scores,
        top_k=top_k,
        criterion=criterion,
        retention_threshold=retention_threshold,
        keep_count=keep_count,
        protect_top_k=protect_top_k,
        seed=seed,
        retention_measure=measure,
        protection=protection,
        groups=groups,
    )


# --- validation --------------------------------------------------------------------------------


def validate_keep_drop(
    keep: list[int], drop: list[int], num_experts: int, top_k: int, where: str = "layer"
) -> None:
    """Check one layer's lists: indices in range, sorted, disjoint, complete, keep >= top-k."""
    for name, indices in (("keep", keep), ("drop", drop)):
        bad = [i for i in indices if not isinstance(i, (int, np.integer)) or not (0 <= i < num_experts)]
        if bad:
            raise DropMapError(f"{where}: {name} indices {bad} are outside [0, {num_experts})")
        if list(indices) != sorted(set(indices)):
            raise DropMapError(f"{where}: {name} indices must be sorted and unique")
    both = sorted(set(keep) & set(drop))
    if both:
        raise DropMapError(f"{where}: experts {both} are both kept and dropped")
    missing = sorted(set(range(num_experts)) - set(keep) - set(drop))
    if missing:
        raise DropMapError(f"{where}: experts {missing} are neither kept nor dropped")
    if len(keep) < top_k:
        raise DropMapError(
            f"{where}: keeps {len(keep)} experts, below the model's top-k routing ({top_k}); "
            f"keep at least {top_k}"
        )
