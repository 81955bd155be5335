"""A writer of the seed's artifact layout, made from a moeprune demo run (tests only), and the
tampered variants the audit must catch.

The layout is that of the published *Gemma 4 A4B 109-Expert* repo: config + shards at the root,
``expert_drop_metadata.json`` (``base_model``, ``method``, ``original_experts``,
``target_experts``, ``per_layer_keep`` / ``per_layer_drop`` keyed by the layer number as a
string), ``gpqa_results/<model>/results_<date>.json`` and ``samples_<task>_<date>.jsonl`` as
lm-eval writes them, and a README whose numbers sit in model-index metadata and in tables and
lines laid out like the seed card's. Every number is taken from the run's own files.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

DATE = "2026-12-02T05-00-00.000000"
MODEL_FOLDER = "moeprune-demo-pruned"


def _pct(fraction: float, digits: int = 2) -> str:
    return f"{100 * fraction:.{digits}f}%"


def _params(count: int) -> str:
    return f"{count / 1e9:.1f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 1024**3:.4f} GB"


def write_seed_layout(run_dir: Path, out_dir: Path, base_dir: Path, task: str = "demo_mcq") -> Path:
    """Write the seed layout of the pruned model of ``run_dir`` (a finished demo run of the base
    model in ``base_dir``) to ``out_dir``."""
    from moeprune.card.numbers import checkpoint_facts

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True)
    pruned = run_dir / "pruned"
    for path in sorted(pruned.iterdir()):
        if path.is_file() and path.name not in ("expert_drop_metadata.json", "README.md"):
            shutil.copy2(path, out_dir / path.name)
    drop_map = json.loads((run_dir / "expert_drop_metadata.json").read_text())
    strategy = drop_map["strategy"]
    (out_dir / "expert_drop_metadata.json").write_text(json.dumps({
        "base_model": drop_map["base_model"]["id"],
        "method": f"{strategy['criterion']} ranking, {strategy['name']} > {strategy['retention_threshold']}",
        "original_experts": drop_map["num_experts"],
        "target_experts": drop_map["num_experts_kept"],
        "per_layer_keep": {str(e["layer"]): e["keep"] for e in drop_map["layers"]},
        "per_layer_drop": {str(e["layer"]): e["drop"] for e in drop_map["layers"]},
    }, indent=2))

    results_dir = out_dir / "gpqa_results" / MODEL_FOLDER
    results_dir.mkdir(parents=True)
    lm_eval = json.loads((run_dir / "eval" / "pruned" / "lm_eval_results.json").read_text())
    (results_dir / f"results_{DATE}.json").write_text(json.dumps(lm_eval, indent=2))
    shutil.copy2(run_dir / "eval" / "pruned" / f"samples_{task}.jsonl", results_dir / f"samples_{task}_{DATE}.jsonl")

    results = json.loads((run_dir / "eval" / "results.json").read_text())
    pruned_task = results["models"]["pruned"]["tasks"][task]
    base_task = results["models"]["base"]["tasks"][task]
    flex, strict = pruned_task["scores"]["flexible-extract"]["exact_match"], pruned_task["scores"]["strict-match"]["exact_match"]
    base_flex = base_task["scores"]["flexible-extract"]["exact_match"]
    errors = pruned_task["error_analysis"]
    lengths = errors["response_length"]
    config = json.loads((pruned / "config.json").read_text())
    text = config.get("text_config") or config
    base_config = json.loads((Path(base_dir) / "config.json").read_text())
    facts = checkpoint_facts(out_dir)
    base_facts = checkpoint_facts(Path(base_dir))
    kept, total = drop_map["num_experts_kept"], drop_map["num_experts"]
    top_k = text["top_k_experts"]
    layers = drop_map["layers"]
    per_column = math.ceil(len(layers) / 3)
    retention_rows = []
    for r in range(per_column):
        cells = []
        for c in range(3):
            i = c * per_column + r
            cells += [f"L{layers[i]['layer']}", _pct(layers[i]["retained_fraction"])] if i < len(layers) else ["", ""]
        retention_rows.append("| " + " | ".join(cells) + " |")
    worst = min(layers, key=lambda e: (e["retained_fraction"], e["layer"]))
    letters = ", ".join(f"{k}: {errors['wrong_answer_letters'].get(k, 0)}" for k in "ABCD")
    base_params = _params(base_facts.params)
    base_size = _gib(base_facts.files_bytes)
    readme = f"""---
license: apache-2.0
base_model: {drop_map['base_model']['id']}
tags:
- moe
- expert-pruning
model-index:
- name: demo-{kept}e
  results:
  - task:
      type: text-generation
    dataset:
      name: {task}
      type: {task}
    metrics:
    - type: accuracy
      name: flexible-extract
      value: {round(100 * flex['value'], 2)}
    - type: accuracy
      name: strict-match
      value: {round(100 * strict['value'], 2)}
---
# Demo MoE {kept}-Expert

Expert-pruned version of the demo MoE, reduced from {total} to {kept} experts per MoE layer.

