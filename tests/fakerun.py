"""A small but complete run directory, built with the real stage code on a tiny random model.

Profile statistics are synthetic (no generation), the GGUF files are stand-in bytes, and the
evaluation sample logs are synthetic lm-eval records; everything downstream of them (drop map,
pruned checkpoint, results.json, card, manifest) is produced by moeprune's own functions.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tiny_gemma4 import NUM_EXPERTS, NUM_LAYERS, save_tiny_gemma4

from moeprune.layout import RunLayout
from moeprune.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ["math", "logic", "code", "science", "creative"]
TASK = "demo_mcq"
LETTERS = "ABCD"


def demo_recipe_text() -> str:
    """recipes/demo.toml with every path it names relative to recipes/ made absolute, so that a
    copy written anywhere reads the same model, calibration, task and held-out files."""
    return (ROOT / "recipes" / "demo.toml").read_text().replace('"../', f'"{ROOT}/')


@dataclass
class FakeRun:
    recipe: Recipe
    layout: RunLayout
    base_dir: Path


def save_tiny_model(out_dir: Path, seed: int = 0) -> Path:
    save_tiny_gemma4(out_dir, seed, max_shard_size="300KB")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 2048}))
    return out_dir


def write_recipe(root: Path, criterion: str = "contribution-sum") -> Path:
    prompts = root / "prompts.jsonl"
    with open(prompts, "w") as handle:
        for domain in DOMAINS:
            for i in range(2):
                handle.write(json.dumps({"id": f"{domain}-{i}", "domain": domain, "prompt": f"{domain} {i}?"}) + "\n")
    path = root / "fake.toml"
    path.write_text(textwrap.dedent(f"""
        name = "fake"
        [model]
        base = "./base"
        dtype = "float32"
        license = "apache-2.0"
        name = "Fake MoE, expert-pruned"
        [calibration]
        prompts = "prompts.jsonl"
        domains = {json.dumps(DOMAINS)}
        prompts_per_domain = 2
        max_new_tokens = 8
        [profile]
        device_map = "cpu"
        top_overlap_k = 4
        top_share_k = 2
        [dropmap]
        strategy = "uniform-min-retention"
        criterion = "{criterion}"
        retention_threshold = 0.95
        [prune]
        max_shard_bytes = 200_000
        [serve]
        ctx_size = 2048
        n_gpu_layers = 0
        reasoning_budget = 64
        [eval]
        tasks = ["{TASK}"]
        max_gen_toks = 128
        bootstrap_resamples = 500
        [publish]
        repo_id = "me/fake-pruned"
        gguf_repo_id = "me/fake-pruned-GGUF"
        [card]
        tags = ["moe", "expert-pruning", "test"]
        """))
    return path


def write_stats(layout: RunLayout, seed: int = 0, layers: list[int] | None = None,
                num_experts: int = NUM_EXPERTS) -> None:
    from moeprune.profile.stats import build_stats, save_stats

    layers = list(range(NUM_LAYERS)) if layers is None else layers
    rng = np.random.default_rng(seed)
    shape = (len(DOMAINS), len(layers), num_experts)
    # Each layer a different concentration: a few experts carry most of the contribution.
    alpha = np.linspace(0.3, 1.5, len(layers))[None, :, None]
    base = rng.gamma(alpha, size=(1, len(layers), num_experts))
    counts = rng.integers(1, 50, size=shape)
    contribution = base * counts * rng.uniform(0.8, 1.2, size=shape)
    stats = build_stats(
        layers=layers,
        domains=DOMAINS,
        contribution_sum=contribution,
        routed_count=counts.astype(np.int64),
        router_prob_sum=counts * 0.1,
        sequence_norm_sum=contribution / np.sqrt(counts),
        domain_num_tokens={d: 40 for d in DOMAINS},
        model_sha256="0" * 64,
    )
    save_stats(stats, layout.profile_stats_path)


def demo_task_config() -> dict:
    """The demo task's definition, as lm-eval records it in lm_eval_results.json's configs."""
    from moeprune.eval.rescore import reference_task_config

    return reference_task_config(TASK)


# Pruned docs whose unanswered response loops to the end ("... I cannot decide" x 8, cut off at
# the generation budget); the last one ends empty instead.
LOOPING_DOCS = (3, 10, 17)


def _records(model: str, n: int, correct: np.ndarray, rng: np.random.Generator) -> list[dict]:
    """lm-eval-shaped records whose filtered answers and scores come from the task's own filters."""
    from moeprune.eval.rescore import _filters, _metrics, _score, apply_filter_batch

    config = demo_task_config()
    ensembles, metrics = _filters(config), _metrics(config)
    texts, docs = [], []
    for doc_id in range(n):
        target = LETTERS[doc_id % 4]
        if correct[doc_id]:
            answer = f"({target})"
        elif doc_id % 7 == 3:
            answer = None
        else:
            answer = f"({LETTERS[(doc_id + 1 + rng.integers(0, 3)) % 4]})"
        thought = f"Let me think. {'x' * int(rng.integers(10, 400))}"
        texts.append(f"{thought} The answer is {answer}." if answer else f"{thought} I cannot decide")
        if model == "pruned" and doc_id in LOOPING_DOCS:  # the loop canary's prey
            texts[-1] = "" if doc_id == LOOPING_DOCS[-1] else thought + " I cannot decide" * 8
        docs.append({"question": f"question {doc_id}", "choices": [f"option {c.lower()}{doc_id}" for c in LETTERS],
                     "answer": f"({target})"})
    extracted = {name: apply_filter_batch(e, [[t] for t in texts], docs) for name, e in ensembles.items()}
    records = []
    for doc_id, (text, doc) in enumerate(zip(texts, docs)):
        for filter_name in ensembles:
            filtered = extracted[filter_name][doc_id]
            record = {
                "doc_id": doc_id, "doc": doc, "target": doc["answer"], "arguments": [[f"q{doc_id}", {}]],
                "resps": [[text]], "filtered_resps": [filtered], "filter": filter_name,
                "finish_reason": "length" if text.endswith("decide I cannot decide") else "stop",
                "metrics": list(metrics),
                "doc_hash": hashlib.sha256(json.dumps(doc).encode()).hexdigest(),
                "prompt_hash": hashlib.sha256(f"q{doc_id}".encode()).hexdigest(),
                "target_hash": hashlib.sha256(doc["answer"].encode()).hexdigest(),
            }
            for name, (fn, kwargs) in metrics.items():
                record[name] = _score(fn, kwargs, name, doc["answer"], filtered)
            records.append(record)
    return records


