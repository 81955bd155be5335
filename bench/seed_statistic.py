"""Per-token vs per-sequence (the seed's) statistic on a profile: rankings, keep counts, and how the
keep count moves with the calibration prompts (each domain's prompts alone vs all of them).

    python bench/seed_statistic.py runs/demo/profile/stats.safetensors --top-k 2

Prints figures; asserts nothing (docs/fidelity.md quotes its output for the demo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moeprune.dropmap.select import criterion_scores, rank_experts, retention_statistic, select_experts  # noqa: E402
from moeprune.profile.stats import load_stats  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stats", type=Path, help="profile/stats.safetensors of a run")
    parser.add_argument("--top-k", type=int, required=True, help="the model's top-k routing (floor of the keep count)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.99, 0.95, 0.90, 0.80])
    args = parser.parse_args()
    stats = load_stats(args.stats)
    if "sequence_norm_sum" not in stats.totals:
        raise SystemExit(f"{args.stats}: no sequence_norm_sum (profile made before it existed); rerun `invoke profile`")
    per_token, per_sequence = (rank_experts(stats.totals[n]) for n in ("contribution_sum", "sequence_norm_sum"))
    differ = [layer for row, layer in enumerate(stats.layers) if (per_token[row] != per_sequence[row]).any()]
    print(f"{len(stats.layers)} MoE layers, {stats.num_experts} experts, {stats.num_tokens} tokens, "
          f"domains {', '.join(stats.domains)}")
    print(f"rankings differ (per-token vs per-sequence) in {len(differ)} of {len(stats.layers)} layers: {differ}")
    print("keep count of uniform-min-retention (all prompts | each domain's prompts alone):")
    for threshold in args.thresholds:
        for criterion in ("contribution-sum", "sequence-norm-sum"):
            measure = retention_statistic(criterion)
            counts, masks = [], []
            for group in [stats.totals] + [stats.per_domain[d] for d in stats.domains]:
                selection = select_experts("uniform-min-retention", group[measure], criterion_scores(criterion, group),
                                           top_k=args.top_k, criterion=criterion, retention_threshold=threshold)
                counts.append(selection.keep_count)
                masks.append(selection.keep_mask)
            if criterion == "contribution-sum":
                token_mask = masks[0]
            same = "" if criterion == "contribution-sum" else \
                f"; keep sets equal to per-token's in {int((token_mask == masks[0]).all(axis=1).sum())} layers"
            shown = " ".join(f"{d}={c}" for d, c in zip(stats.domains, counts[1:]))
            print(f"  > {threshold:.2f} {criterion:18s} all={counts[0]:3d} | {shown}{same}")


if __name__ == "__main__":
    main()
