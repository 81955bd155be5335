"""Run lm-evaluation-harness against llama-server, for the base and the pruned GGUF.

This module holds the run of all models: checks before any server starts, one server per model,
staging and the final swap. Its parts live beside it: :mod:`~moeprune.eval.tasks` (tasks and
datasets), :mod:`~moeprune.eval.session` (one served model), :mod:`~moeprune.eval.recording` (the
recording model), :mod:`~moeprune.eval.records` (what run.json records), :mod:`~moeprune.eval.failure`.

Both models go through exactly the same settings: lm-eval's ``local-chat-completions`` model at
``<server>/v1/chat/completions`` with the chat template applied, the recipe's generation budget
(lm-eval's default of 256 tokens is far too small for chain of thought), temperature 0, seeds
pinned (gpqa shuffles its choices with Python's ``random``, seeded by ``random_seed``) and
recorded, per-sample logs written by us (lm-eval only *logs* a failure to save them).

Only the server this process started is scored: ``LlamaServer`` is "ready" only once it proved
its identity, and after each model's eval :meth:`ServedModel.confirm_serving` must find that same
server still running and answering, or nothing of that eval is written. ``run.json`` records what
the proven server said about itself (served file, type, build) and its log.

Failures a user can meet end with a :class:`EvalError` naming what to do: no Hub token for a
gated dataset (checked before any server starts), a missing dataset, a server that dies or a
request that times out mid-eval. In the last two cases the responses received so far stay in
``logs/eval-<model>.samples.partial.jsonl`` and ``eval/`` is left exactly as it was: each model is
evaluated into a staging directory, and ``eval/<model>`` and ``results.json`` are replaced only
when every model completed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.eval.failure import EvalError
from moeprune.eval.recording import PARTIAL_LOG_NAME
from moeprune.eval.records import MODEL_TYPE, eval_settings, gguf_record, run_relative, seeds_of, stable_flags
from moeprune.eval.results import RUN_RECORD_NAME, write_results
from moeprune.eval.session import ServedModel, evaluate_served_model
from moeprune.eval.tasks import (
    check_datasets,
    check_hub_access,
    check_lm_eval_version,
    hub_token,
    make_task_manager,
    resolve_include_path,
    task_dataset_paths,
)
from moeprune.layout import RunLayout
from moeprune.recipe import Recipe

RESPONSES_LOG_NAME = "responses.jsonl"

ServerFactory = Callable[[str, Path, Path], ContextManager[ServedModel]]
"""(model label, gguf path, server log path) -> context manager yielding a running server."""


def run_eval(
    recipe: Recipe,
    layout: RunLayout,
    *,
    gguf_paths: dict[str, Path] | None = None,
    server_factory: ServerFactory | None = None,
    build_record: dict[str, Any] | None = None,
    combine: bool = True,
) -> dict[str, Any]:
    """Evaluate the recipe's models (base, pruned) through the same lm-eval settings.

    With ``combine=False`` (the pipeline's one-model stages) results.json is left alone and the
    return value is ``{model: run record}`` of the models just evaluated.

    Writes ``eval/<model>/samples_<task>.jsonl``, ``eval/<model>/run.json`` and, once every
    model completed, ``eval/results.json`` (validated by schemas/results.schema.json); returns
    the results dict. ``gguf_paths``/``server_factory``/``build_record`` override the defaults
    (``gguf/<model>-<eval_type>.gguf`` served by ``moeprune.llamacpp.LlamaServer``).
    """
    with tempfile.TemporaryDirectory(prefix="moeprune-eval-tasks-") as tasks_tmp:
        task_manager, placeholders, paths = _preflight(recipe, layout, Path(tasks_tmp), gguf_paths)
        if server_factory is None:
            server_factory, build_record = _llamacpp_server_factory(recipe)
        records = _evaluate_staged(recipe, layout, task_manager, placeholders, paths, server_factory,
                                   build_record or {})
    return write_results(layout.eval_dir) if combine else records


def _preflight(recipe: Recipe, layout: RunLayout, tasks_tmp: Path,
               gguf_paths: dict[str, Path] | None) -> tuple[Any, dict[str, str], dict[str, Path]]:
    """Everything that can be checked without a server, before one starts: (task manager, path
    placeholders, {model: GGUF}). Local task YAMLs are rendered outside the run (``tasks_tmp``):
    the artifact must not carry this machine's paths."""
    section = recipe.eval
    check_lm_eval_version(recipe)
    include = resolve_include_path(recipe, tasks_tmp)
    placeholders = {str(tasks_tmp.resolve()): "<tasks_dir>", str(tasks_tmp): "<tasks_dir>"}
    if include is not None:
        placeholders.setdefault(str(Path(include).resolve()), "<include_path>")
    task_manager = make_task_manager(recipe, include)
    check_hub_access(task_dataset_paths(task_manager, list(section.tasks)), hub_token())
    paths = {m: Path(gguf_paths[m]) if gguf_paths and m in gguf_paths else served_gguf_path(recipe, layout, m)
             for m in section.models}
    for model, path in paths.items():
        if not path.is_file():
            raise EvalError(
                f"GGUF of '{model}' not found: {path}; run `invoke convert --which {model}` and "
                f"`invoke quantize --which {model}` first (quantize.eval_type = {recipe.quantize.eval_type!r})"
            )
    check_datasets(task_manager, list(section.tasks), seeds_of(recipe)["random_seed"], section.limit)
    return task_manager, placeholders, paths


def _evaluate_staged(recipe: Recipe, layout: RunLayout, task_manager: Any, placeholders: dict[str, str],
                     paths: dict[str, Path], server_factory: ServerFactory,
                     build_record: dict[str, Any]) -> dict[str, Any]:
    """Each model is evaluated into a staging directory; ``eval/<model>`` is replaced only when every
    model completed, so a failed eval leaves the previous good state in place."""
    records: dict[str, Any] = {}
    staged: dict[str, Path] = {}
    try:
        for model in recipe.eval.models:
            staged[model] = _staging_dir(layout.eval_dir, model)
            records[model] = _evaluate_model(recipe, layout, model, paths[model], staged[model], task_manager,
                                             placeholders, server_factory, build_record)
        _commit_model_dirs(layout, staged)
    finally:
        for staging in staged.values():
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return records


def _evaluate_model(recipe: Recipe, layout: RunLayout, model: str, gguf_path: Path, model_dir: Path,
                    task_manager: Any, placeholders: dict[str, str], server_factory: ServerFactory,
                    build_record: dict[str, Any]) -> dict[str, Any]:
    """Serve one model, evaluate it, prove the same server answered throughout; write its run.json."""
    from moeprune.llamacpp.rpc import topology

    gguf = gguf_record(gguf_path, recipe.quantize.eval_type, layout)
    served_on = topology(recipe.serve.rpc, build_record)  # asked before the server connects: it serves one client
    log_path = layout.log_path(f"llama-server-{model}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with server_factory(model, gguf_path, log_path) as server:
        outcome = evaluate_served_model(recipe, model, server, task_manager, model_dir,
                                        partial_path=partial_log_path(layout, model), path_placeholders=placeholders)
        _confirm_served_by(server, model)
        flags = stable_flags([str(flag) for flag in server.flags], gguf_path)
        identity = dict(server.identity)
    record = {
        "model": model,
        "recipe_name": recipe.name,
        "settings": eval_settings(recipe),
        "gguf": gguf,
        "llamacpp_build": build_record,
        "server_flags": flags,
        "server": {**identity, "log": run_relative(log_path, layout)},
        "topology": served_on,
        "lm_eval": {
            "version": outcome["lm_eval_version"],
            "model_type": MODEL_TYPE,
            "model_args": outcome["model_args"],
            "gen_kwargs": outcome["gen_kwargs"],
        },
        "seeds": outcome["seeds"],
        "tasks": outcome["tasks"],
    }
    # The raw responses (with finish_reason and reasoning length, which lm-eval's sample log
    # drops) stay as evidence under their final name; run.json marks completion.
    Path(outcome["partial_log"]).replace(model_dir / RESPONSES_LOG_NAME)
    write_json(model_dir / RUN_RECORD_NAME, record)
    return record


def served_gguf_path(recipe: Recipe, layout: RunLayout, model: str) -> Path:
    """The quantized GGUF served for ``model`` ("base" or "pruned"), as the gguf stage names it."""
    from moeprune.llamacpp.stages import gguf_path

    return gguf_path(recipe, model, recipe.quantize.eval_type, layout)  # type: ignore[arg-type]


def _llamacpp_server_factory(recipe: Recipe) -> tuple[ServerFactory, dict[str, Any]]:
    from moeprune.llamacpp import LlamaServer, ensure_llamacpp

    build = ensure_llamacpp(recipe.llamacpp)

    def factory(model: str, gguf_path: Path, log_path: Path) -> ContextManager[ServedModel]:
        return LlamaServer(build, gguf_path, recipe.serve, log_path)

    return factory, dict(build.record)


def _confirm_served_by(server: ServedModel, model: str) -> None:
    """Every answer of this eval must have come from the server started for it: still running,
    still holding its port, still proving its identity. Otherwise the eval is void."""
    try:
        server.confirm_serving()
    except MoepruneError as exc:
        raise EvalError(f"evaluation of '{model}' is void, no results were written: {exc}") from None


def partial_log_path(layout: RunLayout, model: str) -> Path:
    """Where the responses of an evaluation in progress are appended (kept when it fails)."""
    return layout.logs_dir / f"eval-{model}.{PARTIAL_LOG_NAME}"


def _staging_dir(eval_dir: Path, model: str) -> Path:
    return eval_dir / f".{model}.tmp-{os.getpid()}"


def _commit_model_dirs(layout: RunLayout, staged: dict[str, Path]) -> None:
    """Replace each ``eval/<model>`` with its finished staging directory."""
    from moeprune.atomic import replace_dir

    for model, staging in staged.items():
        replace_dir(staging, layout.eval_model_dir(model))
