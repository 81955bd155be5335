"""Data-parallel profile: time and peak memory per rank at 1 and 2 ranks, and the equality of the results.

Two workloads, each run under ``torchrun --standalone --nproc-per-node N`` (gloo on the CPU,
NCCL where GPUs are present) with ``OMP_NUM_THREADS=--threads`` per rank:

  * ``demo``: the whole ``invoke profile`` of the demo recipe (phase 1 generation split by
    generation batch, phase 2 whole-model replay split by replay batch), through invoke's
    command line;
  * ``synthetic``: phase 2 only, layer-streamed, on the Gemma-4-26B-A4B-shaped stack of
    ``bench/profile_memory.py`` (bf16 random weights, ``--layers`` decoder layers, written once
    under --work-dir), ``--sequences`` random sequences of up to ``--tokens`` tokens, one per batch.

Each rank reports its wall time, CPU time (``time.process_time``: on a shared machine it does not
count time lost to other processes) and peak RSS (``ru_maxrss``). The 2-rank statistics are
compared with the 1-rank ones: bit-identical, or the largest relative difference.

    python bench/profile_dp.py [--models demo,synthetic] [--layers 2] [--sequences 4] [--tokens 128]
                               [--threads 1] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
MB = 1e6


def _env(threads: int, extra: dict[str, str]) -> dict[str, str]:
    path = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", **extra}


def _torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]


def _rank_figures(started: float, cpu_started: float) -> dict:
    return {
        "rank": int(os.environ.get("RANK", 0)),
        "wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time() - cpu_started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB,
    }


def demo_worker(args: argparse.Namespace) -> None:
    """One rank: ``invoke profile`` of the demo recipe (through invoke's own Program)."""
    from invoke import Program

    sys.path.insert(0, str(ROOT))
    import tasks

    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        Program(namespace=tasks.ns).run(["invoke", "profile", "--no-progress", "--runner", "native"])
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    figures = _rank_figures(started, cpu_started)
    Path(args.out, f"rank{figures['rank']}.json").write_text(json.dumps(figures))


def synthetic_worker(args: argparse.Namespace) -> None:
    """One rank: the layer-streamed replay of its share, the sums gathered on rank 0 (saved as npz)."""
    import dataclasses

    import torch
    from profile_memory import sequences_for

    from moeprune.profile.parallel import current_world, distributed, reduce_replay
    from moeprune.profile.streamed import replay_streamed

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    sequences = sequences_for(model_dir, args.sequences, args.tokens)
    world = current_world()
    started, cpu_started = time.perf_counter(), time.process_time()
    with distributed(world) as (comm, _backend):
        replay = replay_streamed(model_dir, sequences, ["a", "b"], dtype="bfloat16", device_map="cpu",
                                 batch_size=1, world=world)
        parts = comm.gather_to_root(dataclasses.replace(replay, recorder=None))
        if parts is not None:
            merged = reduce_replay(parts)
            arrays = {f.name: getattr(merged, f.name) for f in dataclasses.fields(merged)
                      if isinstance(getattr(merged, f.name), np.ndarray)}
            np.savez(Path(args.out) / "stats.npz", **arrays)
    figures = _rank_figures(started, cpu_started)
    Path(args.out, f"rank{figures['rank']}.json").write_text(json.dumps(figures))


def largest_relative_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str:
    if sorted(a) != sorted(b):
        return f"different statistics: {sorted(a)} vs {sorted(b)}"
    worst = 0.0
    for name in a:
        x, y = np.asarray(a[name], dtype=np.float64), np.asarray(b[name], dtype=np.float64)
        scale = np.maximum(np.abs(x), np.abs(y))
        worst = max(worst, float(np.max(np.divide(np.abs(x - y), scale, out=np.zeros_like(scale), where=scale > 0))))
    identical = all(np.array_equal(a[name], b[name]) for name in a)
    return "bit-identical" if identical else f"max relative difference {worst:.3e}"


def demo_stats(runs: Path) -> dict[str, np.ndarray]:
    from moeprune.layout import RunLayout
    from moeprune.profile.stats import load_stats, stats_tensors

    return stats_tensors(load_stats(RunLayout.for_recipe("demo", runs_dir=runs).profile_stats_path))


def run(nproc: int, argv: list[str], out: Path, env: dict[str, str]) -> tuple[list[dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(_torchrun(nproc, argv), cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"{nproc} rank(s) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)], elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,synthetic")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="threads per rank (OMP_NUM_THREADS)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--worker", choices=["demo", "synthetic"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "demo":
        return demo_worker(args)
    if args.worker == "synthetic":
        return synthetic_worker(args)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="profile-dp-"))
    print(f"threads per rank {args.threads}; work dir {work}")
    print(f"{'model':<34} {'ranks':>5} {'launch wall s':>13} {'rank':>4} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>11}")
    for model in args.models.split(","):
        stats: dict[int, dict[str, np.ndarray]] = {}
        for nproc in (1, 2):
            out = work / f"{model}-{nproc}"
            shutil.rmtree(out, ignore_errors=True)
            if model == "demo":
                env = _env(args.threads, {"MOEPRUNE_RUNS_DIR": str(out / "runs")})
                argv = [__file__, "--worker", "demo", "--out", str(out)]
                label = "demo (float32, invoke profile)"
            else:
                from profile_memory import synthetic_model

                model_dir = synthetic_model(work, args.layers)
                env = _env(args.threads, {})
                argv = [__file__, "--worker", "synthetic", "--model-dir", str(model_dir), "--out", str(out),
                        "--sequences", str(args.sequences), "--tokens", str(args.tokens),
                        "--threads", str(args.threads)]
                label = f"26B-A4B-shaped {args.layers}l (bf16, streamed)"
            ranks, elapsed = run(nproc, argv, out, env)
            for figures in ranks:
                print(f"{label:<34} {nproc:>5} {elapsed:>13.1f} {figures['rank']:>4} {figures['wall_s']:>8.1f} "
                      f"{figures['cpu_s']:>8.1f} {figures['peak_rss_mb']:>11.1f}")
            stats[nproc] = demo_stats(out / "runs") if model == "demo" else dict(np.load(out / "stats.npz"))
        print(f"{model}: 2 ranks vs 1 rank: {largest_relative_difference(stats[1], stats[2])}")


if __name__ == "__main__":
    main()
