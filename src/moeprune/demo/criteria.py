"""Criteria comparison: prune a model in memory per criterion and keep count, measure held-out loss.

For each keep count (default 75% and 50% of the experts) and each criterion, the experts are
ranked by that criterion's score from the profile, each layer keeps its top N (``uniform-count``),
and the model is pruned *in memory* exactly as the prune stage does on disk: expert weights,
router rows (and per-expert biases and scales) are sliced to the kept experts and the expert
count is updated. Then it measures, teacher-forced on the reference answers of the held-out
examples (answer tokens only):

- KL divergence of the pruned model's next-token distribution from the unpruned model's,
  ``KL(base || pruned)`` in nats per token, with its standard error over tokens (primary: it uses
  the whole distribution at every token, so it separates criteria that accuracy cannot);
- top-1 agreement: the fraction of tokens where both models put the highest probability on the
  same token (primary);
- held-out next-token loss: mean negative log-likelihood (nats per token) of the reference answers;
- held-out accuracy (when the examples carry an answer letter): greedy generation, answer read
  with the ``The answer is (X)`` pattern, like the eval stage's flexible extraction (secondary:
  one question is 100/N points).

``run_compare_criteria`` writes ``docs/criteria.json`` (every measured number), ``docs/criteria.md``
(the table) and ``docs/criteria.png`` (the plot).
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeprune.atomic import atomic_file, write_json
from moeprune.dropmap.select import (
    DropMapError,
    criterion_scores,
    select_experts,
)
from moeprune.dropmap.types import CRITERIA
from moeprune.hashing import sha256_file

DEFAULT_KEEP_FRACTIONS = (0.75, 0.625, 0.5)
ANSWER_PATTERN = re.compile(r"answer is \(([A-D])\)")


@dataclass(frozen=True)
class HeldoutExample:
    """One held-out text: ``context`` is given, the loss is measured on ``target``.

    ``answer_letter`` (A-D) makes the example count for accuracy too.
    """

    context: str
    target: str
    answer_letter: str | None = None


# --- in-memory pruning -------------------------------------------------------------------------


def moe_decoder_layers(model: Any) -> dict[int, Any]:
    """The MoE layers' modules (router, experts and the block holding them), by layer index."""
    from moeprune.arch import arch_for_model

    modules = {m.layer_index: m for m in arch_for_model(model).moe_modules(model)}
    if not modules:
        raise DropMapError("the model has no MoE decoder layers (router + experts) to prune")
    return dict(sorted(modules.items()))


def prune_experts_in_memory(model: Any, keep_by_layer: Mapping[int, Sequence[int]]) -> None:
    """Keep only ``keep_by_layer[L]`` experts in every MoE layer L, in place.

    The family adapter slices the expert weights on the expert axis and the router's rows (and its
    per-expert biases and scales), and sets the expert count on the modules and the text config.
    Kept experts stay in increasing index order, so the router's top-k picks the best remaining ones.
    """
    from moeprune.arch import ArchError, arch_for_model

    moe_decoder_layers(model)
    try:
        arch_for_model(model).prune_in_memory(model, keep_by_layer)
    except ArchError as exc:
        raise DropMapError(str(exc)) from None


# --- measurements ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    target_start: int  # first position whose token is scored
    answer_letter: str | None
    context_ids: list[int]


