"""The typed drop map: what ``expert_drop_metadata.json`` says, validated once.

A :class:`DropMap` only comes from :meth:`DropMap.load` or :meth:`DropMap.from_dict`, both of
which run the one validation (:func:`moeprune.dropmap.io.check_drop_map`: schema, invariants and,
given the model's config, the fit to that model and its family's constraints). Code that holds
a DropMap never re-checks it. It reads as the JSON document too (a read-only mapping whose values
are copies), so ``drop_map["layers"]`` and ``drop_map == json.load(...)`` keep working.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

# The one definition of the selection vocabulary: the recipe's fields, the drop-map schema's
# enums (tied by a test), the task help and every check derive from these.
Criterion = Literal["contribution-sum", "sequence-norm-sum", "reap-mean", "frequency", "domain-max", "random"]
Strategy = Literal["uniform-min-retention", "uniform-count", "per-layer-retention"]
CRITERIA: tuple[str, ...] = get_args(Criterion)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
RETENTION_STRATEGIES: tuple[str, ...] = ("uniform-min-retention", "per-layer-retention")
"""The strategies that keep experts until a retention threshold is met (they need one)."""
# A drop map whose keep sets were chosen by hand or by another tool: nothing to re-select, but its
# retained fractions are still measured on the profile statistics (moeprune.dropmap.rederive).
MANUAL = "manual"


@dataclass(frozen=True)
class LayerChoice:
    """One MoE layer's decision."""

    layer: int
    keep: tuple[int, ...]
    drop: tuple[int, ...]
    retained_fraction: float | None
    criterion_retained_fraction: float | None = None
    protected: tuple[int, ...] = ()
    """Experts kept whatever the criterion said (``strategy.protect``); the reasons are in the document."""


class DropMap(Mapping[str, Any]):
    """A validated drop map. Build it with :meth:`load` or :meth:`from_dict`."""

    __slots__ = ("_data", "source", "layers")

    def __init__(self, data: dict[str, Any], source: str | Path, _validated: bool = False) -> None:
        if not _validated:
            raise TypeError("use DropMap.load() or DropMap.from_dict(): they validate the drop map")
        self._data = copy.deepcopy(data)
        self.source = source
        self.layers: tuple[LayerChoice, ...] = tuple(
            LayerChoice(
                layer=int(entry["layer"]),
                keep=tuple(int(i) for i in entry["keep"]),
                drop=tuple(int(i) for i in entry["drop"]),
                retained_fraction=entry.get("retained_fraction"),
                criterion_retained_fraction=entry.get("criterion_retained_fraction"),
                protected=tuple(int(p["expert"]) for p in entry.get("protected") or ()),
            )
            for entry in data["layers"]
        )

    # ---- construction: the one loader and the one validation ------------------------------------

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], source: str | Path = "<drop map>", model_config: Mapping[str, Any] | None = None
    ) -> DropMap:
        """Validate ``data`` (and its fit to ``model_config`` if given) and wrap it."""
        from moeprune.dropmap.io import check_drop_map

        plain = json.loads(json.dumps(dict(data)))
        check_drop_map(plain, source=source, model_config=dict(model_config) if model_config is not None else None)
        return cls(plain, source, _validated=True)

    @classmethod
    def load(cls, path: str | Path, model_config: Mapping[str, Any] | None = None) -> DropMap:
        """Read ``expert_drop_metadata.json`` and validate it (see :meth:`from_dict`)."""
        from moeprune.dropmap.select import DropMapError

        from moeprune.userfile import read_json_object

        path = Path(path)
        if not path.exists():
            raise DropMapError(f"{path}: drop map not found; run `invoke dropmap` first")
        data = read_json_object(path, "drop map", DropMapError)
        return cls.from_dict(data, source=path, model_config=model_config)

    # ---- typed view ----------------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return int(self._data["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self._data["top_k"])

    @property
    def num_experts_kept(self) -> int | None:
        return self._data["num_experts_kept"]

    @property
    def uniform(self) -> bool:
        return bool(self._data["uniform"])

    @property
    def routing_groups(self) -> int:
        """Routing groups every layer keeps the same number of experts in (1: an ungrouped router)."""
        return int((self._data.get("routing_groups") or {}).get("n_group", 1))

    @property
    def strategy_name(self) -> str:
        return str(self._data["strategy"]["name"])

    @property
    def base_model_id(self) -> str:
        return str(self._data["base_model"]["id"])

    @property
    def moe_layers(self) -> list[int]:
        return [entry.layer for entry in self.layers]

    @property
    def keep_by_layer(self) -> dict[int, list[int]]:
        return {entry.layer: list(entry.keep) for entry in self.layers}

    @property
    def drop_by_layer(self) -> dict[int, list[int]]:
        return {entry.layer: list(entry.drop) for entry in self.layers}

    @property
    def kept_counts(self) -> list[int]:
        """Distinct kept-expert counts, ascending (one value for a uniform map)."""
        return sorted({len(entry.keep) for entry in self.layers})

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (a copy)."""
        return copy.deepcopy(self._data)

    # ---- read-only mapping over the JSON document ----------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (f"DropMap({self.source}: {len(self.layers)} layers, "
                f"{self.num_experts_kept if self.uniform else 'varying'} of {self.num_experts} kept)")


__all__ = ["DropMap", "LayerChoice"]
