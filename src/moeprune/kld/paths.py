"""Where the kld stage keeps its large, never-published files: the reference's log-probabilities,
the rival quants and a fetched held-out text.

The run's ``kld/`` by default; ``kld.work_dir`` puts them on another filesystem (the reference's
log-probabilities alone are ~13 GB at the reference's shapes). What the stage records names them
``kld/<file>`` either way, so ``eval/kld.json`` does not depend on where they were kept.
"""

from __future__ import annotations

from pathlib import Path

from moeprune.layout import RunLayout
from moeprune.recipe import Recipe


def kld_work_dir(recipe: Recipe, layout: RunLayout) -> Path:
    """``kld.work_dir`` (relative to the recipe file) with one directory per run, else the run's kld/."""
    if recipe.kld.work_dir is None:
        return layout.kld_work_dir
    return recipe.resolve(recipe.kld.work_dir) / layout.run_name

