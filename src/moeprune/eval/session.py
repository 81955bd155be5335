"""One served model through lm-eval: the request settings, the harness run, the files it leaves.

:func:`evaluate_served_model` asks a running server every question of the recipe's tasks through
the recording chat-completions model (:mod:`moeprune.eval.recording`), then writes the model's
per-task sample logs (with each answer's ``finish_reason``) and lm-eval's own summary. What
differs between two runs of the same evaluation (the server's free port, where the run
directory is) is written as a placeholder, so equal evaluations give equal files.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Protocol

from moeprune.atomic import atomic_file
from moeprune.eval.failure import EvalError, classify_failure
from moeprune.eval.recording import PARTIAL_LOG_NAME, PartialLog, recording_model_class
from moeprune.eval.records import reported_scores, seeds_of, stable_paths
from moeprune.eval.rescore import LM_EVAL_RESULTS_NAME
from moeprune.eval.samples import read_sample_log, sample_log_name, with_finish_reasons, write_sample_log
from moeprune.eval.tasks import private_datasets_cache
from moeprune.recipe import EvalSection, Recipe

DATASETS_CACHE_NAME = "datasets_cache"
VOLATILE_LM_EVAL_KEYS = ("samples", "date", "start_time", "end_time", "total_evaluation_time_seconds")


class ServedModel(Protocol):
    """What the evaluator needs from a running server (``moeprune.llamacpp.LlamaServer``)."""

    base_url: str
    flags: list[str]
    log_path: Path
    identity: dict[str, Any]
    """What the server proved about itself, stable across equal evaluations (recorded in run.json)."""

    def confirm_serving(self) -> None:
        """Raise MoepruneError unless the server started for this eval is still the one answering."""


def evaluate_served_model(
    recipe: Recipe,
    model: str,
    server: ServedModel,
    task_manager: Any,
    model_dir: Path,
    partial_path: Path | None = None,
    path_placeholders: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Evaluate one served model with lm-eval; write its sample logs and lm-eval's summary.

    Returns what the model's ``run.json`` records (model args, seeds, per-task versions and the
    scores lm-eval reported). On failure raises EvalError and leaves the partial response log
    (``partial_path``, default ``model_dir/samples.partial.jsonl``). ``path_placeholders``
    ({local path: placeholder}) keep machine-specific paths out of what is written.
    """
    import lm_eval

    _clear_model_dir(model_dir)
    section = recipe.eval
    seeds = seeds_of(recipe)
    endpoint = f"{server.base_url.rstrip('/')}/v1/chat/completions"
    volatile = {server.base_url.rstrip("/").split("//", 1)[-1]: "127.0.0.1:<port>",
                **(path_placeholders or {}),
                str(model_dir.resolve().parent): "<eval_dir>"}
    model_args = request_settings(section, model, endpoint)
    gen_kwargs = {"max_gen_toks": section.max_gen_toks, "temperature": section.temperature, "do_sample": False}
    partial = PartialLog(partial_path or model_dir / PARTIAL_LOG_NAME)
    try:
        output = _simple_evaluate(section, model, server, task_manager, model_dir, partial, model_args,
                                  gen_kwargs, seeds)
    finally:
        partial.close()
    if output is None or "samples" not in output:
        raise EvalError(f"lm-eval returned no per-sample records for '{model}' (log_samples was on)")
    tasks_record = write_task_logs(model_dir, model, section.tasks, output, read_sample_log(partial.path))
    write_lm_eval_summary(model_dir / LM_EVAL_RESULTS_NAME, output, volatile)
    return {
        "model_args": stable_paths(dict(model_args), volatile),
        "gen_kwargs": gen_kwargs,
        "seeds": seeds,
        "tasks": tasks_record,
        "lm_eval_version": lm_eval.__version__,
        "partial_log": partial.path,
    }


def request_settings(section: EvalSection, model: str, endpoint: str) -> dict[str, Any]:
    """lm-eval's ``model_args`` of the chat-completions model: no tokenizer (nothing is
    downloaded, requests go as chat messages, the server's chat template does the formatting)."""
    return {
        "model": model,
        "base_url": endpoint,
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "num_concurrent": section.num_concurrent,
        "max_retries": section.max_retries,
        "timeout": int(math.ceil(section.request_timeout_s)),
        "max_gen_toks": section.max_gen_toks,
        "seed": section.seed,
    }


def _simple_evaluate(section: EvalSection, model: str, server: ServedModel, task_manager: Any, model_dir: Path,
                     partial: PartialLog, model_args: dict[str, Any], gen_kwargs: dict[str, Any],
                     seeds: dict[str, int]) -> dict[str, Any] | None:
    """lm-eval's ``simple_evaluate`` over the recording model; a failure becomes one EvalError that
    says why (server died, timeout, lost connection) and where the answers received so far are."""
    import lm_eval

    lm = recording_model_class()(partial_log=partial, **model_args)
    try:
        with private_datasets_cache(model_dir / DATASETS_CACHE_NAME):
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=list(section.tasks),
                task_manager=task_manager,
                apply_chat_template=True,
                gen_kwargs=dict(gen_kwargs),
                log_samples=True,
                limit=section.limit,
                **seeds,
            )
    except Exception as exc:
        reason = classify_failure(exc, server, section.request_timeout_s, section.max_retries)
        log_hint = getattr(server, "log_path", None)
        where = f"; server log: {log_hint}" if log_hint else ""
        message = (
            f"evaluation of '{model}' at {model_args['base_url']} did not complete: "
            f"{reason or f'{type(exc).__name__}: {exc}'}. {partial.count} response(s) received "
            f"so far are kept in {partial.path}; no results were written{where}"
        )
        if reason is None:
            raise EvalError(message) from exc  # unexpected: keep the traceback as the cause
        raise EvalError(message) from None


def write_task_logs(model_dir: Path, model: str, tasks: list[str], output: dict[str, Any],
                    responses: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``samples_<task>.jsonl`` per task (lm-eval's samples with each answer's finish_reason
    from ``responses``), read each back whole; return the per-task part of run.json."""
    record: dict[str, Any] = {}
    for task in tasks:
        samples = output["samples"].get(task)
        if not samples:
            raise EvalError(f"lm-eval returned no samples for task '{task}' of '{model}'")
        log_path = model_dir / sample_log_name(task)
        written = write_sample_log(log_path, with_finish_reasons(samples, responses, task))
        if len(read_sample_log(log_path)) != written:
            raise EvalError(f"{log_path}: sample log does not read back whole")
        record[task] = {
            "task_version": output["versions"].get(task),
            "n_samples": output["n-samples"].get(task, {}),
            "reported": reported_scores(output["results"][task]),
            "sample_log": log_path.name,
        }
    return record


def write_lm_eval_summary(path: Path, output: dict[str, Any], volatile: dict[str, str]) -> None:
    """lm-eval's own aggregate (configs, versions, n-samples), kept as evidence next to the logs;
    without its wall-clock fields, so equal evaluations give equal bytes."""
    summary = {key: value for key, value in output.items() if key not in VOLATILE_LM_EVAL_KEYS}
    with atomic_file(path) as handle:
        json.dump(stable_paths(summary, volatile), handle, indent=2, sort_keys=True, default=str)


def _clear_model_dir(model_dir: Path) -> None:
    """Stale outputs of an earlier run go before a rerun (a half-old directory proves nothing)."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
