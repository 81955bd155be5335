"""Router recalibration after pruning: fit the kept router parameters so each pruned MoE block's
output matches the base block's on the calibration hidden states (issue 24, item 1).

This module stays free of torch: verify-prune and the stage graph import it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECORD_NAME = "recalibrate.json"  # the record beside the recalibrated weights


def pruned_side_dir(recipe: Any, layout: Any) -> Path:
    """The checkpoint the pruned side converts and evaluates: the recalibrated one when the
    recipe's ``[recalibrate]`` is enabled, else the plain pruned one (the one definition)."""
    return layout.recalibrated_dir if recipe.recalibrate.enabled else layout.pruned_dir
