"""Building blocks shared by the families whose Hub layout keeps one tensor per expert."""

from __future__ import annotations

from moeprune.arch.base import EXPERT, EXPERTS, TensorPattern


def expert_patterns(module: str, projections: tuple[str, ...], fused: tuple[str, ...] = ("gate_up_proj", "down_proj")
                    ) -> tuple[TensorPattern, ...]:
    """Per-expert ``{module}.experts.{i}.{proj}.weight`` tensors, or (a checkpoint saved fused) ``{module}.experts.{fused}``."""
    escaped = module.replace(".", r"\.")
    split = tuple(
        TensorPattern(escaped + r"\.experts\.(?P<expert>\d+)\." + proj + r"\.weight", EXPERT, f"{proj}.weight")
        for proj in projections
    )
    whole = tuple(TensorPattern(escaped + r"\.experts\." + name, EXPERTS, f"experts.{name}") for name in fused)
    return split + whole
