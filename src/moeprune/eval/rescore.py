"""Re-score every logged sample with its task's own filters and metric, as lm-eval applies them.

A sample log records, per (document, filter): the raw response (``resps``), what the filter
extracted (``filtered_resps``), the target and the score (``exact_match``). Recomputing the
aggregates from the logs (``results.recompute_results``) cannot see a log whose score was edited
consistently everywhere. Here each response goes again through the task's filter pipeline
(lm-eval's own ``build_filter_ensemble``: ``regex``, ``multi_choice_regex``, ``take_first``...),
the target is derived again from the document (``doc_to_target``), and the metric (lm-eval's
registered ``exact_match`` with the task's ``ignore_case`` / ``ignore_punctuation``) is computed
again; any disagreement names the model, task, document and filter.

The filters come from the task definition recorded by lm-eval (``lm_eval_results.json`` →
``configs``), checked against the definition installed here (lm-eval's task YAML, or the packaged
demo task) so that an edited config is caught too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

LM_EVAL_RESULTS_NAME = "lm_eval_results.json"
# Config keys that decide a sample's score; compared with the locally installed task definition.
SCORING_KEYS = ("filter_list", "metric_list", "doc_to_target", "doc_to_choice", "output_type")
_METRIC_CONFIG_KEYS = ("metric", "aggregation", "higher_is_better", "hf_evaluate")


class RescoreError(MoepruneError):
    """A sample log or task definition that cannot be re-scored."""


@dataclass
class RescoreReport:
    samples_checked: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_task_configs(model_dir: Path) -> dict[str, dict[str, Any]]:
    """{task: config} as lm-eval recorded them in ``<model_dir>/lm_eval_results.json``."""
    path = Path(model_dir) / LM_EVAL_RESULTS_NAME
    if not path.is_file():
        raise RescoreError(f"{path}: missing; it records the task definitions the samples were scored with")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RescoreError(f"{path}: not valid JSON ({exc})") from None
    configs = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(configs, dict) or not all(isinstance(c, dict) for c in configs.values()):
        raise RescoreError(f"{path}: no 'configs' object (task name -> task definition)")
    return configs


def reference_task_config(task: str) -> dict[str, Any] | None:
    """The task's definition as installed here (the packaged demo task, or lm-eval's YAML)."""
    from moeprune.demo import tasks as demo_tasks

    if task == demo_tasks.TASK_NAME:
        import yaml

        return yaml.safe_load((demo_tasks.TASK_DIR / demo_tasks.YAML_FILENAME).read_text(encoding="utf-8"))
    try:
        import lm_eval
        from lm_eval.tasks._yaml_loader import load_yaml

        tasks_root = Path(lm_eval.__file__).parent / "tasks"
        for path in sorted(tasks_root.rglob(f"{task}.yaml")):
            config = load_yaml(path, resolve_func=False)  # lm-eval's loader: includes merged
            if isinstance(config, dict) and config.get("task") == task:
                return dict(config)
    except Exception:  # noqa: BLE001 - no local definition: the recorded one is used, with a note
        return None
    return None


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def compare_with_reference(task: str, recorded: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """Scoring-relevant keys where the recorded task definition differs from the installed one."""
    problems = []
    for key in SCORING_KEYS:
        if key not in reference and key not in recorded:
            continue
        if key == "output_type" and key not in reference:
            continue
        if _normalise(recorded.get(key)) != _normalise(reference.get(key)):
            problems.append(
                f"task '{task}': the recorded {key} {recorded.get(key)!r} differs from the task's own "
                f"definition {reference.get(key)!r}"
            )
    return problems


def _target(config: dict[str, Any], doc: dict[str, Any]) -> Any:
    """``doc_to_target`` as lm-eval's ConfigurableTask applies it (field name or Jinja template)."""
    spec = config.get("doc_to_target")
    if isinstance(spec, int):
        return spec
    if not isinstance(spec, str):
        raise RescoreError(f"doc_to_target {spec!r} is not a field name or template; cannot re-derive targets")
    if spec in doc:
        return doc[spec]
    from lm_eval.utils import apply_template

    rendered = apply_template(spec, doc)
    return ast_literal(rendered)


def ast_literal(text: str) -> Any:
    import ast

    if text.isdigit():
        return int(text)
    try:
        return ast.literal_eval(text) if text[:1] in "[(" else text
    except (ValueError, SyntaxError):
        return text


def _filters(config: dict[str, Any]) -> dict[str, Any]:
    from lm_eval.filters import build_filter_ensemble

    ensembles = {}
    for entry in config.get("filter_list") or [{"name": "none", "filter": [{"function": "take_first"}]}]:
        components = [[step["function"], {k: v for k, v in step.items() if k != "function"}]
                      for step in entry["filter"]]
        ensembles[entry["name"]] = build_filter_ensemble(entry["name"], components)
    return ensembles


def _metrics(config: dict[str, Any]) -> dict[str, tuple[Any, dict[str, Any]]]:
    from lm_eval.api.registry import get_metric

    metrics = {}
    for entry in config.get("metric_list") or []:
        name = entry["metric"]
        kwargs = {k: v for k, v in entry.items() if k not in _METRIC_CONFIG_KEYS}
        metrics[name] = (get_metric(name), kwargs)
    return metrics


def _apply_filter(ensemble: Any, resps: list[Any], doc: dict[str, Any]) -> Any:
    return apply_filter_batch(ensemble, [resps], [doc])[0]


def apply_filter_batch(ensemble: Any, resps: list[list[Any]], docs: list[dict[str, Any]]) -> list[Any]:
    """Run a filter pipeline over many responses at once, as lm-eval does (some filters build
    large tables per call)."""
    out: Any = [list(r) for r in resps]
    for make in ensemble.filters:
        out = list(make().apply(out, docs))
    return out


