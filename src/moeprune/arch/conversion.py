"""Expert tensor patterns on disk, derived from transformers' own weight conversion mapping.

transformers 5 holds experts fused in memory (``experts.gate_up_proj`` [E, 2I, H],
``experts.down_proj`` [E, H, I]) and, for the families whose Hub checkpoints keep one tensor per
expert, states how to build them in ``conversion_mapping``: a ``WeightConverter`` whose sources
are the per-expert names (``mlp.experts.*.gate_proj.weight``, ``.experts.*.w1.weight``) and whose
operations start with ``MergeModulelist`` (stack the experts on axis 0). Those converters are the
one statement of a family's per-expert layout, so the adapters read them here instead of
restating them: a family module states only its router, bias and scale tensors, and its own
expert patterns only where transformers has no mapping (its checkpoints are fused already).

A source or target that starts with ``.`` matches under any module (Mixtral's
``block_sparse_moe`` on disk is renamed to ``mlp`` in memory): it becomes one module segment here.
transformers is imported on first use only (it pulls in torch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from moeprune.arch.base import ArchError
from moeprune.arch.patterns import EXPERT, EXPERTS, TensorPattern

_ANY_MODULE = r"[A-Za-z_]\w*\."


def _suffix_regex(pattern: str, expert_group: bool) -> str:
    """The :class:`TensorPattern` suffix of a converter pattern (``*`` is the expert index)."""
    module, leading_dot = pattern, pattern.startswith(".")
    if leading_dot:
        module = pattern[1:]
    escaped = re.escape(module).replace(r"\*", r"(?P<expert>\d+)" if expert_group else r"\d+")
    return (_ANY_MODULE if leading_dot else "") + escaped


def _label(pattern: str, per_expert: bool) -> str:
    """The label moeprune gives a tensor of this pattern: ``gate_proj.weight`` (the part after the
    expert index) for a per-expert tensor, ``experts.gate_up_proj`` for a fused one."""
    if per_expert:
        return pattern.split("*.", 1)[1]
    return "experts." + pattern.rsplit("experts.", 1)[1]


def patterns_from_converters(converters: Iterable[object]) -> tuple[TensorPattern, ...]:
    """Per-expert and fused expert patterns of the expert-merging converters among ``converters``
    (transformers ``WeightConverter`` objects), in their order: every per-expert source, then
    every fused target."""
    split: list[TensorPattern] = []
    fused: list[TensorPattern] = []
    for converter in converters:
        operations = [type(op).__name__ for op in getattr(converter, "operations", ())]
        sources = list(getattr(converter, "source_patterns", ()))
        if not operations or operations[0] != "MergeModulelist" or not all("experts.*." in s for s in sources):
            continue
        for source in sources:
            split.append(TensorPattern(_suffix_regex(source, True), EXPERT, _label(source, True)))
        for target in getattr(converter, "target_patterns", ()):
            fused.append(TensorPattern(_suffix_regex(target, False), EXPERTS, _label(target, False)))
    return tuple(split + fused)


def transformers_expert_patterns(conversion_types: Iterable[str]) -> tuple[TensorPattern, ...] | None:
    """The expert patterns transformers' conversion mapping states for the first of
    ``conversion_types`` (``model_type`` values) that has expert-merging converters; None if none has."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    for conversion_type in conversion_types:
        patterns = patterns_from_converters(get_checkpoint_conversion_mapping(conversion_type) or ())
        if patterns:
            return patterns
    return None


def expert_patterns_for(family: str, conversion_types: tuple[str, ...],
                        own: tuple[TensorPattern, ...]) -> tuple[TensorPattern, ...]:
    """A family's expert patterns: its ``own`` where it states them (only families transformers has
    no mapping for do: tests/test_arch_conversion.py; transformers is then not imported, which
    keeps the header scans of fused families such as the demo's Gemma 4 cheap), else transformers'."""
    if own:
        return own
    derived = transformers_expert_patterns(conversion_types)
    if derived is not None:
        return derived
    raise ArchError(f"{family}: transformers has no expert conversion mapping for {', '.join(conversion_types)} "
                    "and the adapter states no expert patterns; set own_expert_patterns in its module")