def encode_examples(tokenizer: Any, examples: Iterable[HeldoutExample]) -> list[EncodedExample]:
    """Token ids of context + target (context and target tokenised separately, no BOS added twice)."""
    encoded = []
    for example in examples:
        context_ids = tokenizer(example.context, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"]
        if not target_ids:
            continue
        encoded.append(EncodedExample(context_ids + target_ids, len(context_ids), example.answer_letter, context_ids))
    if not encoded:
        raise DropMapError("no held-out examples with a non-empty target")
    return encoded


def heldout_logprobs(model: Any, encoded: Sequence[EncodedExample], batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Next-token log-probabilities at every scored position and the token that follows there.

    Returns ``(log_probs [tokens, vocab] float64, next_ids [tokens])``, in example order.
    """
    import torch

    pad_id = 0
    rows, targets = [], []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            batch = encoded[start : start + batch_size]
            width = max(len(e.input_ids) for e in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, example in enumerate(batch):
                ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
                mask[row, : len(example.input_ids)] = 1
            log_probs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), dim=-1)
            for row, example in enumerate(batch):
                # position t predicts token t+1; score the positions that predict target tokens
                positions = slice(max(example.target_start, 1) - 1, len(example.input_ids) - 1)
                rows.append(log_probs[row, positions].numpy())
                targets.append(np.asarray(example.input_ids[positions.start + 1 : positions.stop + 1]))
    return np.concatenate(rows), np.concatenate(targets)


def agreement_with_base(base_log_probs: np.ndarray, log_probs: np.ndarray) -> dict[str, float]:
    """KL(base || model) per token (nats) and top-1 agreement, each with its standard error.

    Pure: both arrays are ``[tokens, vocab]`` log-probabilities of the same positions. The standard
    errors treat tokens as independent (tokens of one answer are not, so read them as a lower bound).
    """
    base_log_probs = np.asarray(base_log_probs, dtype=np.float64)
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if base_log_probs.shape != log_probs.shape or base_log_probs.ndim != 2:
        raise DropMapError(f"log-probabilities of shapes {base_log_probs.shape} and {log_probs.shape} do not pair up")
    n = base_log_probs.shape[0]
    kld = np.sum(np.exp(base_log_probs) * (base_log_probs - log_probs), axis=1)
    same = (np.argmax(base_log_probs, axis=1) == np.argmax(log_probs, axis=1)).astype(np.float64)
    top1 = float(same.mean())
    return {
        "kld": float(kld.mean()),
        "kld_stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "top1_agreement": top1,
        "top1_stderr": math.sqrt(top1 * (1 - top1) / (n - 1)) if n > 1 else 0.0,
        "tokens": int(n),
    }


def greedy_accuracy(
    model: Any, tokenizer: Any, examples: Sequence[HeldoutExample], max_new_tokens: int
) -> tuple[int, int]:
    """(correct, total) over examples with an answer letter: greedy decoding from the context,
    the last ``The answer is (X)`` in the output is the answer (none found counts as wrong)."""
    import torch

    correct = total = 0
    with torch.inference_mode():
        for example in encode_examples(tokenizer, examples):
            if example.answer_letter is None:
                continue
            ids = torch.tensor([example.context_ids])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            )
            text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            found = ANSWER_PATTERN.findall(text)
            total += 1
            correct += int(bool(found) and found[-1] == example.answer_letter)
    return correct, total


def keep_counts_for(num_experts: int, top_k: int, keep_fractions: Sequence[float]) -> list[int]:
    """Keep counts for fractions of the experts, rounded, never below top-k."""
    counts = []
    for fraction in keep_fractions:
        if not (0 < fraction <= 1):
            raise DropMapError(f"keep fraction {fraction} is outside (0, 1]")
        counts.append(max(top_k, int(round(fraction * num_experts))))
    return counts


def compare_criteria(
    model: Any,
    tokenizer: Any,
    totals: Mapping[str, np.ndarray],
    per_domain: Mapping[str, Mapping[str, np.ndarray]],
    layers: Sequence[int],
    examples: Sequence[HeldoutExample],
    *,
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
    criteria: Sequence[str] = CRITERIA,
    random_seeds: Sequence[int] = (0, 1, 2),
    batch_size: int = 8,
    accuracy_fn: Callable[[Any], tuple[int, int]] | None = None,
    recalibrate_fn: Callable[[dict[int, list[int]]], Mapping[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prune ``model`` (a copy per setting) by each criterion and keep count; measure each copy.

    ``accuracy_fn(model) -> (correct, total)`` also measures held-out accuracy (e.g.
    :func:`greedy_accuracy` bound to a tokenizer). ``recalibrate_fn(keep_by_layer)`` returns
    refitted router tensors by parameter name (the recalibrate stage's fit); each pruned copy is
    then measured again with them, as the row's ``recalibrated``. The random criterion is run once
    per seed in ``random_seeds``. Returns plain data (see :func:`write_criteria_docs`).
    """
    model_layers = moe_decoder_layers(model)
    if list(layers) != list(model_layers):
        raise DropMapError(f"profile layers {list(layers)} differ from the model's MoE layers {list(model_layers)}")
    contribution = np.asarray(totals["contribution_sum"], dtype=np.float64)
    from moeprune.arch import arch_for_model

    arch = arch_for_model(model)
    num_experts, top_k = arch.model_num_experts(model), int(arch.model_top_k(model))
    if contribution.shape != (len(layers), num_experts):
        raise DropMapError(
            f"profile shape {contribution.shape} does not match the model ({len(layers)} layers x {num_experts} experts)"
        )
    encoded = encode_examples(tokenizer, examples)
    model.eval()
    reference: dict[str, np.ndarray] = {}

    def measure(candidate: Any) -> dict[str, Any]:
        started = time.monotonic()
        log_probs, next_ids = heldout_logprobs(candidate, encoded, batch_size)
        nll = -log_probs[np.arange(len(next_ids)), next_ids]
        row: dict[str, Any] = {"loss": float(nll.mean()), "target_tokens": int(len(next_ids))}
        if not reference:
            reference["log_probs"] = log_probs
        row.update(agreement_with_base(reference["log_probs"], log_probs))
        if accuracy_fn is not None:
            correct, total = accuracy_fn(candidate)
            row.update(correct=correct, answered=total, accuracy=correct / total if total else None)
        row["seconds"] = round(time.monotonic() - started, 2)
        return row

    baseline = measure(model) | {"keep_count": num_experts}
    log(f"baseline ({num_experts} experts): loss {baseline['loss']:.4f}, KLD to itself {baseline['kld']:.2g}"
        + _accuracy_note(baseline))
    rows = []
    for keep_count, fraction in zip(keep_counts_for(num_experts, top_k, keep_fractions), keep_fractions):
        for criterion in criteria:
            seeds = list(random_seeds) if criterion == "random" else [0]
            for seed in seeds:
                scores = criterion_scores(criterion, totals, per_domain, seed=seed)
                selection = select_experts(
                    "uniform-count", contribution, scores, top_k=top_k, criterion=criterion,
                    keep_count=keep_count, seed=seed,
                )
                candidate = copy.deepcopy(model)
                keep_by_layer = {layer: [int(i) for i in selection.keep_indices(row)] for row, layer in enumerate(layers)}
                prune_experts_in_memory(candidate, keep_by_layer)
                row = measure(candidate) | {
                    "criterion": criterion,
                    "seed": seed if criterion == "random" else None,
                    "keep_fraction": fraction,
                    "keep_count": keep_count,
                    "mean_retained_fraction": float(selection.retained_fraction.mean()),
                    "min_retained_fraction": float(selection.retained_fraction.min()),
                }
                if recalibrate_fn is not None:
                    values = recalibrate_fn(keep_by_layer)
                    set_parameters(candidate, values)
                    row["recalibrated"] = measure(candidate) | {"tensors": _value_hashes(values)}
                del candidate
                rows.append(row)
                log(
                    f"keep {keep_count}/{num_experts} {criterion}{'' if row['seed'] is None else f' seed {seed}'}: "
                    f"KLD {row['kld']:.4f} ± {row['kld_stderr']:.4f}, top-1 {row['top1_agreement']:.3f}, "
                    f"loss {row['loss']:.4f}, min retained {row['min_retained_fraction']:.4f}" + _accuracy_note(row)
                    + ("" if "recalibrated" not in row else
                       f"; recalibrated KLD {row['recalibrated']['kld']:.4f}, top-1 "
                       f"{row['recalibrated']['top1_agreement']:.3f}" + _accuracy_note(row["recalibrated"]))
                )
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "examples": len(encoded),
        "baseline": baseline,
        "rows": rows,
    }


def set_parameters(model: Any, values: Mapping[str, Any]) -> None:
    """Overwrite the named parameters of ``model`` with ``values`` (cast to the parameter's dtype)."""
    import torch

    parameters = dict(model.named_parameters())
    missing = sorted(set(values) - set(parameters))
    if missing:
        raise DropMapError(f"the model has no parameter {missing[0]} to take a recalibrated value")
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].copy_(value.to(parameters[name].dtype))


