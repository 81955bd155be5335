"""The dropmap stage: profile statistics + recipe -> ``runs/<name>/expert_drop_metadata.json``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console

from moeprune.arch import ModelSpec
from moeprune.base_model import resolve_base
from moeprune.dropmap.io import build_drop_map, check_profile_matches_model, moe_shape, read_model_config, write_drop_map
from moeprune.dropmap.report import print_report
from moeprune.dropmap.groups import RoutingGroups
from moeprune.dropmap.protect import STATISTIC, ProtectError, protection_for
from moeprune.dropmap.select import DropMapError, select_from_profile
from moeprune.errors import RecipeError
from moeprune.hashing import sha256_file, sha256_json
from moeprune.layout import RunLayout
from moeprune.recipe import DropMapSection, Recipe

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def with_dropmap_overrides(recipe: Recipe, **overrides: Any) -> Recipe:
    """The recipe with some ``[dropmap]`` fields replaced (None values are ignored).

    The section is validated again, so an override gets the same checks and messages as the file.
    """
    changes = {key: value for key, value in overrides.items() if value is not None}
    if not changes:
        return recipe
    data = recipe.dropmap.model_dump() | changes
    try:
        section = DropMapSection.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"dropmap.{'.'.join(str(p) for p in err['loc']) or '<section>'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        raise RecipeError("invalid drop-map settings:\n  - " + "\n  - ".join(problems)) from None
    return recipe.model_copy(update={"dropmap": section})


def base_model_config(recipe: Recipe) -> tuple[dict[str, Any], str]:
    """(config.json contents, where it was read) of the recipe's base model."""
    from moeprune.base_model import resolve_base

    base_dir = resolve_base(recipe).local_dir  # a Hub model: the snapshot the profile stage downloaded
    return read_model_config(base_dir), str(base_dir / "config.json")


def read_max_activation_norm(summary_path: Path) -> Any:
    """``max_activation_norm`` of a profile summary (profile.json), or None where it has none."""
    import numpy as np

    from moeprune.userfile import read_json_object

    if not summary_path.is_file():
        raise DropMapError(f"{summary_path}: profile summary not found; run `invoke profile` first")
    values = read_json_object(summary_path, "profile summary", DropMapError).get(STATISTIC)
    return None if values is None else np.asarray(values, dtype=np.float64)


def run_dropmap(recipe: Recipe, layout: RunLayout, console: Console | None = None) -> dict[str, Any]:
    """Select the experts to drop from the profile and write the drop map; return it.

    Reads ``layout.profile_stats_path``, checks it against the base model's config, applies the
    recipe's ``[dropmap]`` strategy, writes ``layout.drop_map_path`` atomically and, with a
    ``console``, prints the per-layer retention report.
    """
    from moeprune.profile.stats import load_stats

    stats_path = layout.profile_stats_path
    if not stats_path.is_file():
        raise DropMapError(f"{stats_path}: profile statistics not found; run `invoke profile` first")
    stats = load_stats(stats_path)
    config, config_source = base_model_config(recipe)
    _, top_k, _ = moe_shape(config, config_source)
    contribution = stats.totals["contribution_sum"]
    check_profile_matches_model(stats.layers, int(contribution.shape[1]), config, stats_path, config_source)

    settings = recipe.dropmap
    try:
        protection = protection_for(settings.protect, stats.layers, int(contribution.shape[1]),
                                    read_max_activation_norm(layout.profile_summary_path)
                                    if settings.protect == "super-experts" else None)
    except ProtectError as exc:
        raise DropMapError(str(exc)) from None
    groups = RoutingGroups(*ModelSpec.from_config(config, config_source).routing_groups())
    selection = select_from_profile(
        stats.totals,
        stats.per_domain,
        strategy=settings.strategy,
        criterion=settings.criterion,
        top_k=top_k,
        retention_threshold=settings.retention_threshold,
        keep_count=settings.keep_count,
        protect_top_k=settings.protect_top_k,
        seed=settings.seed,
        protection=protection,
        groups=groups,
    )
    model_sha = stats.model_sha256 if _SHA256.match(str(stats.model_sha256 or "")) else None
    drop_map = build_drop_map(
        selection,
        layers=list(stats.layers),
        top_k=top_k,
        # A Hub model's revision is recorded as the commit downloaded, never as a branch name.
        base_model={**resolve_base(recipe).record(), "sha256": model_sha},
        profile_stats_sha256=sha256_file(stats_path),
        recipe_sha256=sha256_json(recipe.settings()),
        profile_num_tokens=int(stats.num_tokens) if stats.num_tokens is not None else None,
    )
    write_drop_map(layout.drop_map_path, drop_map, model_config=config)
    if console is not None:
        print_report(drop_map, console)
        console.print(f"wrote {layout.drop_map_path}")
    return drop_map