def _score(metric_fn: Any, kwargs: dict[str, Any], name: str, gold: Any, result: Any) -> float:
    value = metric_fn(references=[gold], predictions=[result], **kwargs)
    if isinstance(value, dict):
        value = value[name]
    return float(value)


def rescore_records(
    records: list[dict[str, Any]], config: dict[str, Any], where: str
) -> tuple[int, list[str]]:
    """Re-score the records of one (model, task) log; return (records checked, problems)."""
    if config.get("output_type", "generate_until") != "generate_until":
        raise RescoreError(f"{where}: output type {config.get('output_type')!r} is not re-scored (generate_until only)")
    try:
        ensembles = _filters(config)
        metrics = _metrics(config)
    except (KeyError, TypeError, ValueError) as exc:
        raise RescoreError(f"{where}: the task's filter_list/metric_list cannot be built ({exc})") from None
    if not metrics:
        raise RescoreError(f"{where}: the task defines no metric_list; nothing to re-score against")
    problems: list[str] = []
    usable: list[tuple[dict[str, Any], str]] = []
    for record in records:
        filter_name = record.get("filter")
        name = f"{where} doc_id {record.get('doc_id')} ({filter_name})"
        doc, resps = record.get("doc"), record.get("resps")
        if not isinstance(doc, dict) or not isinstance(resps, list) or len(resps) != 1 \
                or not isinstance(resps[0], list):
            problems.append(f"{name}: the record has no document or no single response to re-score")
        elif filter_name not in ensembles:
            problems.append(f"{name}: filter '{filter_name}' is not one of the task's filters ({', '.join(ensembles)})")
        elif config.get("doc_to_choice") is not None:
            problems.append(f"{name}: doc_to_choice tasks are not re-scored")
        else:
            usable.append((record, name))
    filtered: dict[int, Any] = {}
    for filter_name, ensemble in ensembles.items():
        chosen = [(i, record) for i, (record, _) in enumerate(usable) if record["filter"] == filter_name]
        if not chosen:
            continue
        try:
            outs = apply_filter_batch(ensemble, [r["resps"][0] for _, r in chosen], [r["doc"] for _, r in chosen])
        except Exception as exc:  # noqa: BLE001 - records lm-eval's filters cannot take are a finding
            problems.append(f"{where} ({filter_name}): cannot re-apply the task's filters ({type(exc).__name__}: {exc})")
            continue
        filtered.update({i: out for (i, _), out in zip(chosen, outs)})
    checked = 0
    for i, (record, name) in enumerate(usable):
        if i not in filtered:
            continue
        result = filtered[i]
        try:
            gold = _target(config, record["doc"])
            if type(gold) is not type(result) and not isinstance(result, list):
                gold = type(result)(gold)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name}: cannot derive the target from the document ({type(exc).__name__}: {exc})")
            continue
        if _normalise(record.get("target")) != _normalise(gold):
            problems.append(f"{name}: target {record.get('target')!r}, but the document's answer is {gold!r}")
        stored_filtered = record.get("filtered_resps")
        if _normalise(stored_filtered) != _normalise([result]):
            problems.append(f"{name}: filtered_resps {stored_filtered!r}, the task's filter extracts {[result]!r} "
                            "from the response")
        for metric, (fn, kwargs) in metrics.items():
            ours = _score(fn, kwargs, metric, gold, result)
            theirs = record.get(metric)
            if not isinstance(theirs, (int, float)) or isinstance(theirs, bool) \
                    or not math.isclose(float(theirs), ours, abs_tol=1e-12):
                problems.append(f"{name}: {metric} = {theirs!r} in the log, re-scoring the response "
                                f"{result!r} against target {gold!r} gives {ours:g}")
        checked += 1
    return checked, problems


def rescore_eval_dir(eval_dir: Path) -> RescoreReport:
    """Re-score every sample of every model and task under ``eval_dir``."""
    from moeprune.eval.results import RUN_RECORD_NAME
    from moeprune.eval.samples import read_sample_log

    eval_dir = Path(eval_dir)
    report = RescoreReport()
    models = sorted(p.parent.name for p in eval_dir.glob(f"*/{RUN_RECORD_NAME}"))
    if not models:
        raise RescoreError(f"{eval_dir}: no completed model evaluation (no <model>/run.json)")
    references: dict[str, dict[str, Any] | None] = {}
    for model in models:
        run_path = eval_dir / model / RUN_RECORD_NAME
        try:
            run = json.loads(run_path.read_text(encoding="utf-8"))
            tasks = run["tasks"]
            logs = {task: entry["sample_log"] for task, entry in tasks.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RescoreError(f"{run_path}: unreadable run record ({type(exc).__name__}: {exc})") from None
        configs = load_task_configs(eval_dir / model)
        for task, log_name in sorted(logs.items()):
            where = f"{model}/{task}"
            config = configs.get(task)
            if config is None:
                report.problems.append(f"{model}/{LM_EVAL_RESULTS_NAME}: no task definition for '{task}'")
                continue
            if task not in references:
                references[task] = reference_task_config(task)
            reference = references[task]
            if reference is None and not any(task in note for note in report.notes):
                report.notes.append(f"task '{task}': no local definition; re-scored with the recorded filters")
            elif reference is not None:
                report.problems += [f"{model}/{LM_EVAL_RESULTS_NAME}: {p}"
                                    for p in compare_with_reference(task, config, reference)]
            records = read_sample_log(eval_dir / model / str(log_name))
            checked, problems = rescore_records(records, config, where)
            report.samples_checked += checked
            report.problems += problems
    return report
