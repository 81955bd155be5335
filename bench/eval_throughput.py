"""Eval throughput: the demo eval served with one slot, then with N parallel slots, same settings.

Serves the recipe's quantized GGUF with llama-server and runs lm-eval through moeprune's own
evaluator (``moeprune.eval.session.evaluate_served_model``), first with ``serve.parallel = 1`` and
``eval.num_concurrent = 1``, then with both at ``--slots`` (a unified KV cache, ``--kv-unified``,
as the recipe's ``serve.kv_unified`` says). Everything else is the recipe's. Prints, for each:
requests, wall seconds of the evaluation (server start excluded), requests/s and generated
tokens/s (completion tokens as the server reported them); then ``speedup`` (parallel over serial
requests/s) and how many per-sample outputs differ between the two (batched slots can change
greedy outputs).

    python bench/eval_throughput.py [--recipe recipes/demo.toml] [--model pruned] [--slots 4] [--limit N]

Needs the GGUF of the run (``invoke reproduce --until quantize-pruned`` first).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from moeprune.eval.recording import PARTIAL_LOG_NAME  # noqa: E402
from moeprune.eval.run import served_gguf_path  # noqa: E402
from moeprune.eval.session import evaluate_served_model  # noqa: E402
from moeprune.eval.tasks import make_task_manager, resolve_include_path  # noqa: E402
from moeprune.eval.samples import read_sample_log, sample_log_name  # noqa: E402
from moeprune.layout import RunLayout  # noqa: E402
from moeprune.llamacpp.build import ensure_llamacpp  # noqa: E402
from moeprune.llamacpp.server import LlamaServer  # noqa: E402
from moeprune.recipe import Recipe, load_recipe  # noqa: E402


def with_slots(recipe: Recipe, slots: int, limit: int | None, kv_unified: bool | None = None) -> Recipe:
    update: dict = {"parallel": slots}
    if kv_unified is not None:
        update["kv_unified"] = kv_unified
    serve = recipe.serve.model_copy(update=update)
    section = recipe.eval.model_copy(update={"num_concurrent": slots, "limit": limit or recipe.eval.limit})
    return recipe.model_copy(update={"serve": serve, "eval": section})


def run_once(recipe: Recipe, model: str, gguf: Path, work: Path, build, task_manager) -> dict:
    model_dir = work / f"{model}-{recipe.serve.parallel}slots"
    work.mkdir(parents=True, exist_ok=True)
    with LlamaServer(build, gguf, recipe.serve, work / f"server-{recipe.serve.parallel}.log") as server:
        started = time.perf_counter()
        evaluate_served_model(recipe, model, server, task_manager, model_dir)
        seconds = time.perf_counter() - started
        flags = list(server.flags)
    responses = [json.loads(line) for line in (model_dir / PARTIAL_LOG_NAME).read_text().splitlines() if line.strip()]
    tokens = [r.get("completion_tokens") for r in responses]
    outputs = {}
    for task in recipe.eval.tasks:
        for record in read_sample_log(model_dir / sample_log_name(task)):
            outputs[(task, record["doc_id"], record.get("filter"))] = json.dumps(record.get("resps"), sort_keys=True)
    return {"slots": recipe.serve.parallel, "seconds": seconds, "requests": len(responses),
            "generated_tokens": sum(t for t in tokens if isinstance(t, int)), "tokens_known": all(
                isinstance(t, int) for t in tokens), "outputs": outputs, "flags": flags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "demo.toml"))
    parser.add_argument("--model", choices=("base", "pruned"), default="pruned")
    parser.add_argument("--slots", type=int, default=4, help="Parallel slots of the second run (default 4).")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate only the first N samples.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Alternate serial and parallel runs this many times; report the fastest of each "
                             "(on a shared machine the slowest runs measure the neighbours).")
    parser.add_argument("--keep", default=None, help="Keep the server logs and sample logs in this directory.")
    parser.add_argument("--kv-unified", choices=("on", "off"), default=None,
                        help="Override serve.kv_unified for the parallel run (off: each slot gets ctx_size / slots).")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    layout = RunLayout.for_recipe(recipe.name)
    gguf = served_gguf_path(recipe, layout, args.model)
    if not gguf.is_file():
        sys.exit(f"{gguf}: not found; run `invoke reproduce --recipe {args.recipe} --until quantize-{args.model}` first")
    build = ensure_llamacpp(recipe.llamacpp)
    with tempfile.TemporaryDirectory(prefix="moeprune-eval-throughput-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        task_manager = make_task_manager(recipe, resolve_include_path(recipe, work / "tasks"))
        unified = None if args.kv_unified is None else args.kv_unified == "on"
        measured: dict[int, list[dict]] = {1: [], args.slots: []}
        for repeat in range(args.repeats):
            for slots in (1, args.slots):
                run = run_once(with_slots(recipe, slots, args.limit, unified), args.model, gguf, work / f"r{repeat}",
                               build, task_manager)
                measured[slots].append(run)
        runs = [min(measured[slots], key=lambda r: r["seconds"]) for slots in (1, args.slots)]
        spread = {slots: [round(r["seconds"], 1) for r in values] for slots, values in measured.items()}
    print(f"model: {gguf.name}; tasks {', '.join(recipe.eval.tasks)}; max_gen_toks {recipe.eval.max_gen_toks}, "
          f"reasoning budget {recipe.serve.reasoning_budget}, ctx {recipe.serve.ctx_size}, threads {recipe.serve.threads}")
    for run in runs:
        kind = "serial" if run["slots"] == 1 else "parallel"
        tokens = f"{run['generated_tokens'] / run['seconds']:.1f} generated tokens/s" if run["tokens_known"] else \
            "generated tokens/s unknown (the server reported no usage)"
        print(f"{kind} ({run['slots']} slot{'s' if run['slots'] > 1 else ''}, num_concurrent {run['slots']}): "
              f"{run['requests']} requests in {run['seconds']:.2f} s: {run['requests'] / run['seconds']:.3f} requests/s, "
              f"{tokens}; server flags: {' '.join(run['flags'][4:])}")
    if args.repeats > 1:
        print(f"seconds of every run (fastest reported): serial {spread[1]}, parallel {spread[args.slots]}")
    serial, parallel = runs
    speedup = (parallel["requests"] / parallel["seconds"]) / (serial["requests"] / serial["seconds"])
    print(f"speedup: {speedup:.2f}")
    keys = sorted(set(serial["outputs"]) | set(parallel["outputs"]), key=str)
    differ = sum(1 for key in keys if serial["outputs"].get(key) != parallel["outputs"].get(key))
    print(f"per-sample outputs that differ: {differ} of {len(keys)} (sample records, one per question and filter)")


if __name__ == "__main__":
    main()
