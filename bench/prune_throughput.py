"""Prune throughput and memory on a synthetic Gemma-4-shaped checkpoint.

Builds a bf16 checkpoint with the real 26B-A4B expert shapes (hidden 2816, 128 experts, expert
intermediate 704: gate_up_proj [128, 1408, 2816], down_proj [128, 2816, 704]) and as many MoE
layers as it takes to pass ``--min-gb`` on disk, in several shards; prunes it to ``--keep``
experts per layer in a child process; and prints

- (prune time) / (``cp -r`` time of the same checkpoint), target <= 1.5, both with and without
  the final ``sync`` (the prune fsyncs its shards, ``cp`` does not, so "cp -r + sync" is the fair
  comparison),
- the child's peak resident memory (``ru_maxrss`` from ``wait4``), target <= 2 x the largest
  tensor + 500 MB.

Each timed run starts after ``sync``; with ``--cold`` (needs root) the page cache is dropped before
each run, otherwise runs are warm (the checkpoint was just written, so it sits in the page cache)
and the output says so. The synthetic checkpoint is deleted afterwards unless ``--keep-files``.

Usage: python bench/prune_throughput.py [--workdir DIR] [--min-gb 4] [--keep 109] [--cold]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moeprune.io.writer import ShardedWriter  # noqa: E402

HIDDEN = 2816
NUM_EXPERTS = 128
TOP_K = 8
EXPERT_INTERMEDIATE = 704
DENSE_INTERMEDIATE = 2112
BF16_BYTES = 2
BASE_SHARD_BYTES = 2_000_000_000
PRUNED_SHARD_BYTES = 2_000_000_000
_FILL_BYTES = 64 * 1024 * 1024


class PatternSource:
    """``nbytes`` of pseudo-random bytes, streamed from one reused random block."""

    def __init__(self, nbytes: int, block: bytes, shift: int) -> None:
        self.nbytes = nbytes
        self.block = block
        self.shift = shift % len(block)

    def write_into(self, out_fd: int) -> None:
        view = memoryview(self.block)
        done, position = 0, self.shift
        while done < self.nbytes:
            step = min(len(view) - position, self.nbytes - done)
            chunk = view[position : position + step]
            while chunk:
                chunk = chunk[os.write(out_fd, chunk) :]
            done += step
            position = 0


def layer_tensors(layer: int) -> list[tuple[str, list[int]]]:
    p = f"model.language_model.layers.{layer}."
    return [
        (p + "input_layernorm.weight", [HIDDEN]),
        (p + "self_attn.q_proj.weight", [16 * 256, HIDDEN]),
        (p + "self_attn.k_proj.weight", [8 * 256, HIDDEN]),
        (p + "self_attn.v_proj.weight", [8 * 256, HIDDEN]),
        (p + "self_attn.o_proj.weight", [HIDDEN, 16 * 256]),
        (p + "mlp.gate_proj.weight", [DENSE_INTERMEDIATE, HIDDEN]),
        (p + "mlp.up_proj.weight", [DENSE_INTERMEDIATE, HIDDEN]),
        (p + "mlp.down_proj.weight", [HIDDEN, DENSE_INTERMEDIATE]),
        (p + "router.proj.weight", [NUM_EXPERTS, HIDDEN]),
        (p + "router.scale", [HIDDEN]),
        (p + "router.per_expert_scale", [NUM_EXPERTS]),
        (p + "experts.gate_up_proj", [NUM_EXPERTS, 2 * EXPERT_INTERMEDIATE, HIDDEN]),
        (p + "experts.down_proj", [NUM_EXPERTS, HIDDEN, EXPERT_INTERMEDIATE]),
        (p + "post_feedforward_layernorm.weight", [HIDDEN]),
    ]


def nbytes_of(shape: list[int]) -> int:
    return math.prod(shape) * BF16_BYTES


def build_checkpoint(directory: Path, min_bytes: int, seed: int) -> dict:
    """Write the synthetic base checkpoint (config, shards, index); return its description."""
    per_layer = sum(nbytes_of(shape) for _, shape in layer_tensors(0))
    num_layers = max(1, math.ceil(min_bytes / per_layer))
    block = random.Random(seed).randbytes(_FILL_BYTES)
    largest = 0
    with ShardedWriter(directory, BASE_SHARD_BYTES, fsync=False) as writer:
        for layer in range(num_layers):
            for number, (name, shape) in enumerate(layer_tensors(layer)):
                writer.add(name, "BF16", shape, PatternSource(nbytes_of(shape), block, 4099 * (layer * 31 + number)))
                largest = max(largest, nbytes_of(shape))
        config = {
            "architectures": ["Gemma4ForConditionalGeneration"],
            "model_type": "gemma4",
            "text_config": {
                "model_type": "gemma4_text", "hidden_size": HIDDEN, "num_hidden_layers": num_layers,
                "num_experts": NUM_EXPERTS, "top_k_experts": TOP_K, "moe_intermediate_size": EXPERT_INTERMEDIATE,
                "intermediate_size": DENSE_INTERMEDIATE, "enable_moe_block": True,
            },
        }
        (writer.staging_dir / "config.json").write_text(json.dumps(config, indent=2))
    return {"num_layers": num_layers, "total_size": writer.total_size, "largest_tensor_bytes": largest,
            "shards": len(writer.shard_names)}


def write_drop_map(path: Path, num_layers: int, keep_count: int, seed: int) -> None:
    rng = random.Random(seed)
    layers = []
    for layer in range(num_layers):
        keep = sorted(rng.sample(range(NUM_EXPERTS), keep_count))
        layers.append({"layer": layer, "keep": keep, "drop": sorted(set(range(NUM_EXPERTS)) - set(keep)),
                       "retained_fraction": 0.99})
    path.write_text(json.dumps({
        "format_version": 1,
        "base_model": {"id": "synthetic-gemma-4-shaped", "revision": None, "sha256": None},
        "num_experts": NUM_EXPERTS, "top_k": TOP_K, "num_experts_kept": keep_count,
        "strategy": {"name": "uniform-count", "criterion": "random", "retention_threshold": None,
                     "keep_count": keep_count, "protect_top_k": 0, "seed": seed},
        "layers": layers,
        "hashes": {"profile_stats_sha256": "0" * 64, "recipe_sha256": None},
        "uniform": True,
    }, indent=2))


def prepare_cache(cold: bool) -> bool:
    """sync; with ``cold``, drop the page cache. Return whether the cache was dropped."""
    subprocess.run(["sync"], check=True)
    if not cold:
        return False
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def time_cp(base: Path, target: Path) -> tuple[float, float]:
    """Seconds of `cp -r`, and of `cp -r` followed by `sync` (the data really on disk)."""
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(base), str(target)], check=True)
    copied = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return copied - started, time.perf_counter() - started


def own_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def time_prune(base: Path, drop_map: Path, out: Path) -> tuple[float, int, dict]:
    """Run the prune in a child process: (seconds, peak RSS bytes, prune record).

    Linux carries a process's RSS high-water mark across fork and exec into the child's
    ``ru_maxrss``: the figure is the prune's own only while this process is smaller. It is, as
    the checkpoint is written streamed; a larger parent fails here rather than report its own size.
    """
    parent_rss = own_rss_bytes()
    code = (
        "import json, sys; from moeprune.prune import prune_checkpoint; "
        f"r = prune_checkpoint({str(base)!r}, {str(drop_map)!r}, {str(out)!r}, {PRUNED_SHARD_BYTES}); "
        "print(json.dumps(r))"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert child.stdout is not None
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"prune failed with exit code {child.returncode}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    if peak <= parent_rss:
        raise SystemExit(f"the prune's ru_maxrss ({peak / 1e6:.0f} MB) is not above this process's RSS at the start "
                         f"({parent_rss / 1e6:.0f} MB), which the kernel carried into it: no figure of the prune's own")
    return elapsed, peak, json.loads(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where to build (default: a temp dir).")
    parser.add_argument("--min-gb", type=float, default=4.0, help="Minimum checkpoint size in GB (1e9 bytes).")
    parser.add_argument("--keep", type=int, default=109, help="Experts kept per layer.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs of each command (median reported).")
    parser.add_argument("--cold", action="store_true", help="Drop the page cache before each run (root).")
    parser.add_argument("--verify", action="store_true", help="Also run verify_prune on the result.")
    parser.add_argument("--keep-files", action="store_true", help="Do not delete the synthetic checkpoint.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this JSON file.")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="moeprune-bench-", dir=args.workdir))
    base, drop_map, copy_dir, out = workdir / "base", workdir / "drop.json", workdir / "cp_copy", workdir / "pruned"
    try:
        started = time.perf_counter()
        described = build_checkpoint(base, int(args.min_gb * 1e9), seed=0)
        subprocess.run(["sync"], check=True)
        print(f"built {base}: {described['num_layers']} MoE layers, {described['shards']} shards, "
              f"{tree_size(base) / 1e9:.2f} GB on disk in {time.perf_counter() - started:.1f} s")
        write_drop_map(drop_map, described["num_layers"], args.keep, seed=0)

        cp_s, cp_sync_s, prune_s, rss = [], [], [], []
        cold = False
        record: dict = {}
        for _ in range(args.repeats):
            shutil.rmtree(copy_dir, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            cold = prepare_cache(args.cold)
            plain, synced = time_cp(base, copy_dir)
            cp_s.append(plain)
            cp_sync_s.append(synced)
            shutil.rmtree(copy_dir)
            cold = prepare_cache(args.cold) and cold
            seconds, peak_rss, record = time_prune(base, drop_map, out)
            prune_s.append(seconds)
            rss.append(peak_rss)

        if args.verify:
            from moeprune.prune import verify_prune

            report = verify_prune(base, out)
            print(report.render())

        largest = described["largest_tensor_bytes"]
        rss_target = 2 * largest + 500 * 10**6
        figures = {
            "checkpoint_bytes": tree_size(base),
            "tensor_bytes": described["total_size"],
            "num_layers": described["num_layers"],
            "base_shards": described["shards"],
            "pruned_shards": len(record["shards"]),
            "pruned_tensor_bytes": record["total_size"],
            "experts": f"{NUM_EXPERTS} -> {args.keep}",
            "largest_tensor_bytes": largest,
            "page_cache": "cold (dropped before each run)" if cold else "warm (not dropped)",
            "cp_s": cp_s, "cp_sync_s": cp_sync_s, "prune_s": prune_s, "peak_rss_bytes": rss,
            "ratio_prune_over_cp": statistics.median(prune_s) / statistics.median(cp_s),
            "ratio_prune_over_cp_sync": statistics.median(prune_s) / statistics.median(cp_sync_s),
            "peak_rss_target_bytes": rss_target,
        }
        print(f"checkpoint: {figures['checkpoint_bytes'] / 1e9:.2f} GB, {described['shards']} bf16 shards, "
              f"{described['num_layers']} layers, largest tensor {largest / 1e6:.0f} MB; pruned to {args.keep} "
              f"experts: {record['total_size'] / 1e9:.2f} GB in {len(record['shards'])} shards")
        print(f"page cache: {figures['page_cache']}; {args.repeats} run(s) each, medians")
        print(f"cp -r:        {statistics.median(cp_s):7.2f} s   (runs: {', '.join(f'{v:.2f}' for v in cp_s)})")
        runs = ", ".join(f"{v:.2f}" for v in cp_sync_s)
        print(f"cp -r + sync: {statistics.median(cp_sync_s):7.2f} s   (runs: {runs})")
        print(f"prune:        {statistics.median(prune_s):7.2f} s   (runs: {', '.join(f'{v:.2f}' for v in prune_s)}; "
              "fsyncs every shard)")
        print(f"prune / (cp -r + sync) = {figures['ratio_prune_over_cp_sync']:.2f}   (target <= 1.5)")
        print(f"prune / cp -r          = {figures['ratio_prune_over_cp']:.2f}")
        print(f"peak RSS of the prune process: {max(rss) / 1e6:.0f} MB   "
              f"(target <= 2 x {largest / 1e6:.0f} MB + 500 MB = {rss_target / 1e6:.0f} MB)")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        if args.keep_files:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
