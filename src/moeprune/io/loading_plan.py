"""transformers' own weight-loading plan for a model class: which checkpoint tensors (Hub layout)
make each in-memory tensor, and how (renamed, or stacked and concatenated by transformers'
converters).

It is transformers' knowledge, read from the model's conversion mapping, the same for every
family: it lives beside the checkpoint reader, not with the family adapters (:mod:`moeprune.arch`).
:mod:`moeprune.io.materialize` builds one module at a time from it (the streamed replay, one
decoder layer at a time).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from moeprune.io.checkpoint import CheckpointError


@dataclass(frozen=True)
class Placement:
    """One on-disk part of an assembled tensor: it fills ``value[index]``, narrowed to
    ``offset : offset + size`` along ``axis`` of that slice when ``axis`` is not None."""

    name: str
    index: int
    axis: int | None
    offset: int
    size: int


@dataclass(frozen=True)
class TensorAssembly:
    """How one in-memory tensor of a model is made from its checkpoint's tensors (Hub layout).

    ``groups``: (transformers source pattern, on-disk names in load order) pairs; ``converter``:
    None when the tensor is the one on-disk tensor of ``names`` (perhaps renamed), else the
    transformers ``WeightConverter`` that ``from_pretrained`` runs to assemble it.
    """

    target: str
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    converter: Any = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, names in self.groups for name in names)

    def placements(self, shapes: Mapping[str, tuple[int, ...]]) -> list[Placement] | None:
        """Where each part lands in the assembled tensor, for the converters that only stack
        (``MergeModulelist(dim=0)``) and then concatenate (``Concatenate(dim=d)``) their parts, in
        the converter's source-pattern order: part ``k`` of a group is the slice ``[k]`` and, after a
        concatenation, the span of its group along ``d``. ``shapes``: on-disk name -> shape. None
        for any other converter (then :meth:`assemble` runs transformers' ops themselves)."""
        from transformers.core_model_loading import Concatenate, MergeModulelist

        ops = list(getattr(self.converter, "operations", None) or [])
        if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
            return None
        if len(ops) == 1 and len(self.groups) == 1:
            axis = None
        elif len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1:
            axis = ops[1].dim - 1  # the concatenation axis within one expert's slice
        else:
            return None
        order = {pattern: position for position, pattern in enumerate(self.converter.source_patterns)}
        placed, offset = [], 0
        for pattern, names in sorted(self.groups, key=lambda group: order.get(group[0], len(order))):
            size = shapes[names[0]][axis] if axis is not None else 0
            for index, name in enumerate(names):
                placed.append(Placement(name, index, axis, offset, size))
            offset += size
        return placed

    def assemble(self, tensors: dict[str, Any], model: Any = None) -> Any:
        """The tensor, from ``tensors`` (on-disk name -> tensor already cast to the model's dtype),
        by transformers' own converter operations, called as ``from_pretrained`` calls them.

        The parts are popped from ``tensors``, so transformers' ops free each as they go (at most
        about one extra copy of the result is alive at once)."""
        if self.converter is None:
            return tensors.pop(self.names[0])
        import copy

        converter = copy.deepcopy(self.converter)
        for pattern, names in self.groups:
            converter.collected_tensors[pattern] = [tensors.pop(name) for name in names]
        out = converter.convert(self.target, model=model, config=getattr(model, "config", None))
        value = out.get(self.target)
        if value is None or len(out) != 1:
            raise CheckpointError(f"transformers' conversion of {list(self.names)[:3]}... gave {sorted(out)}, "
                            f"not '{self.target}'")
        return value[0] if isinstance(value, list) else value


def loading_plan(model: Any, names: Iterable[str]) -> dict[str, TensorAssembly]:
    """How each persistent tensor of ``model`` (in-memory name) is made from the checkpoint
    tensors ``names`` (Hub layout), for building one module at a time from the shards.

    This is transformers' own weight-loading plan, step 1 of
    ``core_model_loading.convert_and_load_state_dict_in_model``: the model's conversion mapping
    (``get_model_conversion_mapping``: renamings such as Mixtral's ``block_sparse_moe`` ->
    ``mlp``, converters such as ``MergeModulelist(0)`` + ``Concatenate(1)`` stacking
    ``experts.{i}.gate_proj``/``up_proj`` into ``experts.gate_up_proj [E, 2I, H]``) applied to
    the names in the same natural order, so a layer assembled from only its own tensors is
    exactly the one ``from_pretrained`` builds. Names the model has no slot for are left out.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    mapping = get_model_conversion_mapping(model)
    renamings = [entry for entry in mapping if isinstance(entry, WeightRenaming)]
    converters = [entry for entry in mapping if isinstance(entry, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    slots = {name: None for name in model.state_dict(keep_vars=True)}
    prefix = model.base_model_prefix
    found: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for original in sorted(names, key=dot_natural_key):
        renamed, pattern = rename_source_key(original, renamings, converters, prefix, slots)
        if renamed not in slots and original in slots:
            renamed, pattern = rename_source_key(original, [], [], base_model_prefix=prefix, meta_state_dict=slots)
        if renamed not in slots:
            continue
        converter = by_pattern[pattern] if pattern is not None else None
        entry = found.setdefault(renamed, (converter, {}))
        entry[1].setdefault(pattern if pattern is not None else original, []).append(original)
    sources = {}
    for target, (converter, groups) in found.items():
        if converter is None and (len(groups) != 1 or len(next(iter(groups.values()))) != 1):
            raise CheckpointError(f"checkpoint tensors {sorted(n for g in groups.values() for n in g)} all map to "
                            f"'{target}'; the checkpoint does not match its model class")
        sources[target] = TensorAssembly(target, tuple((k, tuple(v)) for k, v in groups.items()), converter)
    return sources


__all__ = ["Placement", "TensorAssembly", "loading_plan"]