def write_eval(recipe: Recipe, layout: RunLayout, n: int = 40, seed: int = 0) -> None:
    from moeprune.eval.results import task_scores, write_results
    from moeprune.eval.records import eval_settings, gguf_record, seeds_of
    from moeprune.eval.samples import sample_log_name, write_sample_log

    rng = np.random.default_rng(seed)
    base_correct = rng.random(n) < 0.7
    flips = rng.random(n) < 0.15
    correct = {"base": base_correct, "pruned": np.where(flips, ~base_correct, base_correct)}
    gguf = {"base": layout.gguf_dir / "base-Q4_K_M.gguf", "pruned": layout.gguf_dir / "fake-Q4_K_M.gguf"}
    for model in ("base", "pruned"):
        model_dir = layout.eval_dir / model
        records = _records(model, n, correct[model], rng)
        write_sample_log(model_dir / sample_log_name(TASK), records)
        scores = task_scores(records)
        record = {
            "model": model,
            "recipe_name": recipe.name,
            "settings": eval_settings(recipe),
            "gguf": gguf_record(gguf[model], "Q4_K_M", layout),
            "llamacpp_build": {"key": "test", "source": {"kind": "pypi-sdist", "version": "0.3.36"}},
            "server_flags": ["--ctx-size", "2048"],
            "lm_eval": {"version": "0.4.13", "model_type": "local-chat-completions", "model_args": {}},
            "seeds": seeds_of(recipe),
            "tasks": {TASK: {"task_version": 1.0, "sample_log": sample_log_name(TASK),
                             "reported": {f: {m: {"value": s["value"], "stderr": s["stderr"]} for m, s in ms.items()}
                                          for f, ms in scores.items()}}},
        }
        (model_dir / "run.json").write_text(json.dumps(record, indent=2))
        (model_dir / "lm_eval_results.json").write_text(
            json.dumps({"configs": {TASK: demo_task_config()}}, indent=2, sort_keys=True, default=str))
    write_results(layout.eval_dir)


# The stand-in GGUFs' tensors: (name, ncols, Q4_K_M type); 96-wide rows cannot use 256-block
# k-quants, so llama-quantize falls back (Q4_K -> Q5_0, Q6_K -> Q8_0) as at the reference's 704 / 2112.
FAKE_GGUF_TENSORS = (("blk.0.attn_norm.weight", 64, "F32"), ("blk.0.ffn_up_exps.weight", 256, "Q4_K"),
                     ("blk.0.ffn_down_exps.weight", 96, "Q5_0"), ("blk.0.ffn_down.weight", 96, "Q8_0"))
FAKE_GGUF_FALLBACKS = {"blk.0.ffn_down_exps.weight": "Q4_K", "blk.0.ffn_down.weight": "Q6_K"}


