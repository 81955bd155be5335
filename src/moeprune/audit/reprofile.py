"""(e) Re-run the profile with the claimed method and compare kept sets and retained fractions.

The recipe names the base model, the calibration prompts and the criterion; the profile and drop
map are made in a temporary run directory (nothing of the audited artifact is touched). The
retained fraction of each layer is that of the *claimed* keep set, measured on the statistic the
recipe's criterion thresholds on (``sequence_norm_sum`` for ``sequence-norm-sum``, else
``contribution_sum``): what the card's per-layer table states.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from moeprune.audit.report import AuditReport
from moeprune.errors import MoepruneError


def reprofile(report: AuditReport, recipe_path: Path, claimed_keep: dict[int, list[int]],
              claimed_method: Any, source: str) -> dict[str, tuple[float, str]]:
    """Profile + drop map with ``recipe_path``; add (e) rows; return ``{"retained/L<n>": (fraction, origin)}``."""
    from moeprune.dropmap.select import retention_statistic
    from moeprune.dropmap.stage import run_dropmap
    from moeprune.layout import RunLayout
    from moeprune.profile.stage import run_profile
    from moeprune.profile.stats import load_stats
    from moeprune.recipe import load_recipe

    try:
        recipe = load_recipe(recipe_path)
    except MoepruneError as exc:
        report.failed("e", "re-profile recipe", str(recipe_path), str(exc))
        return {}
    criterion = recipe.dropmap.criterion
    measure = retention_statistic(criterion)
    report.add("e", "claimed method", source, "not checked", claimed=str(claimed_method),
               recomputed=f"{recipe.dropmap.strategy} / {criterion} / {recipe.dropmap.retention_threshold}",
               detail=f"the method string is not machine-checked; the re-profile uses {recipe_path.name}")
    with tempfile.TemporaryDirectory(prefix="moeprune-audit-") as tmp:
        layout = RunLayout(Path(tmp) / recipe.name)
        try:
            run_profile(recipe, layout, progress=False)
            drop_map = run_dropmap(recipe, layout)
            stats = load_stats(layout.profile_stats_path)
        except MoepruneError as exc:
            report.failed("e", "re-profile", str(recipe_path), f"re-profiling with {recipe_path} failed: {exc}")
            return {}
    origin = f"re-profile with {recipe_path.name} ({measure})"
    ours = {entry["layer"]: entry["keep"] for entry in drop_map["layers"]}
    report.compare("e", "MoE layers", source, sorted(claimed_keep), sorted(ours), sorted(claimed_keep) == sorted(ours))
    claimed_counts = sorted({len(v) for v in claimed_keep.values()})
    report.compare("e", "experts kept per layer", source, claimed_counts, drop_map["num_experts_kept"],
                   claimed_counts == [drop_map["num_experts_kept"]], origin)
    differing = []
    for layer in sorted(set(claimed_keep) & set(ours)):
        theirs, mine = sorted(claimed_keep[layer]), sorted(ours[layer])
        if theirs != mine:
            only_claimed = sorted(set(theirs) - set(mine))
            only_ours = sorted(set(mine) - set(theirs))
            differing.append(f"layer {layer}: kept only in the artifact {only_claimed}, only in the re-profile {only_ours}")
    if differing:
        for line in differing:
            report.failed("e", "kept expert set", source, f"{source}: {line}")
    else:
        report.passed("e", "kept expert set", source, f"every layer keeps the same experts as the re-profile ({origin})")
    retained: dict[str, tuple[float, str]] = {}
    values = stats.totals[measure]
    for row, layer in enumerate(stats.layers):
        keep = claimed_keep.get(layer)
        if keep is None or any(not 0 <= i < values.shape[1] for i in keep):
            continue
        total = math.fsum(values[row].tolist())
        if total > 0:
            retained[f"retained/L{layer}"] = (math.fsum(values[row, keep].tolist()) / total, origin)
    return retained
