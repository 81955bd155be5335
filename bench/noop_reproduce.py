"""Wall time of a no-op `invoke reproduce` (every stage cached) on a finished demo run.

Issue 23 bounds it at 1.5 s: the lock is read before any preflight that loads a tokenizer or a
model, so a run with nothing to do starts no transformers and no torch. Each try is the real
command line, `python -m invoke reproduce --no-live` in a subprocess (interpreter start and
invoke's import included), on a copy of the run (a first, untimed call refreshes the copy's
digest cache, as any first call after a copy would, and writes the bytecode caches: the tries run
with Python's default bytecode caching, PYTHONDONTWRITEBYTECODE unset). Wall time depends on the
machine's load, so the CPU time of each try (user + system) is printed beside it. Without
``--run``, a demo run is made first with a full reproduce (minutes).

    python bench/noop_reproduce.py [--run RUN_DIR] [--tries 5]

Prints each try, the median and the verdict against the bound; exits 1 when the median is over it
or a stage did not skip.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND_S = 1.5


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def invoke_reproduce(runs_dir: Path) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, the finished process) of one `invoke reproduce --no-live`."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env |= {"MOEPRUNE_RUNS_DIR": str(runs_dir),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    cpu, started = _children_cpu_s(), time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "invoke", "reproduce", "--no-live"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3600)
    return time.perf_counter() - started, _children_cpu_s() - cpu, done


def skipped_stages(stdout: str) -> int:
    return sum(status == "skipped" for _, status in re.findall(r"^\[(\S+)\] (\w+)", stdout, re.M))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished demo run directory (copied, not changed)")
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeprune-noop-") as tmp:
        runs = Path(tmp)
        if args.run:
            shutil.copytree(args.run, runs / "demo", symlinks=True)
        else:
            print("no --run: making a demo run first (a full reproduce)", flush=True)
        seconds, _, done = invoke_reproduce(runs)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
            return 1
        print(f"first call (refreshes the digest cache{'' if args.run else '; the full run'}): {seconds:.2f} s")
        from moeprune.pipeline.stages import build_pipeline

        stages = len(build_pipeline().stages)  # every stage of the pipeline's one definition
        times, cpu_times = [], []
        for i in range(args.tries):
            seconds, cpu_s, done = invoke_reproduce(runs)
            skipped = skipped_stages(done.stdout + done.stderr)  # stage lines go to stderr
            print(f"try {i + 1}: {seconds:.2f} s wall, {cpu_s:.2f} s CPU, {skipped} of {stages} stages skipped")
            if done.returncode != 0 or skipped != stages:
                print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
                return 1
            times.append(seconds)
            cpu_times.append(cpu_s)
    median = statistics.median(times)
    verdict = "within" if median <= BOUND_S else "OVER"
    print(f"no-op `invoke reproduce`: median {median:.2f} s wall (min {min(times):.2f}, max {max(times):.2f}) "
          f"over {len(times)} tries, {verdict} the {BOUND_S} s bound; median CPU {statistics.median(cpu_times):.2f} s; "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0 if median <= BOUND_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