def write_fake_gguf(path: Path, rows: int, quantized: bool, rng: np.random.Generator) -> None:
    """A readable GGUF of :data:`FAKE_GGUF_TENSORS` (``rows`` rows each, 1 for the norm) with random
    block bytes: Q4_K_M's types when ``quantized``, else Q8_0 (a "converted" file)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "gemma4")
    for name, ncols, qtype in FAKE_GGUF_TENSORS:
        gtype = gguf.GGMLQuantizationType[qtype if quantized or qtype == "F32" else "Q8_0"]
        block, size = gguf.GGML_QUANT_SIZES[gtype]
        n_rows = 1 if qtype == "F32" else rows
        data = rng.integers(0, 256, size=(n_rows, ncols // block * size), dtype=np.uint8)
        writer.add_tensor(name, data, raw_dtype=gtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf(layout: RunLayout, base_dir: Path, seed: int = 0) -> None:
    """Stand-in GGUFs (Q8_0 "converted", Q4_K_M "quantized", with the fallbacks of
    :data:`FAKE_GGUF_FALLBACKS`), with the records convert and quantize write, so that the chain of
    custody from the safetensors to the eval is whole."""
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.llamacpp.convert import source_file_hashes

    rng = np.random.default_rng(seed)
    layout.gguf_dir.mkdir(parents=True, exist_ok=True)
    fallbacks = {"tensors": [{"tensor": name, "ncols": ncols, "block_size": 256, "requested_type": FAKE_GGUF_FALLBACKS[name].lower(),
                              "actual_type": qtype.lower(), "forced_f16": False}
                             for name, ncols, qtype in FAKE_GGUF_TENSORS if name in FAKE_GGUF_FALLBACKS],
                 "count": len(FAKE_GGUF_FALLBACKS), "total_tensors": len(FAKE_GGUF_TENSORS)}
    for prefix, checkpoint_dir, rows in (("base", base_dir, 12), ("fake", layout.pruned_dir, 10)):
        with Checkpoint.open(checkpoint_dir) as checkpoint:
            sources = source_file_hashes(checkpoint_dir, list(checkpoint.shards))
        converted = layout.gguf_dir / f"{prefix}-Q8_0.gguf"
        write_fake_gguf(converted, rows, False, rng)
        quantized = layout.gguf_dir / f"{prefix}-Q4_K_M.gguf"
        write_fake_gguf(quantized, rows, True, rng)
        for path, record in (
            (converted, {"stage": "convert", "outtype": "q8_0", "source_files": sources}),
            (quantized, {"stage": "quantize", "qtype": "Q4_K_M", "in_file": converted.name,
                         "in_sha256": hashlib.sha256(converted.read_bytes()).hexdigest(), "imatrix_sha256": None,
                         "fallbacks": fallbacks}),
        ):
            record |= {"file": path.name, "size_bytes": path.stat().st_size,
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            RunLayout.gguf_record_path(path).write_text(json.dumps(record, indent=2))


def make_fake_run(root: Path, *, with_card: bool = True, with_manifest: bool = True,
                  criterion: str = "contribution-sum", save_model=save_tiny_model) -> FakeRun:
    """Build ``root/runs/fake`` (and ``root/base``): profile, drop map, pruned, gguf, eval, card, manifest.

    ``save_model(directory)`` writes the base model (default: a tiny Gemma 4).
    """
    from moeprune.arch import arch_for_dir
    from moeprune.dropmap.stage import run_dropmap
    from moeprune.prune.surgery import prune_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    base_dir = save_model(root / "base")
    recipe = load_recipe(write_recipe(root, criterion), check_inputs=False)
    layout = RunLayout.for_recipe(recipe.name, runs_dir=root / "runs")
    layout.profile_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_dir / "config.json").read_text())
    arch = arch_for_dir(base_dir)
    write_stats(layout, layers=arch.moe_layers(config), num_experts=arch.num_experts(config))
    run_dropmap(recipe, layout)
    prune_checkpoint(base_dir, layout.drop_map_path, layout.pruned_dir, recipe.prune.max_shard_bytes, fsync=False)
    write_gguf(layout, base_dir)
    write_eval(recipe, layout)
    if with_card:
        from moeprune.card.render import run_card

        run_card(recipe, layout)
    if with_manifest:
        from moeprune.manifest import write_manifest

        write_manifest(layout, recipe.settings(), {"repo_ids": {"model": "me/fake-pruned", "gguf": "me/fake-pruned-GGUF"}})
    return FakeRun(recipe, layout, base_dir)


def regenerate_outputs(run: Path) -> None:
    """Results, card and manifest rebuilt from a run's (edited) files with the project's own code.

    What a forger does last, so that every derived file agrees with the forgery: the checks that
    must still catch it are the ones that re-derive from the inputs, not the ones that compare
    derived files with each other."""
    from moeprune.card.render import render_card
    from moeprune.card.source import ArtifactSource
    from moeprune.eval.results import write_results
    from moeprune.manifest import write_manifest

    layout = RunLayout(run)
    manifest = json.loads(layout.manifest_path.read_text())
    context = json.loads((layout.card_dir / "card_numbers.json").read_text())["context"]
    results = write_results(layout.eval_dir)
    render_card(ArtifactSource.from_run(layout, manifest["recipe"]), results, layout.card_dir, context)
    write_manifest(layout, manifest["recipe"], {"repo_ids": manifest["repo_ids"], "llamacpp": manifest["llamacpp"]})
