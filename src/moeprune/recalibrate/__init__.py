"""Router recalibration after pruning: fit the kept router parameters so each pruned MoE block's
output matches the base block's on the calibration hidden states (``layer-mse``), or so the pruned
model's next-token distribution matches the base's on text in the scored format (``model-kl``)
(issue 24, item 1).

This module stays free of torch: verify-prune and the stage graph import it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECORD_NAME = "recalibrate.json"  # the record beside the recalibrated weights
# The ``[recalibrate]`` fields the fit reads: the record's ``settings``, verify's rerun and the card.
FIT_SETTINGS = ("max_steps", "learning_rate", "patience_steps", "holdout_fraction", "seed")
# What the ``model-kl`` objective reads besides FIT_SETTINGS (recorded only for that objective, so a
# ``layer-mse`` record is byte for byte what it was before the objective existed); the record also
# holds the text's resolved path and sha256.
MODEL_KL_SETTINGS = ("objective", "context_tokens", "batch_sequences", "epochs", "relax_tau_start", "relax_tau_end",
                     "validate_every_steps")
MODEL_KL = "model-kl"


def pruned_side_dir(recipe: Any, layout: Any) -> Path:
    """The checkpoint the pruned side converts, evaluates and publishes: the recalibrated one when
    the recipe's ``[recalibrate]`` is enabled, else the plain pruned one (the one definition)."""
    return published_dir(layout, recipe.recalibrate.enabled)


def measured_models(recipe: Any) -> tuple[str, ...]:
    """The models a run converts, quantizes, evaluates and KLD-scores: base and pruned, and with
    ``[recalibrate]`` on also the plain pruned checkpoint (before recalibration) at the same size,
    so the card shows what the recalibration buys."""
    return ("base", "pruned", "plain") if recipe.recalibrate.enabled else ("base", "pruned")


def run_checkpoint(recipe: Any, layout: Any, which: str) -> Path:
    """The run's checkpoint a pruned-side model is converted from: ``pruned`` the one published
    (:func:`pruned_side_dir`), ``plain`` the pruned one before recalibration."""
    return layout.pruned_dir if which == "plain" else pruned_side_dir(recipe, layout)


def published_dir(layout: Any, recalibrated: bool) -> Path:
    """The run's checkpoint that is converted and published, for a run recalibrated or not."""
    return layout.recalibrated_dir if recalibrated else layout.pruned_dir


def recorded_enabled(settings: dict[str, Any]) -> bool:
    """Whether a recorded recipe (``Recipe.settings()``, a manifest's ``recipe``) recalibrated the
    router; a recipe recorded before ``[recalibrate]`` existed did not."""
    return bool((settings.get("recalibrate") or {}).get("enabled", False))


def recorded_side_dir(settings: dict[str, Any], layout: Any) -> Path:
    """:func:`pruned_side_dir` for a recorded recipe (manifest, card, publish and verify read one)."""
    return published_dir(layout, recorded_enabled(settings))
