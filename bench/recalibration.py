"""Router recalibration on the demo: held-out KLD to the base, plain pruned vs recalibrated.

Runs the demo pipeline up to the recalibrate stage with 8 of 16 experts kept per layer
(``dropmap.strategy = "uniform-count"``, ``keep_count = 8``, ``[recalibrate] enabled``) through
``invoke reproduce --until recalibrate`` in a scratch runs directory, then scores in transformers
(float32, CPU) on the held-out text ``src/moeprune/demo/kld_heldout.txt`` (never calibration data):

- mean KL(base || model) per token, over windows of ``--ctx`` tokens (every position but the
  first of each window), with the standard error across windows, for the plain pruned and the
  recalibrated checkpoint; their ratio; the paired difference and its standard error, and the
  difference in units of the combined standard error sqrt(se_plain^2 + se_recal^2);
- top-1 agreement with the base on the same tokens;
- held-out accuracy on the demo's 48 eval questions (greedy, the chat template with thinking as
  the demo recipe serves them, the flexible-extract rule: the last "(X)" of the reply).

Acceptance (issue 24): recalibrated KLD <= 0.8 x plain, difference > 2 combined SE, accuracy not
lower. The figures are printed whatever they are.

Measured (2 shared CPU cores, 2026-12-07; plain KLD 0.5177 +- 0.0138 on the 54 windows): the
stage's default fit (per-layer output MSE, Adam lr 1e-4) gives 0.5293 (ratio 1.022, accuracy
27 -> 29 of 48); lr 1e-3 and 1e-2 lower the per-layer held-out MSE more (to -12% and -16% in
layer 0) and raise the KLD (ratios 1.154 and 1.219). Fitting the router tensors end to end on the
model's output distribution (KL to the base's logits, whole model in memory, not the stage) halves
the KL on the held-out calibration sequences and still raises this text's KLD (ratios 1.17 at lr
1e-3, 1.46 at 1e-2): the calibration (25 chat-template prompts, 1536 tokens) is not this text's
format. On 7.7k tokens of text in this file's format (``kld_text`` with another seed) the per-layer
fit moves the per-layer loss by at most 2% (ratio 0.99) and the end-to-end fit reaches ratio 0.95
(1.2 combined SE): router-only recalibration of this demo does not reach 0.8 with either
objective. On the eval questions teacher-forced (compare-criteria's measure) the end-to-end fit
gives ratio 0.996.

Usage: python bench/recalibration.py [--workdir DIR] [--keep 8] [--ctx 128] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEMO_RECIPE = ROOT / "recipes" / "demo.toml"
HELDOUT = ROOT / "src" / "moeprune" / "demo" / "kld_heldout.txt"
QUESTIONS = ROOT / "src" / "moeprune" / "demo" / "tasks" / "demo_mcq" / "demo_mcq.jsonl"
PROMPT = ("What is the correct answer to this question:{Question}\nChoices:\n(A) {choice1}\n(B) {choice2}\n"
          "(C) {choice3}\n(D) {choice4}\nLet's think step by step: ")


def bench_recipe(keep: int, workdir: Path) -> Path:
    """The demo recipe (paths made absolute) with ``keep`` experts per layer and recalibration on."""
    text = DEMO_RECIPE.read_text(encoding="utf-8").replace('"../', f'"{ROOT}/')
    text = text.replace('name = "demo"', f'name = "recal{keep}"', 1)
    text = re.sub(r"\[dropmap\]\n(?:.+\n)+", f'[dropmap]\nstrategy = "uniform-count"\ncriterion = "contribution-sum"\n'
                  f"keep_count = {keep}\n\n[recalibrate]\nenabled = true\n", text, count=1)
    path = workdir / f"recal{keep}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def run_pipeline(recipe: Path, runs: Path) -> Path:
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-m", "invoke", "reproduce", "--recipe", str(recipe), "--until", "recalibrate"],
                   cwd=ROOT, env=env, check=True)
    return runs / recipe.stem


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def windows(tokenizer, ctx: int) -> list[list[int]]:
    ids = tokenizer(HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = ctx - len(bos)
    return [bos + ids[i:i + step] for i in range(0, len(ids) - step + 1, step)]


def log_probs(model, chunks: list[list[int]]):
    import torch

    with torch.inference_mode():
        return [torch.log_softmax(model(input_ids=torch.tensor([chunk])).logits[0, :-1].float(), dim=-1)
                for chunk in chunks]


def kld_per_window(base_lp, model_lp) -> tuple[list[float], list[float]]:
    """Mean KL(base || model) and top-1 agreement per window."""
    klds, agree = [], []
    for b, m in zip(base_lp, model_lp, strict=True):
        klds.append(float((b.exp() * (b - m)).sum(-1).mean()))
        agree.append(float((b.argmax(-1) == m.argmax(-1)).float().mean()))
    return klds, agree


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def accuracy(model, tokenizer, max_new_tokens: int) -> tuple[float, int]:
    import torch

    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    correct = 0
    for row in rows:
        messages = [{"role": "user", "content": PROMPT.format(**row)}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=True,
                                            return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        found = re.findall(r"\([A-Z]\)", reply)
        correct += bool(found) and found[-1].upper() == row["answer"].upper()
    return correct / len(rows), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-accuracy", action="store_true")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moeprune-recal-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    run = run_pipeline(bench_recipe(args.keep, workdir), workdir / "runs")

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    base_dir = ROOT / "src" / "moeprune" / "demo" / "model"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    chunks = windows(tokenizer, args.ctx)
    models = {"base": base_dir, "plain": run / "pruned", "recalibrated": run / "recalibrated"}
    base_lp = log_probs(load(base_dir), chunks)
    figures = {}
    for name in ("plain", "recalibrated"):
        model = load(models[name])
        klds, agree = kld_per_window(base_lp, log_probs(model, chunks))
        figures[name] = {"klds": klds, "kld": mean_se(klds), "top1": mean_se(agree)}
        if not args.no_accuracy:
            figures[name]["accuracy"] = accuracy(model, tokenizer, args.max_new_tokens)
    if not args.no_accuracy:
        figures["base"] = {"accuracy": accuracy(load(base_dir), tokenizer, args.max_new_tokens)}

    record = json.loads((run / "recalibrated" / "recalibrate.json").read_text(encoding="utf-8"))
    print(f"demo at {args.keep} of 16 experts; held-out text {HELDOUT.name}: {len(chunks)} windows of {args.ctx} tokens")
    for layer in record["layers"]:
        print(f"  layer {layer['layer']}: held-out MSE {layer['holdout_mse_before']:.5f} -> "
              f"{layer['holdout_mse_after']:.5f} ({layer['steps']} steps, best {layer['best_step']}, "
              f"changed={layer['changed']})")
    for name in ("plain", "recalibrated"):
        (kld, se), (top1, top1_se) = figures[name]["kld"], figures[name]["top1"]
        print(f"  {name:13s} mean KLD {kld:.5f} +- {se:.5f} (SE); top-1 agreement {top1:.4f} +- {top1_se:.4f}")
    plain, recal = figures["plain"]["kld"], figures["recalibrated"]["kld"]
    combined = math.sqrt(plain[1] ** 2 + recal[1] ** 2)
    diffs = [p - r for p, r in zip(figures["plain"]["klds"], figures["recalibrated"]["klds"], strict=True)]
    diff, diff_se = mean_se(diffs)
    print(f"  ratio recalibrated / plain: {recal[0] / plain[0]:.4f} (target <= 0.8)")
    print(f"  difference plain - recalibrated: {diff:.5f}; combined SE {combined:.5f} -> {diff / combined:.2f} "
          f"combined SE (target > 2); paired SE {diff_se:.5f} -> {diff / diff_se if diff_se else float('inf'):.2f}")
    if not args.no_accuracy:
        for name in ("base", "plain", "recalibrated"):
            acc, n = figures[name]["accuracy"]
            print(f"  held-out accuracy {name:13s} {acc:.4f} ({round(acc * n)}/{n})")


if __name__ == "__main__":
    main()