| | Original ({total}e) | This model ({kept}e) | Delta |
|---|---|---|---|
| Total params | {base_params} | {_params(facts.params)} | n/a |
| Experts per layer | {base_config['text_config']['num_experts']} | {kept} | -{total - kept}/layer |
| Top-k routing | {top_k} | {top_k} | — |
| GGUF Q4_K_M size | 1 GB | 1 GB | 0% |
| float32 safetensors size | {base_size} | {_gib(facts.files_bytes)} | n/a |
| {task} accuracy | {_pct(base_flex['value'])} ± {_pct(base_flex['stderr'])} | {_pct(flex['value'])} ± {_pct(flex['stderr'])} | {100 * (flex['value'] - base_flex['value']):+.1f} pp |

## Pruning Decision

Uniform {kept} experts per layer, where all layers retain more than {_pct(strategy['retention_threshold'], 0)} of weighted output norm:

| Layer | Retained % | Layer | Retained % | Layer | Retained % |
|---|---|---|---|---|---|
{chr(10).join(retention_rows)}

Worst case: Layer {worst['layer']} at {_pct(worst['retained_fraction'])}.

## GPQA Diamond Evaluation

Google's published score for a different model is 82.3% (not recomputable from this repo).

### Results

| Metric | Score |
|---|---|
| flexible-extract | {_pct(flex['value'])} ± {_pct(flex['stderr'])} |
| strict-match | {_pct(strict['value'])} ± {_pct(strict['stderr'])} |

{errors['total']} questions, all answered (only {errors['invalid']} invalid extraction).

### Error Analysis

Of {errors['total']} questions:
- {errors['correct']} correct ({_pct(errors['correct_fraction'], 1)})
- {errors['wrong']} wrong answer ({_pct(errors['wrong_fraction'], 1)}) — model committed to an incorrect choice
- {errors['invalid']} invalid extraction ({_pct(errors['invalid_fraction'], 1)}) — answer not parseable

Wrong answers by choice ({letters}).

Response statistics:
- Median response length: {lengths['median_chars']:,.0f} characters
- Mean: {lengths['mean_chars']:,.0f} characters
- {lengths['over_chars']['20000']} responses exceeded 20k characters
- {lengths['over_chars']['30000']} response exceeded 30k characters

## Architecture

- Layers: {text['num_hidden_layers']}
- Hidden size: {text['hidden_size']}
- Top-k routing: {top_k}
"""
    (out_dir / "README.md").write_text(readme)
    return out_dir


# --- tampers -------------------------------------------------------------------------------------
def _tensor_location(directory: Path, suffix: str) -> tuple[Path, int, list[int]]:
    """(shard, absolute offset of the data, shape) of the first tensor whose name ends with ``suffix``."""
    for shard in sorted(directory.glob("*.safetensors")):
        raw = shard.read_bytes()
        size = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + size])
        for name, info in sorted(header.items()):
            if name != "__metadata__" and name.endswith(suffix):
                return shard, 8 + size + info["data_offsets"][0], info["shape"]
    raise AssertionError(f"no tensor *{suffix} in {directory}")


def flip_kept_expert_byte(directory: Path) -> str:
    """Flip one byte inside the second kept expert's slice of a gate_up_proj tensor."""
    shard, offset, shape = _tensor_location(directory, "experts.gate_up_proj")
    row_bytes = 4 * math.prod(shape[1:])  # the demo is float32
    position = offset + row_bytes + 17
    data = bytearray(shard.read_bytes())
    data[position] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard.name


def change_one_sample(directory: Path) -> str:
    """Turn one correct flexible-extract answer wrong in the sample log, not in the results file."""
    (log,) = sorted((directory / "gpqa_results").rglob("samples_*.jsonl"))
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        record = json.loads(line)
        if record.get("filter") == "flexible-extract" and float(record["exact_match"]) == 1.0:
            target = record["target"].strip("()")
            record["exact_match"] = 0.0
            record["filtered_resps"] = [f"({'B' if target != 'B' else 'C'})"]
            lines[i] = json.dumps(record, sort_keys=True)
            break
    else:
        raise AssertionError("no correct answer to change")
    log.write_text("\n".join(lines) + "\n")
    return log.name


def inflate_card_claim(directory: Path, points: float = 5.0) -> float:
    """Raise the model-index flexible-extract accuracy by ``points``; return the new claim."""
    readme = directory / "README.md"
    text = readme.read_text()
    head, marker, rest = text.partition("name: flexible-extract\n      value: ")
    value, _, tail = rest.partition("\n")
    inflated = round(float(value) + points, 2)
    readme.write_text(head + marker + f"{inflated}\n" + tail)
    return inflated


def keep_one_more_expert(directory: Path) -> int:
    """Claim one more kept expert per layer (moved from per_layer_drop, target_experts + 1): the
    metadata stays self-consistent but disagrees with config.json and the tensor shapes."""
    path = directory / "expert_drop_metadata.json"
    meta = json.loads(path.read_text())
    for layer in meta["per_layer_keep"]:
        moved = meta["per_layer_drop"][layer].pop(0)
        meta["per_layer_keep"][layer] = sorted(meta["per_layer_keep"][layer] + [moved])
    meta["target_experts"] += 1
    path.write_text(json.dumps(meta, indent=2))
    return meta["target_experts"]
