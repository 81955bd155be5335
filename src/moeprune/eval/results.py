"""``eval/results.json``: assembled from per-model run records and per-sample logs.

Layout of ``runs/<name>/eval/``::

    <model>/run.json               provenance of one model's evaluation (written by run.py):
                                   served GGUF (path, sha256, quant type), llama.cpp build
                                   record, server flags, the server's proven identity and
                                   its log (``server``), lm-eval version, task versions,
                                   seeds, settings, and the scores lm-eval reported
    <model>/samples_<task>.jsonl   lm-eval's per-sample records (our atomic writer)
    <model>/responses.jsonl        raw server replies as they arrived (finish_reason, reasoning
                                   length); while a run is in flight or after it failed:
                                   samples.partial.jsonl
    <model>/lm_eval_results.json   lm-eval's own aggregate output (configs, versions)
    results.json                   this module's output, schemas/results.schema.json

Every number in results.json is computed here from the sample logs (:func:`recompute_results`),
so an auditor holding the eval directory gets the same file back; the scores lm-eval itself
reported are checked against the recomputation before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.eval.analysis import PRIMARY_FILTER, PRIMARY_METRIC, error_analysis
from moeprune.eval.samples import (
    filters_in,
    metric_names,
    read_sample_log,
    records_for_filter,
)
from moeprune.eval.stats import (
    accuracy,
    accuracy_stderr,
    agreement_table,
    mcnemar_exact_p,
    paired_bootstrap_ci,
)
from moeprune.hashing import sha256_file
from moeprune.schemas import validate

RESULTS_FORMAT_VERSION = 1
RUN_RECORD_NAME = "run.json"
RESULTS_NAME = "results.json"
MODEL_ORDER = ("base", "pruned")


class ResultsError(MoepruneError):
    """Eval outputs that are incomplete or inconsistent."""


def read_run_record(model_dir: Path) -> dict[str, Any]:
    """Read ``<eval_dir>/<model>/run.json`` (written only after a model's eval completed)."""
    path = Path(model_dir) / RUN_RECORD_NAME
    if not path.is_file():
        raise ResultsError(
            f"{path}: not found; the evaluation of '{Path(model_dir).name}' did not complete "
            "(rerun `invoke eval`)"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not valid JSON: {exc}") from None


def task_scores(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{filter: {metric: {"value", "stderr", "n"}}} recomputed as lm-eval aggregates them."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for filter_name in filters_in(records):
        chosen = records_for_filter(records, filter_name)
        per_metric = {}
        for metric in metric_names(chosen):
            values = [float(r[metric]) for r in chosen]
            per_metric[metric] = {
                "value": accuracy(values),
                "stderr": accuracy_stderr(values),
                "n": len(values),
            }
        scores[filter_name] = per_metric
    return scores


def presented_choices(record: dict[str, Any]) -> tuple[str, list[Any]]:
    """(source, the choices in the order the question presented them) of one sample record.

    gpqa's docs carry the shuffled choices as ``choice1``..``choiceN``; other multiple-choice
    docs a ``choices`` list; otherwise the rendered prompt stands for the order.
    """
    doc = record.get("doc") or {}
    numbered = sorted((int(m[1]), key) for key in doc if (m := re.fullmatch(r"choice(\d+)", key)))
    if numbered:
        return "doc.choiceN", [doc[key] for _, key in numbered] + [record.get("target")]
    if isinstance(doc.get("choices"), list):
        return "doc.choices", list(doc["choices"]) + [record.get("target")]
    return "prompt", [record.get("arguments"), record.get("target")]


def choice_order(records: list[dict[str, Any]], filter_name: str) -> dict[str, Any]:
    """A fingerprint of every question's presented choice order (and target), plus one of all.

    Two evaluations asked the same questions in the same order exactly when these agree; a
    different Python seed (or a stale datasets cache) shows up as differing questions.
    """
    per_question: dict[str, str] = {}
    sources = set()
    for record in records_for_filter(records, filter_name):
        source, choices = presented_choices(record)
        sources.add(source)
        encoded = json.dumps(choices, ensure_ascii=False, sort_keys=True, default=str).encode("utf-8")
        per_question[str(record["doc_id"])] = hashlib.sha256(encoded).hexdigest()[:16]
    overall = hashlib.sha256(json.dumps(per_question, sort_keys=True).encode()).hexdigest()
    return {"source": "+".join(sorted(sources)), "sha256": overall, "per_question": per_question}


def primary_filter(records: list[dict[str, Any]]) -> str:
    """flexible-extract when present (the card's headline), else the log's first filter."""
    names = filters_in(records)
    return PRIMARY_FILTER if PRIMARY_FILTER in names else names[0]


def _correct_by_doc(records: list[dict[str, Any]], filter_name: str, metric: str) -> dict[int, dict[str, Any]]:
    return {r["doc_id"]: r for r in records_for_filter(records, filter_name) if metric in r}


def paired_comparison(
    records_a: list[dict[str, Any]],
    records_b: list[dict[str, Any]],
    *,
    filter_name: str,
    metric: str,
    resamples: int,
    seed: int,
    labels: tuple[str, str] = MODEL_ORDER,
) -> dict[str, Any]:
    """Paired comparison of model B against model A on the same questions.

    Questions are matched by ``doc_id``; the two logs must hold the same questions with the same
    document and target hashes (else the models were not asked the same thing: with
    gpqa's seeded choice shuffling, a different seed changes the letters).
    """
    by_a = _correct_by_doc(records_a, filter_name, metric)
    by_b = _correct_by_doc(records_b, filter_name, metric)
    if set(by_a) != set(by_b):
        only_a = sorted(set(by_a) - set(by_b))[:5]
        only_b = sorted(set(by_b) - set(by_a))[:5]
        raise ResultsError(
            f"paired comparison: the logs hold different questions ({labels[0]} only: {only_a}, "
            f"{labels[1]} only: {only_b}); evaluate both models with the same settings"
        )
    doc_ids = sorted(by_a)
    for doc_id in doc_ids:
        for key in ("doc_hash", "prompt_hash", "target_hash"):
            if by_a[doc_id].get(key) != by_b[doc_id].get(key):
                raise ResultsError(
                    f"paired comparison: doc_id {doc_id} differs between {labels[0]} and "
                    f"{labels[1]} ({key}); were both evaluated with the same seed and dataset?"
                )
    correct_a = [float(by_a[d][metric]) for d in doc_ids]
    correct_b = [float(by_b[d][metric]) for d in doc_ids]
    table = agreement_table(correct_a, correct_b)
    interval = paired_bootstrap_ci(correct_a, correct_b, resamples=resamples, seed=seed)
    return {
        "models": list(labels),
        "filter": filter_name,
        "metric": metric,
        "n": table.n,
        "accuracy": {labels[0]: accuracy(correct_a), labels[1]: accuracy(correct_b)},
        "difference": accuracy(correct_b) - accuracy(correct_a),
        "table": {
            "both_correct": table.both_correct,
            f"{labels[0]}_only_correct": table.a_only,
            f"{labels[1]}_only_correct": table.b_only,
            "both_wrong": table.both_wrong,
        },
        "mcnemar": {"discordant": table.discordant, "p_value": mcnemar_exact_p(table.a_only, table.b_only),
                    "test": "exact two-sided binomial on discordant pairs"},
        "bootstrap": {
            "low": interval.low,
            "high": interval.high,
            "confidence": interval.confidence,
            "resamples": interval.resamples,
            "seed": interval.seed,
            "method": "paired percentile bootstrap over questions, numpy PCG64",
        },
    }


def _models_in(eval_dir: Path) -> list[str]:
    present = [m for m in MODEL_ORDER if (eval_dir / m / RUN_RECORD_NAME).is_file()]
    extra = sorted(
        p.name for p in eval_dir.iterdir()
        if p.is_dir() and p.name not in MODEL_ORDER and (p / RUN_RECORD_NAME).is_file()
    ) if eval_dir.is_dir() else []
    return present + extra


def _check_reported(model: str, task: str, reported: dict[str, Any], scores: dict[str, Any], log: Path) -> None:
    """lm-eval's own aggregate must equal the recomputation from its sample log, exactly."""
    for filter_name, metrics in reported.items():
        for metric, entry in metrics.items():
            ours = scores.get(filter_name, {}).get(metric)
            if ours is None or ours["value"] != entry["value"] or ours["stderr"] != entry["stderr"]:
                raise ResultsError(
                    f"{log}: {model}/{task} {metric},{filter_name}: lm-eval reported {entry}, the "
                    f"sample log gives {ours}; the log is not the one lm-eval scored"
                )


def recompute_results(eval_dir: Path) -> dict[str, Any]:
    """Recompute every number of results.json from ``eval_dir``'s run records and sample logs.

    Returns the results dict (validated against schemas/results.schema.json); writes nothing.
    The verify stage compares it with the published results.json.
    """
    eval_dir = Path(eval_dir)
    models = _models_in(eval_dir)
    if not models:
        raise ResultsError(f"{eval_dir}: no completed model evaluation (no <model>/run.json); run `invoke eval`")
    runs = {m: read_run_record(eval_dir / m) for m in models}
    settings = runs[models[0]]["settings"]
    for model in models[1:]:
        if runs[model]["settings"] != settings:
            raise ResultsError(
                f"{eval_dir}: '{model}' was evaluated with different settings than '{models[0]}' "
                "(see settings in their run.json); rerun `invoke eval` so both share them"
            )

    records: dict[str, dict[str, list[dict[str, Any]]]] = {}
    out_models: dict[str, Any] = {}
    for model in models:
        run = runs[model]
        tasks_out = {}
        records[model] = {}
        for task, task_run in run["tasks"].items():
            log_path = eval_dir / model / task_run["sample_log"]
            task_records = read_sample_log(log_path)
            records[model][task] = task_records
            scores = task_scores(task_records)
            _check_reported(model, task, task_run["reported"], scores, log_path)
            chosen_filter = primary_filter(task_records)
            n_samples = len(records_for_filter(task_records, chosen_filter))
            tasks_out[task] = {
                "task_version": task_run["task_version"],
                "n_samples": n_samples,
                "scores": scores,
                "sample_log": {
                    "path": f"{model}/{task_run['sample_log']}",
                    "sha256": sha256_file(log_path),
                },
                "error_analysis": error_analysis(
                    task_records, filter_name=chosen_filter, metric=_primary_metric(task_records)
                ),
                "choice_order": choice_order(task_records, chosen_filter),
            }
        out_models[model] = {
            "gguf": run["gguf"],
            "llamacpp_build": run["llamacpp_build"],
            "server_flags": run["server_flags"],
            # Where it ran (serve.rpc workers); run records older than it have none.
            **({"topology": run["topology"]} if "topology" in run else {}),
            "lm_eval": run["lm_eval"],
            "seeds": run["seeds"],
            "tasks": tasks_out,
        }

    comparisons: dict[str, Any] = {}
    if "base" in records and "pruned" in records:
        for task in sorted(set(records["base"]) & set(records["pruned"])):
            base_records = records["base"][task]
            comparisons[task] = paired_comparison(
                base_records,
                records["pruned"][task],
                filter_name=primary_filter(base_records),
                metric=_primary_metric(base_records),
                resamples=settings["bootstrap_resamples"],
                seed=settings["seed"],
            )

    results = {
        "format_version": RESULTS_FORMAT_VERSION,
        "recipe_name": runs[models[0]]["recipe_name"],
        "settings": settings,
        "models": out_models,
        "comparisons": comparisons,
    }
    validate("results", results, source=eval_dir / RESULTS_NAME)
    return results


def _primary_metric(records: list[dict[str, Any]]) -> str:
    names = metric_names(records)
    if PRIMARY_METRIC in names:
        return PRIMARY_METRIC
    if not names:
        raise ResultsError("sample log names no metric (lm-eval 'metrics' field missing)")
    return names[0]


def write_results(eval_dir: Path) -> dict[str, Any]:
    """Recompute results from ``eval_dir`` and write ``results.json`` atomically."""
    results = recompute_results(eval_dir)
    write_json(Path(eval_dir) / RESULTS_NAME, results)
    return results


def check_results(eval_dir: Path) -> list[str]:
    """Differences between ``eval_dir/results.json`` and a recomputation ('' list when equal).

    Each difference is a line ``path: stored != recomputed``.
    """
    eval_dir = Path(eval_dir)
    path = eval_dir / RESULTS_NAME
    if not path.is_file():
        raise ResultsError(f"{path}: not found; the evaluation is not complete (run `invoke eval`)")
    stored = json.loads(path.read_text(encoding="utf-8"))
    recomputed = json.loads(json.dumps(recompute_results(eval_dir)))  # same JSON round trip
    return _diff(stored, recomputed, "")


def _diff(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            sub = f"{where}/{key}"
            if key not in a or key not in b:
                out.append(f"{sub}: {'missing in stored' if key not in a else 'missing in recomputed'}")
            else:
                out.extend(_diff(a[key], b[key], sub))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [line for i, (x, y) in enumerate(zip(a, b)) for line in _diff(x, y, f"{where}/{i}")]
    return [] if a == b else [f"{where or '/'}: {a!r} != {b!r}"]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines of a results dict (every figure taken from it)."""
    lines = []
    for model, entry in results["models"].items():
        for task, task_entry in entry["tasks"].items():
            parts = []
            # The headline filter (flexible-extract) first, the rest by name.
            ordered = sorted(task_entry["scores"].items(), key=lambda item: (item[0] != PRIMARY_FILTER, item[0]))
            for filter_name, metrics in ordered:
                for metric, score in metrics.items():
                    stderr = score["stderr"]
                    shown = f"{100 * score['value']:.2f}%" + (f" ± {100 * stderr:.2f}%" if stderr is not None else "")
                    parts.append(f"{metric},{filter_name} {shown}")
            errors = task_entry["error_analysis"]
            canary = errors["canary"]
            truncated = "not recorded" if canary["truncated"] is None else canary["truncated"]
            lines.append(
                f"{model} {task} (n={task_entry['n_samples']}): " + "; ".join(parts)
                + f" | correct {errors['correct']}, wrong {errors['wrong']}, invalid {errors['invalid']}"
                + f" | hit the budget {truncated}, looping {canary['looping']}, empty {canary['empty']}"
            )
    for task, comparison in results["comparisons"].items():
        first, second = comparison["models"]
        boot = comparison["bootstrap"]
        lines.append(
            f"{task}: {second} - {first} = {100 * comparison['difference']:+.2f} pp "
            f"(paired bootstrap {100 * boot['confidence']:.0f}% CI {100 * boot['low']:+.2f} .. "
            f"{100 * boot['high']:+.2f} pp, {boot['resamples']} resamples); McNemar exact p = "
            f"{comparison['mcnemar']['p_value']:.4g} on {comparison['mcnemar']['discordant']} discordant "
            f"of {comparison['n']} questions"
        )
    return lines


def analyse_sample_logs(directory: Path, task: str) -> dict[str, Any]:
    """Scores and error analysis of any lm-eval output directory for ``task``.

    Reads ``samples_<task>.jsonl`` (ours) or lm-eval's ``samples_<task>_<timestamp>.jsonl`` (e.g.
    a published card's ``gpqa_results/``); several timestamped files are an error (which run?).
    """
    from moeprune.eval.samples import find_sample_logs

    logs = find_sample_logs(Path(directory), task)
    if not logs:
        raise ResultsError(f"{directory}: no samples_{task}*.jsonl sample log found")
    if len(logs) > 1:
        raise ResultsError(
            f"{directory}: {len(logs)} sample logs for '{task}' ({', '.join(p.name for p in logs)}); "
            "keep only the run you mean"
        )
    records = read_sample_log(logs[0])
    return {
        "sample_log": {"path": str(logs[0]), "sha256": sha256_file(logs[0])},
        "scores": task_scores(records),
        "error_analysis": error_analysis(records, filter_name=primary_filter(records),
                                         metric=_primary_metric(records)),
    }