def _accuracy_note(row: Mapping[str, Any]) -> str:
    if row.get("accuracy") is None:
        return ""
    return f", accuracy {row['accuracy']:.3f} ({row['correct']}/{row['answered']})"


# --- summarising and writing -------------------------------------------------------------------


def summarize(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (keep count, criterion): random's seeds are averaged (with min and max)."""
    grouped: dict[tuple[int, str], list[Mapping[str, Any]]] = {}
    for row in result["rows"]:
        grouped.setdefault((row["keep_count"], row["criterion"]), []).append(row)
    table = []
    for (keep_count, criterion), rows in grouped.items():
        losses = [r["loss"] for r in rows]
        accuracies = [r["accuracy"] for r in rows if r.get("accuracy") is not None]
        klds = [r["kld"] for r in rows]
        table.append(
            {
                "keep_count": keep_count,
                "keep_fraction": rows[0]["keep_fraction"],
                "criterion": criterion,
                "runs": len(rows),
                "kld": float(np.mean(klds)),
                "kld_min": min(klds),
                "kld_max": max(klds),
                # one run: its standard error over tokens; several (random seeds): the mean's, over runs
                "kld_stderr": rows[0]["kld_stderr"] if len(rows) == 1 else float(np.std(klds, ddof=1) / math.sqrt(len(rows))),
                "top1_agreement": float(np.mean([r["top1_agreement"] for r in rows])),
                "top1_stderr": rows[0]["top1_stderr"] if len(rows) == 1 else float(
                    np.std([r["top1_agreement"] for r in rows], ddof=1) / math.sqrt(len(rows))),
                "loss": float(np.mean(losses)),
                "loss_min": min(losses),
                "loss_max": max(losses),
                "loss_delta": float(np.mean(losses)) - result["baseline"]["loss"],
                "accuracy": float(np.mean(accuracies)) if accuracies else None,
                "min_retained_fraction": float(np.mean([r["min_retained_fraction"] for r in rows])),
                "mean_retained_fraction": float(np.mean([r["mean_retained_fraction"] for r in rows])),
                "recalibrated": _recalibrated_summary([r["recalibrated"] for r in rows if "recalibrated" in r]),
            }
        )
    return table


def _value_hashes(values: Mapping[str, Any]) -> dict[str, str]:
    """sha256 of each refitted router tensor's bytes (as the recalibrate stage's record hashes them),
    so a row's fit can be matched against a run's ``recalibrate.json``."""
    from moeprune.hashing import sha256_bytes
    from moeprune.recalibrate.stage import tensor_bytes

    return {name: sha256_bytes(tensor_bytes(value.detach())) for name, value in sorted(values.items())}


def _recalibrated_summary(measured: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The recalibrated copies' means (standard error as in :func:`summarize`); None if not measured."""
    if not measured:
        return None
    klds = [m["kld"] for m in measured]
    accuracies = [m["accuracy"] for m in measured if m.get("accuracy") is not None]
    return {
        "kld": float(np.mean(klds)),
        "kld_stderr": measured[0]["kld_stderr"] if len(measured) == 1 else float(np.std(klds, ddof=1) / math.sqrt(len(klds))),
        "top1_agreement": float(np.mean([m["top1_agreement"] for m in measured])),
        "loss": float(np.mean([m["loss"] for m in measured])),
        "accuracy": float(np.mean(accuracies)) if accuracies else None,
    }


def recovery_markdown(result: Mapping[str, Any]) -> list[str]:
    """The criteria-and-recovery section: per keep count and criterion, KLD, top-1 agreement and
    accuracy without and with router recalibration (empty when recalibration was not measured)."""
    table = [r for r in summarize(result) if r["recalibrated"] is not None]
    if not table:
        return []
    recal = result.get("source", {}).get("recalibrate") or {}
    has_accuracy = result["baseline"].get("accuracy") is not None
    lines = [
        "## Criteria and recovery: without and with router recalibration", "",
        "Each pruned copy above, measured again after the recalibrate stage's router fit "
        f"(`{recal.get('fit', 'moeprune.recalibrate.stage.fit_routers')}`, settings "
        f"{json.dumps(recal.get('settings'), sort_keys=True)}, on `{recal.get('text') or recal.get('sequences', '?')}`). Ratio = recalibrated KLD / plain KLD (below 1: recovered); "
        "Δ/SE = (plain - recalibrated) KLD over the combined standard error.", "",
    ]
    header = "| Keep | Criterion | KLD plain | KLD recalibrated | Ratio | Δ/SE | Top-1 plain | Top-1 recalibrated |"
    rule = "|---:|---|---:|---:|---:|---:|---:|---:|"
    if has_accuracy:
        header += " Accuracy plain | Accuracy recalibrated |"
        rule += "---:|---:|"
    lines += [header, rule]

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for row in sorted(table, key=lambda r: (-r["keep_count"], r["kld"])):
        after = row["recalibrated"]
        spread = math.hypot(row["kld_stderr"], after["kld_stderr"])
        cells = [f"{row['keep_count']}/{result['num_experts']}", f"`{row['criterion']}`",
                 f"{row['kld']:.4f} ± {row['kld_stderr']:.4f}", f"{after['kld']:.4f} ± {after['kld_stderr']:.4f}",
                 f"{after['kld'] / row['kld']:.3f}" if row["kld"] > 0 else "-",
                 f"{(row['kld'] - after['kld']) / spread:+.1f}" if spread > 0 else "-",
                 percent(row["top1_agreement"]), percent(after["top1_agreement"])]
        if has_accuracy:
            cells += [percent(row["accuracy"]), percent(after["accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def criteria_markdown(result: Mapping[str, Any], plot_name: str = "criteria.png") -> str:
    """The docs page: setup, table per keep count (lowest KL divergence first), and the plot."""
    table = summarize(result)
    baseline = result["baseline"]
    has_accuracy = baseline.get("accuracy") is not None
    source = result.get("source", {})
    seeds = sorted({r["seed"] for r in result["rows"] if r["seed"] is not None})
    lines = [
        "# Drop-map criteria compared on the demo model",
        "",
        "Generated by `invoke compare-criteria` (`moeprune.demo.criteria`); every number below is",
        "measured, and all of them are in `criteria.json` next to this page.",
        "",
        f"- Model: `{source.get('model', '?')}` ({result['num_experts']} experts per MoE layer, top-{result['top_k']} routing).",
        f"- Profile: `{source.get('profile', '?')}` (scores of every criterion come from it)"
        + (f"; calibration: {source['calibration']}" if source.get("calibration") else "") + ".",
        f"- Held-out text: {result['examples']} examples from `{source.get('heldout', '?')}`, teacher-forced on "
        f"the reference answers ({baseline['target_tokens']} answer tokens).",
        "- **Primary metrics:** mean KL divergence `KL(unpruned || pruned)` of the next-token distributions "
        "(nats/token, ± standard error) and top-1 agreement (share of tokens where both models rank the same "
        "token first). Secondary: held-out loss (mean negative log-likelihood of the reference answer, nats/token)"
        + (" and accuracy" if has_accuracy else "") + ".",
    ]
    if has_accuracy:
        lines.append(f"- Accuracy: {source.get('accuracy', 'greedy decoding, answer read from `The answer is (X)`')}.")
    lines += [
        "- Each layer keeps its top-N experts under the criterion (`uniform-count`); the model is pruned in",
        "  memory (expert weights, router rows and per-expert scales sliced, `num_experts` updated).",
        "- Retained = fraction of the layer's contribution sum (weighted output norm) the kept experts hold,",
        f"  whatever criterion ranked them; `random` is averaged over seeds {seeds} (its ± is the standard error",
        "  over seeds, its range in brackets); for one run ± is the standard error over tokens.",
        "",
        f"Unpruned baseline ({result['num_experts']} experts): loss **{baseline['loss']:.4f}**"
        + (f", accuracy **{100 * baseline['accuracy']:.1f}%**" if has_accuracy else "")
        + f"; against itself KLD {baseline['kld']:.1e}, top-1 agreement {100 * baseline['top1_agreement']:.1f}%.",
        "",
    ]
    for keep_count in sorted({r["keep_count"] for r in table}, reverse=True):
        rows = sorted((r for r in table if r["keep_count"] == keep_count), key=lambda r: r["kld"])
        fraction = rows[0]["keep_fraction"]
        lines += [f"## Keep {keep_count} of {result['num_experts']} experts ({100 * fraction:.0f}%)", ""]
        header = ("| Criterion | Mean KLD (nats/token) | Top-1 agreement | Held-out loss | vs. baseline | "
                  "Worst-layer retained | Mean retained |")
        rule = "|---|---:|---:|---:|---:|---:|---:|"
        if has_accuracy:
            header += " Accuracy |"
            rule += "---:|"
        lines += [header, rule]
        for row in rows:
            kld = f"{row['kld']:.4f} ± {row['kld_stderr']:.4f}"
            loss = f"{row['loss']:.4f}"
            if row["runs"] > 1:
                kld += f" [{row['kld_min']:.4f}-{row['kld_max']:.4f}]"
                loss += f" [{row['loss_min']:.4f}-{row['loss_max']:.4f}]"
            cells = [
                f"`{row['criterion']}`", kld, f"{100 * row['top1_agreement']:.1f}% ± {100 * row['top1_stderr']:.1f}%",
                loss, f"{row['loss_delta']:+.4f}",
                f"{100 * row['min_retained_fraction']:.2f}%", f"{100 * row['mean_retained_fraction']:.2f}%",
            ]
            if has_accuracy:
                cells.append("-" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%")
            lines.append("| " + " | ".join(cells) + " |")
        best = rows[0]
        lines += ["", f"Lowest KL divergence at {keep_count} experts: `{best['criterion']}` ({best['kld']:.4f})"
                  + _margin_note(rows) + "."]
        top = max(rows, key=lambda r: r["top1_agreement"])
        lines.append(f"Highest top-1 agreement at {keep_count} experts: `{top['criterion']}` "
                     f"({100 * top['top1_agreement']:.1f}%).")
        lowest = min(rows, key=lambda r: r["loss"])
        lines.append(f"Lowest held-out loss at {keep_count} experts: `{lowest['criterion']}` ({lowest['loss']:.4f}).")
        if has_accuracy:
            top = max(rows, key=lambda r: r["accuracy"] or 0.0)
            lines.append(f"Highest accuracy at {keep_count} experts: `{top['criterion']}` ({100 * top['accuracy']:.1f}%).")
        lines.append("")
    if has_accuracy:
        lines += [f"One question is {100 / result['examples']:.1f} accuracy points: differences of a few questions are "
                  "within noise at this size, which is why accuracy is secondary here.", ""]
    lines += recovery_markdown(result)
    for note in source.get("notes", []):
        lines += [note, ""]
    lines += [f"![KL divergence, top-1 agreement and accuracy per criterion and keep count]({plot_name})", ""]
    return "\n".join(lines)


def _margin_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """How far the best criterion is ahead of the runner-up, in combined standard errors."""
    if len(rows) < 2:
        return ""
    best, second = rows[0], rows[1]
    spread = math.hypot(best["kld_stderr"], second["kld_stderr"])
    if spread <= 0:
        return ""
    gap = (second["kld"] - best["kld"]) / spread
    return (f", {gap:.1f} standard errors ahead of `{second['criterion']}` ({second['kld']:.4f})"
            + ("" if gap >= 2 else ": not a clear win"))


def plot_criteria(result: Mapping[str, Any], path: Path) -> None:
    """Grouped bars per keep count: held-out loss increase over the unpruned model per criterion,
    and (when measured) held-out accuracy with the unpruned accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summarize(result)
    baseline = result["baseline"]
    keep_counts = sorted({r["keep_count"] for r in table}, reverse=True)
    criteria = list(dict.fromkeys(r["criterion"] for r in table))
    has_accuracy = baseline.get("accuracy") is not None
    fig, axes = plt.subplots(1, 3 if has_accuracy else 2, figsize=(17 if has_accuracy else 12, 4.5), squeeze=False)
    width = 0.8 / len(criteria)
    panels = [("kld", "mean KL divergence to unpruned (nats/token)", 0.0),
              ("top1_agreement", "top-1 agreement with unpruned", 1.0)]
    if has_accuracy:
        panels.append(("accuracy", "held-out accuracy (secondary)", baseline["accuracy"]))
    for ax, (key, label, reference) in zip(axes[0], panels):
        for i, criterion in enumerate(criteria):
            xs, heights, low, high = [], [], [], []
            for j, keep_count in enumerate(keep_counts):
                row = next(r for r in table if r["keep_count"] == keep_count and r["criterion"] == criterion)
                xs.append(j + (i - (len(criteria) - 1) / 2) * width)
                heights.append(row[key] if row[key] is not None else 0.0)
                if key == "kld":  # ± standard error
                    low.append(row["kld_stderr"])
                    high.append(row["kld_stderr"])
            error = [low, high] if key == "kld" and (any(low) or any(high)) else None
            ax.bar(xs, heights, width, label=criterion, yerr=error, capsize=3)
        ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                   label=f"unpruned ({result['num_experts']} experts)")
        ax.set_xticks(range(len(keep_counts)))
        ax.set_xticklabels([f"keep {k}/{result['num_experts']}" for k in keep_counts])
        ax.set_ylabel(label)
    axes[0][0].set_title("KL divergence after pruning (lower is better)")
    axes[0][1].set_title("Top-1 agreement after pruning (higher is better)")
    axes[0][1].set_ylim(0, 1.02)
    if has_accuracy:
        axes[0][2].set_title("Accuracy after pruning (secondary)")
        axes[0][2].set_ylim(0, 1)
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def write_criteria_docs(result: Mapping[str, Any], docs_dir: Path) -> dict[str, Path]:
    """Write ``criteria.json``, ``criteria.md`` and ``criteria.png`` into ``docs_dir``."""
    docs_dir = Path(docs_dir)
    paths = {"json": docs_dir / "criteria.json", "markdown": docs_dir / "criteria.md", "plot": docs_dir / "criteria.png"}
    write_json(paths["json"], _json_safe(result))
    plot_criteria(result, paths["plot"])
    with atomic_file(paths["markdown"]) as handle:
        handle.write(criteria_markdown(result, paths["plot"].name))
    return paths


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# --- the demo run --------------------------------------------------------------------------------


def _heldout_data_path(recipe: Any) -> Path:
    """The held-out dataset of the recipe's first eval task: ``<include_path>/<task>/*.jsonl``."""
    if recipe.include_path is None:
        raise DropMapError("eval.include_path is not set: the comparison needs the local held-out task data")
    task_dir = recipe.include_path / recipe.eval.tasks[0]
    files = sorted(task_dir.glob("*.jsonl"))
    if len(files) != 1:
        raise DropMapError(
            f"{task_dir}: expected one held-out .jsonl file, found {len(files)}; build the demo model first"
        )
    return files[0]


def demo_heldout_questions(path: Path) -> list[Any]:
    """The demo_mcq rows as :class:`moeprune.demo.data.MCQ` (kind, choices, answer letter)."""
    from moeprune.demo.data import LETTERS, MCQ

    from moeprune.userfile import read_text

    questions = []
    for number, line in enumerate(read_text(Path(path), "demo_mcq data", DropMapError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices = tuple(int(c) for c in row["choices"])
            questions.append(MCQ(kind=row["kind"], choices=choices, answer_index=LETTERS.index(row["answer"].strip("()"))))
        except (KeyError, ValueError, TypeError) as exc:
            raise DropMapError(f"{path}:{number}: not a demo_mcq row ({exc!r})") from None
    return questions


def demo_build_questions(model_dir: Path) -> list[Any]:
    """The held-out questions the demo build evaluated, from ``build_record.json``'s seed and count."""
    from moeprune.demo.data import heldout_mcqs

    path = Path(model_dir) / "build_record.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return heldout_mcqs(int(record["heldout"]["num_questions"]), int(record["seed"]))
    except (FileNotFoundError, KeyError, ValueError, TypeError) as exc:
        raise DropMapError(f"{path}: cannot recover the held-out questions ({exc!r}); build the demo model") from None


def demo_heldout_examples(tokenizer: Any, questions: Sequence[Any], enable_thinking: bool = True) -> list[HeldoutExample]:
    """Prompt (through the chat template) and reference answer turn, as the demo model was trained.

    The target is the thought channel, the visible reply and the end-of-turn marker, the same
    text the demo build trains on (``moeprune.demo.build``).
    """
    examples = []
    for question in questions:
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": question.prompt()}], add_generation_prompt=True,
            enable_thinking=enable_thinking, tokenize=False,
        )
        thought = f"<|channel>thought\n{question.thought()}<channel|>" if enable_thinking else ""
        examples.append(HeldoutExample(context, f"{thought}{question.reply()}<turn|>", question.answer_letter))
    return examples


def run_compare_criteria(
    recipe: Any,
    layout: Any,
    docs_dir: Path,
    *,
    limit: int | None = None,
    accuracy: bool = True,
    keep_fractions: Sequence[float] = DEFAULT_KEEP_FRACTIONS,
    random_seeds: Sequence[int] = (0, 1, 2),
    threads: int = 2,
    recalibrate: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compare the criteria on the recipe's (local) base model with its profile; write the docs.

    With ``recalibrate``, every pruned copy is also measured after the recalibrate stage's router
    fit (:func:`moeprune.recalibrate.stage.fit_by_objective`: the recipe's ``[recalibrate]``
    objective and settings, on the profile's calibration sequences or ``recalibrate.text``): the
    criteria-and-recovery table. Each row records its refitted tensors' sha256, the hashes the
    stage's ``recalibrate.json`` holds for the same kept experts.

    Loss is measured on the eval task's held-out questions (reference thought + answer);
    accuracy (``accuracy=True``) with the demo build's greedy held-out evaluation (flexible
    extract of ``(X)``, thinking on), the same measure as the model's ``build_record.json``.
    """
    import torch
    import transformers
    from transformers import AutoTokenizer

    from moeprune.arch import inspect

    from moeprune.dropmap.io import check_profile_matches_model, read_model_config
    from moeprune.profile.stats import load_stats

    if recipe.base_dir is None:
        raise DropMapError("compare-criteria runs on a local model (model.base must be a directory)")
    torch.set_num_threads(threads)
    stats = load_stats(layout.profile_stats_path)
    config = read_model_config(recipe.base_dir)
    check_profile_matches_model(stats.layers, stats.num_experts, config, layout.profile_stats_path,
                                recipe.base_dir / "config.json")
    try:
        data_path: Path | None = _heldout_data_path(recipe)
        questions = demo_heldout_questions(data_path)[:limit]
    except DropMapError:
        # No dataset file yet: regenerate the build's held-out questions from its recorded seed.
        data_path, questions = None, demo_build_questions(recipe.base_dir)[:limit]
    tokenizer = AutoTokenizer.from_pretrained(recipe.base_dir)
    model_class = getattr(transformers, inspect(recipe.base_dir).transformers_class)
    model = model_class.from_pretrained(recipe.base_dir, dtype=torch.float32).eval()
    examples = demo_heldout_examples(tokenizer, questions)

    accuracy_fn = None
    if accuracy:
        from moeprune.demo.build import evaluate_heldout

        def accuracy_fn(candidate: Any) -> tuple[int, int]:
            measured = evaluate_heldout(candidate, tokenizer, questions, enable_thinking=True)
            return round(measured["flexible_extract_accuracy"] * len(questions)), len(questions)

    recalibrate_fn = None
    settings: dict[str, Any] | None = None
    if recalibrate:
        from moeprune.recalibrate.stage import fit_by_objective, recipe_settings

        settings = recipe_settings(recipe)

        def recalibrate_fn(keep_by_layer: dict[int, list[int]]) -> Mapping[str, Any]:
            values, _ = fit_by_objective(recipe.base_dir, keep_by_layer, layout.sequences_path,
                                         recipe.calibration.domains, recipe.calibration.batch_size, settings,
                                         "compare-criteria's selection")
            return values

    result = compare_criteria(
        model, tokenizer, stats.totals, stats.per_domain, stats.layers, examples,
        keep_fractions=keep_fractions, random_seeds=random_seeds, accuracy_fn=accuracy_fn,
        recalibrate_fn=recalibrate_fn, log=log,
    )
    root = Path.cwd()
    result["source"] = {
        "model": _display_path(recipe.base_dir, root),
        "profile": _display_path(layout.profile_stats_path, root),
        "profile_num_tokens": stats.num_tokens,
        "heldout": _display_path(data_path, root) if data_path else
                   f"moeprune.demo.data.heldout_mcqs (seed of {_display_path(recipe.base_dir / 'build_record.json', root)})",
        "accuracy": "greedy generation through the chat template with thinking on (`moeprune.demo.build."
                    "evaluate_heldout`, up to 96 new tokens), answer = last `(X)` in the visible reply "
                    "(lm-eval's flexible-extract)" if accuracy else None,
        "torch_threads": threads,
        "recalibrate": None if settings is None else _recalibration_source(settings, layout.sequences_path, root),
        "profile_stats_sha256": sha256_file(layout.profile_stats_path),
        "calibration": (_calibration_note(recipe.prompts_path, root)
                        + f" in domains {', '.join(f'`{d}`' for d in stats.domains)}, {stats.num_tokens} profiled tokens"),
    }
    paths = write_criteria_docs(result, Path(docs_dir))
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


def _recalibration_source(settings: dict[str, Any], sequences_path: Path, root: Path) -> dict[str, Any]:
    """What the recovery table's fit ran: the function, its settings, and the data it fitted on
    (the profile's sequences for ``layer-mse``, ``recalibrate.text`` for ``model-kl``), with sha256."""
    from moeprune.recalibrate.stage import fitter_name

    if "text" in settings:
        text = _display_path(settings["text"], root)
        return {"fit": fitter_name(settings), "settings": {**settings, "text": text}, "text": text,
                "text_sha256": settings["text_sha256"]}
    return {"fit": fitter_name(settings), "settings": settings, "sequences": _display_path(sequences_path, root),
            "sequences_sha256": sha256_file(sequences_path)}


def _calibration_note(path: Path, root: Path) -> str:
    """'N prompts from `file`' when the recipe's prompts file is at hand (the profile is what counts)."""
    if not Path(path).is_file():
        return "prompts file not at hand"
    from moeprune.userfile import read_text

    count = sum(1 for line in read_text(Path(path), "calibration prompts file", DropMapError).splitlines() if line.strip())
    return f"{count} prompts from `{_display_path(path, root)}`"


def _display_path(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)

