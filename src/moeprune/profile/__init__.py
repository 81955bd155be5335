"""Two-phase expert-contribution profiling.

Phase 1 (:mod:`.generate`) lets the model continue every calibration prompt; phase 2
(:mod:`.replay` with :mod:`.hooks`) replays each sequence in one instrumented forward pass and
accumulates, per MoE layer and expert, the L2 norm of the weighted expert output. :mod:`.stats`
saves and loads the statistics, :mod:`.findings` computes the card's findings, :mod:`.stage`
ties it together (``run_profile``).

Imports are lazy so that ``moeprune.profile.stats`` can be used without importing torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProfileStats", "load_stats", "run_profile"]


def __getattr__(name: str) -> Any:
    if name == "run_profile":
        from moeprune.profile.stage import run_profile

        return run_profile
    if name in ("ProfileStats", "load_stats"):
        from moeprune.profile import stats

        return getattr(stats, name)
    raise AttributeError(f"module 'moeprune.profile' has no attribute {name!r}")
