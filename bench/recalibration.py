"""Router recalibration on the demo: held-out KLD to the base, plain pruned vs recalibrated.

Runs the demo pipeline up to the recalibrate stage with 8 of 16 experts kept per layer
(``dropmap.strategy = "uniform-count"``, ``keep_count = 8``, ``[recalibrate] enabled``) through
``invoke reproduce --until recalibrate`` in a scratch runs directory, then scores in transformers
(float32, CPU) on the held-out text ``src/moeprune/demo/kld_heldout.txt`` (never calibration data).
By default the recalibration is ``objective = "model-kl"`` on the text
:func:`recalibration_documents` writes into the work directory (``--mcq`` questions of
``kld_text`` with seed 1 in this file's format, ``--chat`` chat-template conversations of fresh
questions; no block or question of the held-out text and no eval question, checked);
``--objective layer-mse`` runs the stage's default per-layer fit instead; ``--rescore`` scores a
run already in ``--workdir`` without refitting. It prints, for the plain pruned and the
recalibrated checkpoint:

- mean KL(base || model) per token, over windows of ``--ctx`` tokens (every position but the
  first of each window), with the standard error across windows; their ratio; the paired
  difference and its standard error, and the difference in units of the combined standard error
  sqrt(se_plain^2 + se_recal^2); top-1 agreement with the base on the same tokens. On two texts:
  the held-out file, and a fresh text of the same format and size (:func:`fresh_text`,
  ``kld_text`` with seed 2, without any question or block of the held-out file, the calibration
  prompts or the recalibration text). The held-out file was the yardstick every variant below was
  chosen on; the fresh text came after the choices and shows whether they hold on text no choice
  looked at (it depends on the run's recalibration text, so its plain KLD differs a little
  between runs with different texts);
- held-out accuracy (the demo build's own measure, ``evaluate_heldout``: greedy, the chat template
  with thinking, the flexible-extract rule on the visible reply) on the eval's 48 questions and on
  ``--fresh-questions`` (480) fresh ones in none of those texts: 48 questions resolve three
  answers at best, so "not lower" is also checked where it means something.

Acceptance (issue 24): on held-out text, recalibrated KLD <= 0.8 x plain, difference > 2 combined
SE, accuracy not lower. The figures are printed whatever they are.

Measured (2 shared CPU cores, 2026-12-07; plain KLD 0.5177 +- 0.0138 on the 54 windows; plain
accuracy 27/48, base 30/48): the stage's per-layer fit (``layer-mse``, Adam lr 1e-4) gives 0.5293
(ratio 1.022, accuracy 27 -> 29 of 48); lr 1e-3 and 1e-2 lower the per-layer held-out MSE more
(to -12% and -16% in layer 0) and raise the KLD (ratios 1.154 and 1.219). Fitting the router
tensors end to end (KL to the base's logits, whole model in memory) on the 25 chat-template
calibration prompts (1536 tokens) halves their held-out KL and raises this text's KLD (ratios 1.17
at lr 1e-3, 1.46 at 1e-2); on 7.7k tokens in this file's format the per-layer fit gives 0.99 and
the end-to-end fit 0.95 (1.2 combined SE); on the eval questions teacher-forced 0.996.

Then (scratch fits, end to end, lr 1e-3, Adam on batches of 16 windows of 128 tokens, 10% of the
windows held out for picking the best step; the first five also fitted ``router.scale``, a
hidden-size vector the proj columns can absorb, which the stage leaves bit-exact):

=========================================================  =========  ======  ========  ======
variant (training tokens, epochs)                          ratio      SE      accuracy  time
=========================================================  =========  ======  ========  ======
hard top-k, 27.8k tokens of this format, 8 epochs          0.928      1.88    -         96 s
hard top-k, 92k tokens, 6 epochs                           0.897      2.73    -         277 s
relaxed top-k (tau 1 -> 0.05), 27.8k tokens, 8 epochs      0.936      1.67    -         121 s
relaxed top-k (tau 1 -> 0.05), 92k tokens, 6 epochs        0.866      3.55    -         341 s
relaxed top-k (tau 0.3 -> 0.01), 92k tokens, 10 epochs     0.777      6.26    23/48     671 s
straight-through (tau 0.5 -> 0.1), 92k tokens, 10 epochs   0.818      4.60    -         670 s
=========================================================  =========  ======  ========  ======

(SE: the difference in combined standard errors; time: the fit, two fits sharing the 2 cores.)
More text helps (0.95 at 7.7k, 0.93 at 28k, 0.90 at 92k with the hard top-k), and letting the fit
change which experts are chosen helps more: the relaxed top-k (each kept expert weighted
``p_e * sigmoid((z_e - t) / tau)``, ``t`` between the 2nd and 3rd logit, annealed to the hard
top-k; evaluated with the real hard top-k) reaches 0.78, but trained on this format alone it
costs accuracy (23/48 against 27/48 plain): the eval is in the chat template. Adding chat-template
conversations of fresh questions to the text keeps accuracy; that is the stage's ``model-kl``
objective this bench runs (``recalibrate.text`` = the JSONL it writes; relaxed top-k 0.3 -> 0.01,
lr 1e-3, 16 windows a step, 10% held out, validated every 40 steps), through the stage, in
the variants below (2 shared CPU cores, 2026-12-07/08; fits deterministic, so each row is what a
rerun gives; KLD ratios recalibrated / plain, each difference 5.2 to 7.4 combined SE; accuracy
plain 27/48 and 301/480, base 30/48 and 340/480):

==================================================  ========  ==========  =====  =======  ======
training text (tokens), epochs (steps, best)        held-out  fresh text  eval   fresh Q  result
==================================================  ========  ==========  =====  =======  ======
2000 questions + 700 chats (129k), 10 (850)         0.8016    -           28/48  -        FAIL
2000 + 700 (129k), 12 (1020, 1020)                  0.7971    0.7416      30/48  325/480  PASS
2000 + 700 (129k), 16 (1360, 1320)                  0.8047    0.7305      28/48  329/480  FAIL
2000 + 1000 (147k), 12 (1224, 1224)                 0.8060    0.7143      26/48  299/480  FAIL
3000 + 700 (175k), 12 (1284, 1284)                  0.7752    0.7080      23/48  308/480  FAIL
3000 + 1050 (195k), 12 (1524, 1240): the default    0.7921    0.7074      27/48  311/480  PASS
==================================================  ========  ==========  =====  =======  ======

(The 10-epoch run's directory was gone before the fresh measures existed.) The default is the one
with the lowest held-out ratio among those whose accuracy is not lower on either question set:
3000 questions + 1050 conversations (the 2000 + 700 mix scaled by 1.5), KLD 0.41007 +- 0.01215
against 0.51770 +- 0.01380, 5.85 combined SE (paired 10.62), top-1 0.6916 -> 0.7152; on the fresh
text 0.39245 against 0.55479, 6.93 combined SE. Its stage took 54 min beside another fit and a CI
run. What the table says: every model-kl fit lands at 0.78 to 0.81 of the plain KLD on the
held-out file and at 0.71 to 0.74 on the fresh text, so the target that sits on the held-out
file's edge is cleared by 0.06 to 0.09 on text no choice looked at; more questions in the scored
format lower the KLD, and the 48-question accuracy moves by up to 4 answers either way between
neighbouring settings, while 4 of the 5 fits answer more fresh questions than the plain model
(299 to 329 against 301).

A capacity check (fitted on this file itself, never a result): the hard top-k gains nothing in 30
epochs, the relaxed one reaches 0.878 in 90 steps.

Usage: python bench/recalibration.py [--workdir DIR] [--keep 8] [--ctx 128] [--max-new-tokens 128]
       [--objective model-kl|layer-mse] [--mcq 3000] [--chat 1050] [--epochs 12] [--fresh-questions 480]
       [--no-accuracy] [--rescore]
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


QUESTION_RE = re.compile(r"What is the correct answer to this question:(.*?)\nChoices:\n\(A\) (\d+)\n\(B\) (\d+)\n"
                         r"\(C\) (\d+)\n\(D\) (\d+)\n")


def question_keys(texts: list[str]) -> set[tuple[str, tuple[int, ...]]]:
    """(question, sorted choices) of every multiple-choice question rendered in ``texts``."""
    return {(m.group(1), tuple(sorted(int(v) for v in m.groups()[1:]))) for text in texts for m in QUESTION_RE.finditer(text)}


def _block_key(block: str) -> tuple:
    """A text block's identity: an MCQ by its question and sorted choices (any order, as
    :func:`question_keys` reads them), other text by itself."""
    keys = question_keys([block])
    return ("mcq", *sorted(keys)) if keys else ("text", block)


def recalibration_documents(tokenizer, mcq: int, chat: int, seed: int = 1) -> list[str]:
    """The ``model-kl`` calibration text: one document of ``kld_text`` blocks with another seed
    (``mcq`` questions and ``mcq // 4`` general replies, the held-out file's format) and ``chat``
    chat-template conversations of fresh questions (the eval's format, with the reference thought
    and reply), 4 questions to 1 general reply. No block or question of the held-out text and no
    eval question is among them (checked here, not assumed)."""
    import random

    from moeprune.demo import data
    from moeprune.demo.calibration import heldout_keys, kld_text

    held = {_block_key(block) for block in HELDOUT.read_text(encoding="utf-8").strip().split("\n\n")}
    seen, blocks = set(held), []
    for block in kld_text(seed=seed, num_mcq=mcq, num_general=max(1, mcq // 4)).strip().split("\n\n"):
        if _block_key(block) not in seen:
            seen.add(_block_key(block))
            blocks.append(block)
    documents = ["\n\n".join(blocks) + "\n"]
    rng, exclude = random.Random(f"bench-recalibration-chat-{seed}"), heldout_keys(0)
    while len(documents) < chat + 1:
        if len(documents) % 5 == 0:
            _, prompt, thought, reply = data.general_example(rng)
        else:
            question = data.random_mcq(rng, None)
            block = f"{question.prompt()}\n{question.thought()}\n{question.reply()}"
            if question.key in exclude or _block_key(block) in held:
                continue
            exclude.add(question.key)
            prompt, thought, reply = question.prompt(), question.thought(), question.reply()
        context = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                enable_thinking=True, tokenize=False)
        documents.append(f"{context}<|channel>thought\n{thought}<channel|>{reply}<turn|>")
    return documents


def bench_recipe(keep: int, workdir: Path, objective: str, mcq: int, chat: int, epochs: int = 12) -> Path:
    """The demo recipe (paths made absolute) with ``keep`` experts per layer and recalibration on,
    by ``objective``; for ``model-kl`` the calibration text is written beside it."""
    text = DEMO_RECIPE.read_text(encoding="utf-8").replace('"../', f'"{ROOT}/')
    text = text.replace('name = "demo"', f'name = "recal{keep}"', 1)
    section = "[recalibrate]\nenabled = true\n"
    if objective == "model-kl":
        from transformers import AutoTokenizer

        documents = recalibration_documents(AutoTokenizer.from_pretrained(ROOT / "src/moeprune/demo/model"), mcq, chat)
        corpus = workdir / "recalibration_text.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
        section += (f'objective = "model-kl"\ntext = "{corpus}"\nlearning_rate = 1e-3\nholdout_fraction = 0.1\n'
                    f"epochs = {epochs}\nbatch_sequences = 16\nvalidate_every_steps = 40\n")
    text = re.sub(r"\[dropmap\]\n(?:.+\n)+", f'[dropmap]\nstrategy = "uniform-count"\ncriterion = "contribution-sum"\n'
                  f"keep_count = {keep}\n\n{section}", text, count=1)
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


def fresh_text(exclude_texts: list[str], seed: int = 2) -> str:
    """A second scoring text in the held-out file's format and size (``kld_text`` with another
    seed), without any question or block of ``exclude_texts``: the check that a choice made on the
    held-out file (the yardstick of every variant) holds on text no choice looked at."""
    from moeprune.demo.calibration import KLD_TEXT_GENERAL, KLD_TEXT_MCQS, kld_text

    taken = {("mcq", key) for key in question_keys(exclude_texts)}
    taken |= {_block_key(block) for text in exclude_texts for block in text.strip().split("\n\n")}
    text = kld_text(seed=seed, num_mcq=KLD_TEXT_MCQS, num_general=KLD_TEXT_GENERAL)
    blocks = [block for block in text.strip().split("\n\n") if _block_key(block) not in taken]
    return "\n\n".join(blocks) + "\n"


def windows(tokenizer, ctx: int, text: str) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
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


def fresh_questions(count: int, exclude_texts: list[str], seed: int = 1) -> list:
    """``count`` questions (the four kinds in turn) that are neither eval questions nor in any of
    ``exclude_texts`` (the scoring text, the calibration prompts, the recalibration text), nor
    repeated: a larger held-out accuracy set than the eval's 48."""
    import random

    from moeprune.demo import data
    from moeprune.demo.calibration import heldout_keys

    taken = question_keys(exclude_texts)
    evals, seen, out = heldout_keys(0), set(), []
    rng = random.Random(f"bench-recalibration-accuracy-{seed}")
    while len(out) < count:
        question = data.random_mcq(rng, data.QUESTION_KINDS[len(out) % len(data.QUESTION_KINDS)])
        if question.key in evals or question.key in seen or (question.question, question.key[1]) in taken:
            continue
        seen.add(question.key)
        out.append(question)
    return out


