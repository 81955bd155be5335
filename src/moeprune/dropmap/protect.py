"""Protected experts: kept whatever the criterion says (recipe ``dropmap.protect``), and why.

Two rules:

- ``"super-experts"``, REAP's ``perserve_super_experts`` rule (after arXiv 2507.23279): an
  expert is a super expert when its maximum activation norm (the profile's
  ``max_activation_norm``, :func:`moeprune.profile.stats.max_activation_norm`) is above a
  threshold set by the whole model's distribution of that statistic. The threshold is the larger
  of the 99.5th percentile of every (MoE layer, expert) maximum pooled together (linear
  interpolation between order statistics, as ``torch.quantile`` and ``numpy.quantile`` compute it)
  and a tenth of the largest of them; the comparison is strict. Only the first 75% of the MoE
  layers (``int(0.75 * layers)``, in layer order) are considered, as REAP does unless told to
  keep the last layers' outliers too: their massive activations are the ones later layers rely
  on. Such an expert fires rarely, so a summed criterion may rank it last, yet dropping it breaks
  the model out of proportion to its share.
- a list of ``[layer, expert]`` pairs (decoder layer index, expert index): kept as listed.

A protected expert is kept first in its layer's keep order (before the criterion's order), so
every strategy keeps it; counts never go below the most protected experts of a layer (of a
routing group, for grouped routers). The drop map records the rule and its threshold in
``strategy.protect`` and, per layer, each protected expert with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moeprune.errors import MoepruneError

SUPER_EXPERTS = "super-experts"
LISTED = "listed"
SUPER_EXPERT_QUANTILE = 0.995
SUPER_EXPERT_FRACTION_OF_MAX = 0.1
SUPER_EXPERT_LAYER_FRACTION = 0.75
STATISTIC = "max_activation_norm"


class ProtectError(MoepruneError):
    """A protection setting that cannot be applied to this model or profile."""


@dataclass(frozen=True)
class Protection:
    """Which experts of each MoE layer row are protected ([layers, experts] bool), by which rule."""

    rule: str
    mask: np.ndarray
    threshold: float | None = None
    max_norm: np.ndarray | None = None
    listed: tuple[tuple[int, int], ...] = ()
    layers: tuple[int, ...] = ()
    """Decoder layer index of each row (for messages)."""

    def layer(self, row: int) -> str:
        return f"layer {self.layers[row]}" if row < len(self.layers) else f"layer row {row}"

    def record(self) -> dict[str, Any]:
        """``strategy.protect`` of the drop map."""
        if self.rule == SUPER_EXPERTS:
            return {"rule": SUPER_EXPERTS, "statistic": STATISTIC, "quantile": SUPER_EXPERT_QUANTILE,
                    "fraction_of_max": SUPER_EXPERT_FRACTION_OF_MAX, "layer_fraction": SUPER_EXPERT_LAYER_FRACTION,
                    "threshold": self.threshold}
        return {"rule": LISTED, "experts": [list(pair) for pair in self.listed]}

    def layer_record(self, row: int) -> list[dict[str, Any]]:
        """The layer entry's ``protected``: each protected expert and why."""
        out = []
        for expert in np.flatnonzero(self.mask[row]):
            if self.rule == SUPER_EXPERTS:
                assert self.max_norm is not None
                out.append({"expert": int(expert), "because": "super-expert",
                            "max_activation_norm": float(self.max_norm[row, expert])})
            else:
                out.append({"expert": int(expert), "because": "listed"})
        return out

    def reason(self, row: int, expert: int) -> str:
        if self.rule == SUPER_EXPERTS and self.max_norm is not None:
            return (f"a super expert: max activation norm {float(self.max_norm[row, expert]):.6g} > threshold "
                    f"{self.threshold:.6g}")
        return "listed in dropmap.protect"


def super_experts(max_norm: np.ndarray, layers: Sequence[int] = ()) -> Protection:
    """REAP's super-experts rule (module docstring) over ``max_norm`` [layers, experts]."""
    values = np.asarray(max_norm, dtype=np.float64)
    if values.ndim != 2 or values.size == 0 or not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ProtectError(f"{STATISTIC}: expected finite, non-negative [layers, experts] values, got shape "
                           f"{values.shape}; rerun `invoke profile`")
    threshold = max(float(np.quantile(values, SUPER_EXPERT_QUANTILE)),
                    float(values.max()) * SUPER_EXPERT_FRACTION_OF_MAX)
    mask = values > threshold
    mask[int(values.shape[0] * SUPER_EXPERT_LAYER_FRACTION):] = False
    return Protection(SUPER_EXPERTS, mask, threshold=threshold, max_norm=values, layers=tuple(int(i) for i in layers))


def listed_experts(pairs: Sequence[Sequence[int]], layers: Sequence[int], num_experts: int) -> Protection:
    """The experts a recipe lists as ``[layer, expert]`` pairs; ProtectError naming a pair that does not exist."""
    rows = {int(layer): row for row, layer in enumerate(layers)}
    mask = np.zeros((len(layers), num_experts), dtype=bool)
    listed = []
    for pair in pairs:
        layer, expert = (int(v) for v in pair)
        if layer not in rows:
            raise ProtectError(f"field 'dropmap.protect' = [{layer}, {expert}]: decoder layer {layer} has no routed experts "
                               f"(MoE layers: {list(layers)})")
        if not 0 <= expert < num_experts:
            raise ProtectError(f"field 'dropmap.protect' = [{layer}, {expert}]: expert {expert} is outside [0, {num_experts})")
        mask[rows[layer], expert] = True
        listed.append((layer, expert))
    return Protection(LISTED, mask, listed=tuple(sorted(set(listed))), layers=tuple(int(i) for i in layers))


def protection_for(setting: Any, layers: Sequence[int], num_experts: int,
                   max_norm: np.ndarray | None) -> Protection | None:
    """The protection a recipe's ``dropmap.protect`` (or a drop map's ``strategy.protect``) asks for."""
    if setting is None:
        return None
    if isinstance(setting, dict):  # a drop map's record
        if setting.get("rule") == LISTED:
            return listed_experts(setting.get("experts") or [], layers, num_experts)
        setting = setting.get("rule")
    if setting == SUPER_EXPERTS:
        if max_norm is None:
            raise ProtectError(f"dropmap.protect = \"{SUPER_EXPERTS}\" needs the profile's {STATISTIC}, which "
                               "profile/profile.json lacks (made by an older moeprune); rerun `invoke profile`")
        values = np.asarray(max_norm, dtype=np.float64)
        if values.shape != (len(layers), num_experts):
            raise ProtectError(f"profile/profile.json: {STATISTIC} has shape {values.shape}, the profile statistics "
                               f"[{len(layers)}, {num_experts}]; rerun `invoke profile`")
        return super_experts(values, layers)
    if isinstance(setting, (list, tuple)):
        return listed_experts(setting, layers, num_experts)
    raise ProtectError(f"dropmap.protect = {setting!r}: use \"{SUPER_EXPERTS}\" or a list of [layer, expert] pairs")


__all__ = ["LISTED", "SUPER_EXPERTS", "ProtectError", "Protection", "listed_experts", "protection_for",
           "super_experts"]
