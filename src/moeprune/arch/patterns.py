"""On-disk tensor names: the vocabulary adapters state their expert-indexed tensors in, and the
matching that finds those tensors in a checkpoint.

A family module states patterns (:class:`TensorPattern`, with a role from :data:`ROLES`); the
regular expressions, the match of one tensor name and the list of patterns every MoE layer must
have are the same for every family, so they live here rather than in the adapter base
(:mod:`moeprune.arch.base`), which keeps what a family overrides.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Roles of the expert-indexed tensors on disk.
EXPERTS = "experts"  # fused expert weights, [E, ...] on the expert axis
EXPERT = "expert"  # one expert's tensor in a per-expert layout (renumbered when pruning)
EXPERT_BIAS = "expert_bias"  # fused per-expert biases [E, ...]
ROUTER_WEIGHT = "router_weight"  # router rows [E, hidden]
ROUTER_BIAS = "router_bias"  # router bias [E]
CORRECTION_BIAS = "correction_bias"  # selection-only bias added before top-k [E]
EXPERT_SCALE = "expert_scale"  # per-expert output scale [E]
ROLES = (EXPERTS, EXPERT, EXPERT_BIAS, ROUTER_WEIGHT, ROUTER_BIAS, CORRECTION_BIAS, EXPERT_SCALE)
ROUTER_ROLES = (ROUTER_WEIGHT, ROUTER_BIAS, CORRECTION_BIAS, EXPERT_SCALE)
# The router roles a recalibration fits: each routed pair's weight depends on them smoothly. A
# correction bias only chooses the experts (it never enters a weight), so no gradient reaches it.
RECALIBRATED_ROLES = (ROUTER_WEIGHT, ROUTER_BIAS, EXPERT_SCALE)

# Multimodal towers have their own "layers.N" but never routed experts.
TOWER_MARKERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio", "vision_model", "audio_model")


@dataclass(frozen=True)
class TensorPattern:
    """One kind of expert-indexed tensor of an MoE layer, as named on disk.

    ``suffix`` is a regular expression for the part of the name after ``layers.N.``; a
    per-expert pattern (role :data:`EXPERT`) has a named group ``expert``. ``axis`` is the expert
    axis of a fused tensor. ``required`` patterns must be present in every MoE layer.
    """

    suffix: str
    role: str
    label: str
    axis: int = 0
    required: bool = True

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(r"^(?P<prefix>(?:.*\.)?)layers\.(?P<layer>\d+)\.(?P<suffix>" + self.suffix + r")$")


@dataclass(frozen=True)
class ExpertTensor:
    """An expert-indexed tensor found in a checkpoint."""

    name: str
    layer: int
    role: str
    label: str  # the pattern's label (e.g. "experts.gate_up_proj", "gate_proj.weight")
    expert: int | None = None  # per-expert layout: the expert this tensor holds
    axis: int = 0
    span: tuple[int, int] | None = None  # per-expert layout: where the expert index sits in ``name``

    def renamed(self, new_expert: int) -> str:
        """This per-expert tensor's name for the expert's new index."""
        assert self.span is not None
        start, end = self.span
        return f"{self.name[:start]}{new_expert}{self.name[end:]}"


CompiledPatterns = Sequence[tuple[TensorPattern, re.Pattern[str]]]


def compile_patterns(patterns: Iterable[TensorPattern]) -> list[tuple[TensorPattern, re.Pattern[str]]]:
    """Each pattern with its compiled regular expression, in order (the first match wins)."""
    return [(pattern, pattern.regex) for pattern in patterns]


def match_expert_tensor(name: str, compiled: CompiledPatterns) -> ExpertTensor | None:
    """The expert-indexed tensor ``name`` is by the first pattern it matches (None: no pattern)."""
    for pattern, regex in compiled:
        match = regex.match(name)
        if match:
            expert = span = None
            if pattern.role == EXPERT:
                expert, span = int(match["expert"]), match.span("expert")
            return ExpertTensor(name, int(match["layer"]), pattern.role, pattern.label, expert, pattern.axis, span)
    return None


def required_labels(patterns: Iterable[TensorPattern], layout_roles: set[str]) -> list[str]:
    """Labels every MoE layer must have, given the roles found: a per-expert layout needs the
    per-expert patterns and not the fused ones, a fused layout the opposite."""
    per_expert = EXPERT in layout_roles
    labels = []
    for pattern in patterns:
        if not pattern.required:
            continue
        if pattern.role == EXPERTS and per_expert or pattern.role == EXPERT and not per_expert:
            continue
        labels.append(pattern.label)
    return labels


__all__ = [
    "CORRECTION_BIAS",
    "EXPERT",
    "EXPERTS",
    "EXPERT_BIAS",
    "EXPERT_SCALE",
    "ExpertTensor",
    "ROLES",
    "ROUTER_BIAS",
    "ROUTER_ROLES",
    "ROUTER_WEIGHT",
    "TOWER_MARKERS",
    "TensorPattern",
    "compile_patterns",
    "match_expert_tensor",
    "required_labels",
]