def calibration_texts(workdir: Path) -> list[str]:
    """Every text the run profiled or fitted on, and the scoring text: what fresh questions avoid."""
    texts = [HELDOUT.read_text(encoding="utf-8")]
    from moeprune.demo.calibration import CALIBRATION_PATH

    texts += [json.loads(line)["prompt"] for line in CALIBRATION_PATH.read_text(encoding="utf-8").splitlines()
              if line.strip()]
    corpus = workdir / "recalibration_text.jsonl"
    if corpus.is_file():
        texts += [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    return texts


def accuracy(model, tokenizer, questions: list, max_new_tokens: int) -> tuple[int, int]:
    """Correct answers of ``questions``: the demo build's own held-out measure
    (:func:`moeprune.demo.build.evaluate_heldout`: greedy, the chat template with thinking, the
    flexible-extract rule on the visible reply), batched."""
    from moeprune.demo.build import evaluate_heldout

    measured = evaluate_heldout(model, tokenizer, questions, enable_thinking=True, max_new_tokens=max_new_tokens)
    return round(measured["flexible_extract_accuracy"] * len(questions)), len(questions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--objective", choices=("layer-mse", "model-kl"), default="model-kl")
    parser.add_argument("--mcq", type=int, default=3000, help="model-kl: questions of held-out-format text")
    parser.add_argument("--chat", type=int, default=1050, help="model-kl: chat-template conversations")
    parser.add_argument("--epochs", type=int, default=12, help="model-kl: passes over the training windows")
    parser.add_argument("--fresh-questions", type=int, default=480,
                        help="accuracy also on this many fresh questions (none in any text the run used)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the run already in --workdir (no refit; its settings are what it recorded)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="moeprune-recal-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.rescore:
        run = workdir / "runs" / f"recal{args.keep}"
        if not (run / "recalibrated" / "recalibrate.json").is_file():
            sys.exit(f"{run}: no recalibrated run to rescore; run without --rescore first")
    else:
        recipe = bench_recipe(args.keep, workdir, args.objective, args.mcq, args.chat, args.epochs)
        run = run_pipeline(recipe, workdir / "runs")

    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    base_dir = ROOT / "src" / "moeprune" / "demo" / "model"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    used = calibration_texts(workdir)
    texts = {HELDOUT.name: HELDOUT.read_text(encoding="utf-8"), "fresh text": fresh_text(used)}
    chunks = {name: windows(tokenizer, args.ctx, text) for name, text in texts.items()}
    models = {"base": base_dir, "plain": run / "pruned", "recalibrated": run / "recalibrated"}
    base = load(base_dir)
    base_lp = {name: log_probs(base, windows_) for name, windows_ in chunks.items()}
    from moeprune.demo.criteria import demo_heldout_questions

    question_sets = {"the eval's questions": demo_heldout_questions(QUESTIONS),
                     "fresh questions": fresh_questions(args.fresh_questions, used)}
    figures: dict[str, dict] = {name: {"kld": {}, "accuracy": {}} for name in models}
    for name, directory in models.items():
        model = base if name == "base" else load(directory)
        for text in texts if name != "base" else ():
            klds, agree = kld_per_window(base_lp[text], log_probs(model, chunks[text]))
            figures[name]["kld"][text] = {"klds": klds, "kld": mean_se(klds), "top1": mean_se(agree)}
        if not args.no_accuracy:
            figures[name]["accuracy"] = {key: accuracy(model, tokenizer, questions, args.max_new_tokens)
                                         for key, questions in question_sets.items() if questions}

    record = json.loads((run / "recalibrated" / "recalibrate.json").read_text(encoding="utf-8"))
    print(f"demo at {args.keep} of 16 experts, windows of {args.ctx} tokens")
    fitted = record.get("model_fit")
    if fitted is not None:
        print(f"  model-kl fit: held-out calibration KL {fitted['holdout_kl_before']:.5f} -> "
              f"{fitted['holdout_kl_after']:.5f} ({fitted['steps']} steps, best {fitted['best_step']}; "
              f"{fitted['train_tokens']} training tokens, {fitted['holdout_tokens']} held out)")
    for layer in record["layers"] if fitted is None else ():
        print(f"  layer {layer['layer']}: held-out MSE {layer['holdout_mse_before']:.5f} -> "
              f"{layer['holdout_mse_after']:.5f} ({layer['steps']} steps, best {layer['best_step']}, "
              f"changed={layer['changed']})")
    verdicts = {}
    for text in texts:
        print(f"  {text} ({len(chunks[text])} windows):")
        for name in ("plain", "recalibrated"):
            measured = figures[name]["kld"][text]
            (kld, se), (top1, top1_se) = measured["kld"], measured["top1"]
            print(f"    {name:13s} mean KLD {kld:.5f} +- {se:.5f} (SE); top-1 agreement {top1:.4f} +- {top1_se:.4f}")
        plain, recal = figures["plain"]["kld"][text], figures["recalibrated"]["kld"][text]
        combined = math.hypot(plain["kld"][1], recal["kld"][1])
        diff, diff_se = mean_se([p - r for p, r in zip(plain["klds"], recal["klds"], strict=True)])
        ratio = recal["kld"][0] / plain["kld"][0]
        print(f"    ratio recalibrated / plain: {ratio:.4f} (target <= 0.8); difference {diff:.5f} = "
              f"{diff / combined:.2f} combined SE (target > 2), {diff / diff_se if diff_se else float('inf'):.2f} paired SE")
        verdicts[text] = ratio <= 0.8 and diff / combined > 2
    passed = verdicts[HELDOUT.name]
    for key in figures["plain"]["accuracy"]:
        print(f"  held-out accuracy on {key}: " + ", ".join(
            f"{name} {figures[name]['accuracy'][key][0]}/{figures[name]['accuracy'][key][1]}" for name in models))
        passed = passed and figures["recalibrated"]["accuracy"][key][0] >= figures["plain"]["accuracy"][key][0]
    print(f"  acceptance on {HELDOUT.name} (ratio <= 0.8, > 2 combined SE"
          f"{'' if args.no_accuracy else ', accuracy not lower on either question set'}): {'PASS' if passed else 'FAIL'}")
    print(f"  the same KLD targets on the fresh text (no variant was chosen on it): "
          f"{'met' if verdicts['fresh text'] else 'not met'}")

if __name__ == "__main__":
    main()
