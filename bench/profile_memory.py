"""Peak memory and time of phase 2: whole-model replay vs layer-streamed replay.

Two models:
  * ``demo``: the shipped demo MoE (src/moeprune/demo/model), float32, the demo's calibration size;
  * ``synthetic``: a Gemma-4-26B-A4B-shaped stack of a few layers (hidden 2816, 128 experts of
    intermediate 704, top-8, dense MLP 2112, 16 heads of 256 / global 512, vocabulary 262144), bf16
    random weights written once as safetensors shards (one per layer) under --work-dir.

Each mode runs in its own subprocess, so the peaks are separate. The figures, per model and mode:
  * peak RSS of the subprocess (``ru_maxrss``), and the RSS it had after importing torch and
    transformers (the interpreter's own baseline); on a GPU (``--device cuda``) the CUDA peak
    (``torch.cuda.max_memory_allocated``) instead;
  * the peaks of anonymous and of file-backed resident memory apart (``RssAnon`` and ``RssFile``
    of ``/proc/self/status``, sampled every few milliseconds). ``ru_maxrss`` counts both: the
    pages of the shards' memory maps that the process touched are file-backed, shared with the
    page cache and reclaimable, and whether they are resident depends on what the cache held,
    not on what the replay allocates. The bound is about anonymous memory;
  * the parent's RSS when it starts each worker. Linux carries a process's high-water mark across
    ``fork`` and ``exec`` into the child's ``ru_maxrss``, so a parent holding gigabytes makes every
    worker's ``ru_maxrss`` at least that. This was the 6 GB first-run figure: that run wrote the
    synthetic shards in the parent, whose freed tensors stayed resident; the shards are now
    written by a worker of their own;
  * streamed, once per page-cache state of the shards (``--cache-states``): ``written`` (each
    shard rewritten just before, as on the run that creates them: its pages are fresh, dirty
    cache), ``cached`` (each shard read once before) and ``cold`` (each shard flushed and
    evicted with ``posix_fadvise(DONTNEED)``); ``fincore`` says how much of the shards was
    resident when the replay started;
  * time: whole = load the model + replay; streamed = the streamed replay (it reads each layer itself);
    CPU time of the subprocess (``time.process_time``: on a shared machine it does not count time
    lost to other processes) and wall time;
  * for streamed: the largest layer's bytes, the shell's (embeddings) and the hidden states kept
    between layers;
  * the activations of one layer's forward: the largest layer on the largest batch, in a third
    subprocess under torch's memory profiler, as live tensor bytes above the layer's weights;
  * the acceptance bound ``layer + activations + 500 MB`` (activations = hidden states kept between
    layers + that forward's), and the margin without the forward's activations too.
Both modes' statistics are compared too (bit-identical or the max relative difference).

    python bench/profile_memory.py [--models demo,synthetic] [--layers 4] [--sequences 4] [--tokens 256]
                                   [--cache-states written,cached,cold]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "moeprune" / "demo" / "model"
MB = 1e6


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
CACHE_STATES = ("written", "cached", "cold")


def status_bytes() -> dict[str, int]:
    """The resident-memory lines of /proc/self/status, in bytes."""
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in STATUS_FIELDS:
            found[name] = int(rest.split()[0]) * 1024
    return found


class PeakSampler:
    """The largest value each of :data:`STATUS_FIELDS` took while running, sampled by a thread
    (torch's kernels release the GIL, so it samples during them too). A peak shorter than the
    interval can be missed: ``ru_maxrss`` stays the exact bound on the sum."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import threading

        self.interval_s = interval_s
        self.peaks = dict.fromkeys(STATUS_FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for name, value in status_bytes().items():
            self.peaks[name] = max(self.peaks[name], value)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def shard_paths(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def set_cache_state(model_dir: Path, state: str) -> None:
    """Put the shards' pages in the page-cache state ``state`` (one of :data:`CACHE_STATES`)."""
    import shutil

    for path in shard_paths(model_dir):
        if state == "written":  # a fresh copy replaces it: its pages are new and dirty in the cache
            fresh = path.with_name(f".{path.name}.rewrite")
            shutil.copyfile(path, fresh)
            os.replace(fresh, path)
        elif state == "cached":
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        elif state == "cold":
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages cannot be evicted
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        else:
            raise ValueError(f"cache state {state!r}: use one of {', '.join(CACHE_STATES)}")


def resident_fraction(model_dir: Path) -> float | None:
    """How much of the shards the page cache holds now (``fincore``), or None without it."""
    paths = shard_paths(model_dir)
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES,SIZE", *map(str, paths)],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    resident = total = 0
    for line in out.split("\n"):
        if line.strip():
            res, size = map(int, line.split())
            resident, total = resident + res, total + size
    return resident / total if total else None


def synthetic_config(num_layers: int):
    from transformers import Gemma4Config, Gemma4TextConfig

    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * (num_layers // 6 + 1)
    text = Gemma4TextConfig(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=num_layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        hidden_size_per_layer_input=0, sliding_window=1024, max_position_embeddings=262144,
        layer_types=layer_types[:num_layers], final_logit_softcapping=30.0,
        bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


def write_synthetic(directory: Path, num_layers: int) -> Path:
    """Random bf16 weights of the 26B-A4B shapes, one shard per decoder layer (written one at a time)."""
    from synthetic_shards import write_random_shards
    from transformers import Gemma4ForConditionalGeneration

    config = synthetic_config(num_layers)
    write_random_shards(Gemma4ForConditionalGeneration, config, directory)
    config.save_pretrained(directory)  # last: its config.json marks the directory complete
    return directory


def synthetic_model(work: Path, num_layers: int) -> Path:
    """The synthetic stack's directory, written once by a worker process (see the module docstring)."""
    directory = work / f"gemma4-26b-a4b-shaped-{num_layers}l"
    if not (directory / "config.json").is_file():
        command = [sys.executable, __file__, "--worker", "write", "--model-dir", str(directory),
                   "--layers", str(num_layers)]
        proc = subprocess.run(command, capture_output=True, text=True, env=worker_env())
        if proc.returncode != 0:
            sys.exit(f"writing {directory} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return directory


def worker_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def sequences_for(model_dir: Path, count: int, tokens: int) -> list[dict]:
    vocab = json.loads((model_dir / "config.json").read_text())["text_config"]["vocab_size"]
    rng = np.random.default_rng(1)
    lengths = [max(8, int(tokens * f)) for f in np.linspace(0.6, 1.0, count)]
    return [
        {"id": f"s{i}", "domain": ["a", "b"][i % 2], "prompt_len": 1,
         "input_ids": rng.integers(3, min(vocab, 100000), n).tolist()}
        for i, n in enumerate(lengths)
    ]


def worker(args: argparse.Namespace) -> None:
    import torch

    import transformers  # noqa: F401  (imported before the baseline is taken)
    from moeprune.profile.loading import load_model
    from moeprune.profile.replay import replay_sequences
    from moeprune.profile.streamed import StreamInfo, replay_streamed

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    sequences = sequences_for(model_dir, args.sequences, args.tokens)
    device = args.device
    baseline = rss_bytes()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    cpu_started = time.process_time()
    out: dict = {"mode": args.worker, "baseline_rss": baseline, "baseline_status": status_bytes()}
    with PeakSampler() as sampler:
        if args.worker == "whole":
            model = load_model(model_dir, args.dtype, "cpu" if device == "cpu" else device)
            out["load_s"] = time.perf_counter() - started
            result = replay_sequences(model, sequences, ["a", "b"], batch_size=args.batch_size)
        else:
            info = StreamInfo()
            result = replay_streamed(model_dir, sequences, ["a", "b"], dtype=args.dtype, device_map=device,
                                     batch_size=args.batch_size, stream_info=info)
            out.update(layer_bytes=info.max_layer_nbytes, shell_bytes=info.shell_nbytes,
                       hidden_bytes=info.hidden_nbytes)
    out["peaks"] = sampler.peaks
    out["time_s"] = time.perf_counter() - started
    out["cpu_s"] = time.process_time() - cpu_started
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.startswith("cuda"):
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    out["tokens"] = sum(len(s["input_ids"]) for s in sequences)
    np.savez(args.stats_out, contribution_sum=result.contribution_sum, routed_count=result.routed_count,
             router_prob_sum=result.router_prob_sum)
    print("RESULT " + json.dumps(out))


def activations_worker(args: argparse.Namespace) -> None:
    """Tensor bytes one layer's forward holds above its weights: the largest layer, the largest batch.

    Measured at the tensor allocator (torch's memory profiler: live tensors by category, weights
    are PARAMETER), not as process RSS, so the interpreter and the allocator's slack are not in
    it. The layer runs on the embedding output: what the forward allocates depends on the shapes
    (tokens, top-k, hidden), not on the values.
    """
    import tempfile
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from moeprune.io.checkpoint import Checkpoint
    from moeprune.io.loading_plan import loading_plan
    from moeprune.io.materialize import materialize, meta_model
    from moeprune.profile import streamed
    from moeprune.profile.hooks import instrument_moe
    from moeprune.profile.replay import make_batches

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    sequences = sequences_for(model_dir, args.sequences, args.tokens)
    model = meta_model(model_dir, args.dtype)
    arch = streamed.family_adapter(model)
    body_path, layers_path = arch.replay_body_path(model), arch.decoder_layers_path(model)
    unused = arch.streamed_unused_modules(model)
    batches = make_batches(sequences, ["a", "b"], args.batch_size)
    largest_batch = max(range(len(batches)), key=lambda i: batches[i].input_ids.numel())
    layers = list(model.get_submodule(layers_path))
    sizes = [sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in layers]
    index = max(range(len(layers)), key=lambda i: sizes[i])
    device = torch.device(args.device)
    with Checkpoint.open(model_dir) as checkpoint, torch.inference_mode():
        sources = loading_plan(model, checkpoint.names())
        shell = materialize(model, body_path, checkpoint, device, skip=(layers_path, *unused), sources=sources)
        (capture,) = streamed._embed_batches(model.get_submodule(body_path), model.get_submodule(layers_path),
                                             [batches[largest_batch]], device)
        shell.release()
        built = materialize(model, f"{layers_path}.{index}", checkpoint, device, sources=sources)
        args_, kwargs = capture.calls[index]
        with instrument_moe(model, num_domains=2) as recorder:
            recorder.set_token_domains(batches[largest_batch].token_domain)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                         with_stack=True) as prof:
                layers[index](capture.hidden, *args_, **kwargs)
        built.release()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # Deprecated for CUDA in favour of the CUDA snapshot API; on the CPU (torch pinned) it is the way.
        warnings.simplefilter("ignore", FutureWarning)
        timeline = Path(tmp) / "memory.json"
        prof.export_memory_timeline(str(timeline), device=str(device) if device.type == "cuda" else "cpu")
        _times, sizes_by_category = json.loads(timeline.read_text())
    # Each point: [unknown, PARAMETER, OPTIMIZER_STATE, INPUT, TEMPORARY, ACTIVATION, ...]: all but the weights.
    peak = max(sum(point) - point[1] for point in sizes_by_category)
    print("RESULT " + json.dumps({"mode": "activations", "layer": index, "batch_tokens": int(batches[largest_batch].num_tokens),
                                  "forward_activation_bytes": int(peak)}))


def run_mode(mode: str, model_dir: Path, args: argparse.Namespace, stats_out: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--model-dir", str(model_dir),
               "--sequences", str(args.sequences), "--tokens", str(args.tokens), "--dtype", args.dtype_for,
               "--batch-size", str(args.batch_size), "--device", args.device, "--threads", str(args.threads)]
    if stats_out is not None:
        command += ["--stats-out", str(stats_out)]
    parent_rss = rss_bytes()
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env())
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.exit(f"{mode} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(line[len("RESULT "):]), "parent_rss": parent_rss}


def stats_path(work: Path, model: str, label: str) -> Path:
    return work / f"{model}-{label.replace('/', '-')}.npz"


def compare(a: Path, b: Path) -> str:
    x, y = np.load(a), np.load(b)
    worst = 0.0
    for name in x.files:
        if not np.array_equal(x[name], y[name]):
            scale = np.abs(x[name]).max(axis=(0, 2), keepdims=True)
            worst = max(worst, float(np.max(np.abs(x[name] - y[name]) / np.where(scale == 0, 1, scale))))
    return "bit-identical" if worst == 0 else f"max difference {worst:.2e} of the layer's largest value"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo,synthetic")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the synthetic stack")
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256, help="length of the longest sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    parser.add_argument("--cache-states", default=",".join(CACHE_STATES),
                        help="page-cache states of the synthetic shards to run the streamed replay in")
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "moeprune" / "bench"))
    parser.add_argument("--worker", choices=["whole", "streamed", "activations", "write"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--stats-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "activations":
        activations_worker(args)
        return
    if args.worker == "write":
        write_synthetic(Path(args.model_dir), args.layers)
        return
    if args.worker:
        worker(args)
        return
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    states = [state for state in args.cache_states.split(",") if state]
    unknown = sorted(set(states) - set(CACHE_STATES))
    if unknown:
        sys.exit(f"--cache-states {','.join(unknown)}: use some of {','.join(CACHE_STATES)}")
    for name in args.models.split(","):
        if name == "demo":  # the committed model is never rewritten: one streamed run, as the cache has it
            model_dir, args.dtype_for, runs = DEMO_DIR, "float32", [None]
        else:
            model_dir = synthetic_model(work, args.layers)
            args.dtype_for, runs = "bfloat16", states or [None]
        results = {"whole": run_mode("whole", model_dir, args, stats_path(work, name, "whole"))}
        for state in runs:
            if state is not None:
                set_cache_state(model_dir, state)
            resident = resident_fraction(model_dir)
            label = f"streamed/{state}" if state else "streamed"
            results[label] = run_mode("streamed", model_dir, args, stats_path(work, name, label))
            results[label]["resident"] = resident
        report(name, model_dir, args, work, results, cuda)


def report(name: str, model_dir: Path, args: argparse.Namespace, work: Path, results: dict[str, dict], cuda: bool) -> None:
    whole = results["whole"]
    streamed_runs = {label: r for label, r in results.items() if label != "whole"}
    first = next(iter(streamed_runs.values()))
    forward = run_mode("activations", model_dir, args)["forward_activation_bytes"]
    activations = first["hidden_bytes"] + forward
    bound = first["layer_bytes"] + activations + 500 * MB
    print(f"== {name} ({model_dir.name}, {args.dtype_for}, {whole['tokens']} tokens, device {args.device})")
    for label, r in results.items():
        load = f", load {r['load_s']:.1f} s" if "load_s" in r else ""
        cache = f", shards {r['resident'] * 100:.0f}% cached at start" if r.get("resident") is not None else ""
        peaks = f"CUDA peak {r['cuda_peak'] / MB:9.1f} MB, " if cuda else ""
        mapped = r["peaks"]["RssFile"] - r["baseline_status"]["RssFile"]
        print(f"  {label:16s} {peaks}ru_maxrss {r['peak_rss'] / MB:8.1f} MB; anonymous peak {r['peaks']['RssAnon'] / MB:8.1f} MB, "
              f"file-backed peak {r['peaks']['RssFile'] / MB:8.1f} MB ({mapped / MB:+.1f} MB over the libraries); CPU time "
              f"{r['cpu_s']:.1f} s, wall {r['time_s']:.1f} s{load}{cache}")
    print(f"  this process's RSS when it started the workers: up to {max(r['parent_rss'] for r in results.values()) / MB:.1f} MB "
          "(a floor under each worker's ru_maxrss)")
    base = whole["baseline_status"]
    print(f"  interpreter baseline (torch and transformers imported): RSS {whole['baseline_rss'] / MB:.1f} MB = anonymous "
          f"{base['RssAnon'] / MB:.1f} MB + file-backed {base['RssFile'] / MB:.1f} MB (shared libraries)")
    print(f"  streamed: largest layer {first['layer_bytes'] / MB:.1f} MB, shell {first['shell_bytes'] / MB:.1f} MB, "
          f"hidden states {first['hidden_bytes'] / MB:.1f} MB")
    print(f"  activations: hidden states kept between layers {first['hidden_bytes'] / MB:.1f} MB + one layer's "
          f"forward on the largest batch {forward / MB:.1f} MB (tensor bytes above the weights) = {activations / MB:.1f} MB")
    key, what = ("cuda_peak", "CUDA peak") if cuda else ("RssAnon", "anonymous peak")
    for label, r in streamed_runs.items():
        peak = r[key] if cuda else r["peaks"][key]
        print(f"  {label}: bound layer + activations + 500 MB = {bound / MB:.1f} MB; {what} {peak / MB:.1f} MB "
              f"{'within' if peak <= bound else 'ABOVE'} it, margin {(bound - peak) / MB:.1f} MB; "
              f"ru_maxrss {'within' if r['peak_rss'] <= bound else 'above'} it by {abs(bound - r['peak_rss']) / MB:.1f} MB")
        print(f"    statistics vs whole: {compare(stats_path(work, name, 'whole'), stats_path(work, name, label))}")
    if not cuda:
        worst = max(streamed_runs, key=lambda label: streamed_runs[label]["peak_rss"] - streamed_runs[label]["peaks"]["RssAnon"])
        r = streamed_runs[worst]
        libraries = r["baseline_status"]["RssFile"]
        mapped = r["peaks"]["RssFile"] - libraries
        print(f"  ru_maxrss exceeds the anonymous peak by up to {(r['peak_rss'] - r['peaks']['RssAnon']) / MB:.1f} MB "
              f"({worst}): file-backed pages, {libraries / MB:.1f} MB of shared libraries and up to {mapped / MB:.1f} MB "
              "more (the shards' memory maps, and libraries loaded after the baseline), which the kernel can reclaim and which depend on the page cache, not on "
              "what the replay allocates")


if __name__ == "__main__":
    main()
