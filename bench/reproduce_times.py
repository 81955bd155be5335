"""Time `invoke reproduce` on the demo, stage by stage.

Runs the whole pipeline from scratch into a temporary runs directory (llama.cpp is built first,
and its build time is reported apart: the target, demo end to end under 10 minutes on 2 cores,
assumes llama.cpp is already built), then runs it again to time the all-skipped path.

    python bench/reproduce_times.py [--recipe recipes/demo.toml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moeprune.layout import RunLayout  # noqa: E402
from moeprune.llamacpp.build import ensure_llamacpp  # noqa: E402
from moeprune.pipeline.reproduce import reproduce  # noqa: E402
from moeprune.recipe import load_recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    parser.add_argument("--keep", help="Write the run here instead of a temporary directory.")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)

    started = time.monotonic()
    ensure_llamacpp(recipe.llamacpp)
    build_s = time.monotonic() - started

    with tempfile.TemporaryDirectory(prefix="moeprune-bench-") as tmp:
        runs_dir = Path(args.keep) if args.keep else Path(tmp)
        layout = RunLayout.for_recipe(recipe.name, runs_dir)
        started = time.monotonic()
        first = reproduce(recipe, layout, force=True, live=False)
        first_s = time.monotonic() - started
        started = time.monotonic()
        second = reproduce(recipe, layout, live=False)
        second_s = time.monotonic() - started

    print()
    print(f"llama.cpp build (cached after the first time): {build_s:8.1f} s")
    print(f"{'stage':<18}{'seconds':>10}")
    for result in first:
        print(f"{result.name:<18}{result.duration_s:>10.1f}")
    print(f"{'end to end':<18}{first_s:>10.1f}   (target: < 600 s on 2 cores)")
    skipped = sum(r.status == "skipped" for r in second)
    print(f"{'rerun, all cached':<18}{second_s:>10.1f}   ({skipped}/{len(second)} stages skipped)")


if __name__ == "__main__":
    main()
