"""Run lm-evaluation-harness against llama-server, for the base and the pruned GGUF.

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

import asyncio
import contextlib
import contextvars
import json
import math
import os
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ContextManager, Protocol

from moeprune.atomic import atomic_file, write_json
from moeprune.errors import MoepruneError
from moeprune.eval.results import RUN_RECORD_NAME, write_results
from moeprune.eval.samples import read_sample_log, sample_log_name, with_finish_reasons, write_sample_log
from moeprune.hashing import sha256_file
from moeprune.layout import RunLayout
from moeprune.recipe import Recipe

MODEL_TYPE = "local-chat-completions"
PARTIAL_LOG_NAME = "samples.partial.jsonl"
DATASETS_CACHE_NAME = "datasets_cache"
RESPONSES_LOG_NAME = "responses.jsonl"
LM_EVAL_RESULTS_NAME = "lm_eval_results.json"
VOLATILE_LM_EVAL_KEYS = ("samples", "date", "start_time", "end_time", "total_evaluation_time_seconds")
# Hub datasets that need an accepted licence and a token.
GATED_HUB_DATASETS = {"Idavidrein/gpqa": "https://huggingface.co/datasets/Idavidrein/gpqa"}


class EvalError(MoepruneError):
    """An evaluation that cannot start or did not complete."""


class ServedModel(Protocol):
    """What the evaluator needs from a running server (``moeprune.llamacpp.LlamaServer``)."""

    base_url: str
    flags: list[str]
    log_path: Path
    identity: dict[str, Any]
    """What the server proved about itself, stable across equal evaluations (recorded in run.json)."""

    def confirm_serving(self) -> None:
        """Raise MoepruneError unless the server started for this eval is still the one answering."""


ServerFactory = Callable[[str, Path, Path], ContextManager[ServedModel]]
"""(model label, gguf path, server log path) -> context manager yielding a running server."""


# --- pre-flight checks (before any server starts) ---------------------------------------------
def hub_token() -> str | None:
    """The Hugging Face token: HF_TOKEN, else huggingface_hub's stored login; None if neither."""
    from moeprune.hub import resolve_token

    return resolve_token()


def resolve_include_path(recipe: Recipe, work_dir: Path) -> Path | None:
    """The directory of local task YAMLs handed to lm-eval.

    ``datasets`` resolves a relative ``data_files`` against the working directory, not the
    YAML's folder; the packaged demo task is therefore rendered, with a copy of its data, into
    ``work_dir`` (a temporary directory outside the run) with an absolute data path
    (``moeprune.demo.tasks.render_task_dir``), so the eval works from any directory and the
    checkout's path appears nowhere. Other include paths are used as they are.
    """
    include = recipe.include_path
    if include is None:
        return None
    if not include.is_dir():
        raise EvalError(
            f"eval.include_path = {recipe.eval.include_path!r}: directory not found ({include}); "
            "point it at the directory of your task YAMLs"
        )
    from moeprune.demo import tasks as demo_tasks

    if include.resolve() == demo_tasks.TASKS_DIR.resolve():
        data_copy = Path(work_dir) / demo_tasks.TASK_NAME / demo_tasks.DATA_PATH.name
        data_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo_tasks.DATA_PATH, data_copy)
        return demo_tasks.render_task_dir(Path(work_dir), data_path=data_copy)
    return include


def make_task_manager(recipe: Recipe, include: Path | None) -> Any:
    """lm-eval TaskManager over its built-in tasks plus the local task directory ``include``."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        # Indexing lm-eval's thousands of built-in YAMLs takes seconds: skip it when the local
        # directory holds every task of the recipe.
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(task in local.task_index for task in recipe.eval.tasks):
            return local
    return TaskManager(include_path=str(include) if include else None)


def task_dataset_paths(task_manager: Any, tasks: list[str]) -> dict[str, str | None]:
    """{task: dataset_path} from the task index (no download); unknown task -> EvalError."""
    paths: dict[str, str | None] = {}
    for task in tasks:
        entry = task_manager.task_index.get(task)
        if entry is None:
            raise EvalError(
                f"eval.tasks: unknown lm-eval task '{task}'; check the name (`lm-eval ls tasks`) "
                "or eval.include_path for a local task YAML"
            )
        # lm-eval 0.4.13 indexes entries with a parsed ``cfg``; 0.4.11 (the seed's) with a dict.
        cfg = entry.get("cfg") if isinstance(entry, dict) else getattr(entry, "cfg", None)
        if cfg is None and isinstance(entry, dict) and hasattr(task_manager, "_get_config"):
            cfg = task_manager._get_config(task)
        paths[task] = (cfg or {}).get("dataset_path")
    return paths


def load_tasks(task_manager: Any, tasks: list[str]) -> dict[str, Any]:
    """{name: lm-eval Task} of ``tasks``: ``TaskManager.load`` (0.4.13) or ``get_task_dict`` (0.4.11)."""
    if hasattr(task_manager, "load"):
        return dict(task_manager.load(list(tasks))["tasks"])
    from lm_eval.tasks import get_task_dict

    return dict(get_task_dict(list(tasks), task_manager))


def check_hub_access(dataset_paths: dict[str, str | None], token: str | None) -> None:
    """Gated Hub datasets need a token; say how to provide one."""
    for task, dataset in dataset_paths.items():
        if dataset in GATED_HUB_DATASETS and not token:
            raise EvalError(
                f"task '{task}' reads the gated Hub dataset '{dataset}' and no Hugging Face token "
                f"was found. Accept the dataset's terms at {GATED_HUB_DATASETS[dataset]}, then "
                "either `export HF_TOKEN=hf_...` (a read token from "
                "https://huggingface.co/settings/tokens) or run `hf auth login` once "
                "(huggingface_hub stores the token), and rerun `invoke eval`"
            )


def check_lm_eval_version(recipe: Recipe) -> None:
    """``eval.lm_eval_version``, when set, must be the installed lm-eval (checked before any server)."""
    wanted = recipe.eval.lm_eval_version
    if wanted is None:
        return
    import lm_eval

    installed = getattr(lm_eval, "__version__", "?")
    if installed != wanted:
        raise EvalError(
            f"eval.lm_eval_version = {wanted!r} but lm-eval {installed} is installed; run "
            f"`pip install 'lm-eval[api]=={wanted}'` (it co-installs with moeprune's pinned stack, see "
            "docs/fidelity.md), or remove eval.lm_eval_version to evaluate with the installed version"
        )


def _seed_everything(seed: int) -> None:
    # Same order as lm_eval.simple_evaluate so a pre-flight load shuffles like the real one.
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)


@contextlib.contextmanager
def private_datasets_cache(directory: Path) -> Iterator[Path]:
    """Point ``datasets``' processed-data cache at an empty ``directory`` for the duration.

    gpqa shuffles each question's choices inside ``dataset.map`` with Python's ``random``;
    ``datasets`` caches the mapped table under a fingerprint that does not include the random
    state, so a warm shared cache silently returns the order of an earlier run with another
    seed. Each eval gets a cache of its own, removed afterwards (raw Hub downloads stay in the
    Hub cache; only the processed tables are rebuilt).
    """
    import datasets

    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    saved_config = datasets.config.HF_DATASETS_CACHE
    saved_env = os.environ.get("HF_DATASETS_CACHE")
    datasets.config.HF_DATASETS_CACHE = directory
    os.environ["HF_DATASETS_CACHE"] = str(directory)  # for anything that reads it late
    try:
        yield directory
    finally:
        datasets.config.HF_DATASETS_CACHE = saved_config
        if saved_env is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = saved_env
        shutil.rmtree(directory, ignore_errors=True)


def check_datasets(task_manager: Any, tasks: list[str], seed: int, limit: int | None) -> dict[str, int]:
    """Load every task once (datasets included) before a server starts; return doc counts.

    A missing local data file or an unreachable Hub dataset ends here with a clear error
    instead of after a model has been loaded.
    """
    _seed_everything(seed)
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="moeprune-datasets-") as tmp, private_datasets_cache(Path(tmp) / "cache"):
            counts = _doc_counts(load_tasks(task_manager, list(tasks)), limit)
    except EvalError:
        raise
    except Exception as exc:  # datasets raises many kinds; all mean "no data"
        raise EvalError(
            f"eval.tasks {tasks}: could not load the task dataset: {type(exc).__name__}: {exc}. "
            "For a local task check data_files in its YAML (paths are relative to the YAML's "
            "directory when rendered absolute); for a Hub task check the network and token"
        ) from None
    return counts


def _doc_counts(loaded: dict[str, Any], limit: int | None) -> dict[str, int]:
    counts = {}
    for name, task in loaded.items():
        docs = task.eval_docs
        count = len(docs) if limit is None else min(limit, len(docs))
        if count == 0:
            raise EvalError(f"task '{name}': its dataset has no evaluation documents")
        counts[name] = count
    return counts


# --- the recording chat-completions model -------------------------------------------------------
_RAW_OUTPUTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "moeprune_raw_outputs", default=None
)


class PartialLog:
    """Append-only JSONL of responses as they arrive (kept when a run fails)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()  # a crash must not lose what was already answered
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def _recording_model_class() -> type:
    """Subclass of lm-eval's LocalChatCompletion that logs each answered request.

    Built lazily so importing moeprune.eval does not import lm-eval.
    """
    from lm_eval.models.openai_completions import LocalChatCompletion

    class RecordingChatCompletion(LocalChatCompletion):
        def __init__(self, *, partial_log: PartialLog, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.partial_log = partial_log
            self._origin: dict[str, list[tuple[str, int]]] = {}

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            # Map each prompt to (task, doc_id) so the partial log says which question it was.
            for request in requests:
                prompt = request.args[0]
                key = getattr(prompt, "prompt", prompt)
                self._origin.setdefault(str(key), []).append((request.task_name, request.doc_id))
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

        def _record(self, messages: Any, outputs: Any) -> None:
            message = messages[0] if isinstance(messages, (list, tuple)) and messages else messages
            key = str(getattr(message, "prompt", message))
            origin = self._origin.get(key, [(None, None)])
            choices = outputs.get("choices") if isinstance(outputs, dict) else None
            choice = (choices or [{}])[0] or {}
            reply = choice.get("message") or {}
            content = reply.get("content")
            self.partial_log.write(
                {
                    "task": origin[0][0],
                    "doc_ids": [doc_id for _, doc_id in origin],
                    "prompt": key,
                    "response": content,
                    "reasoning_chars": len(reply.get("reasoning_content") or ""),
                    "finish_reason": choice.get("finish_reason"),
                    "completion_tokens": ((outputs.get("usage") if isinstance(outputs, dict) else None)
                                          or {}).get("completion_tokens"),
                }
            )

        def parse_generations(self, outputs: Any, **kwargs: Any) -> list[str]:
            slot = _RAW_OUTPUTS.get()
            if slot is not None:
                slot["outputs"] = outputs
            return super().parse_generations(outputs=outputs, **kwargs)

        async def amodel_call(self, session: Any, sem: Any, messages: Any, **kwargs: Any) -> Any:
            slot: dict[str, Any] = {}
            token = _RAW_OUTPUTS.set(slot)
            try:
                answers = await super().amodel_call(session, sem, messages, **kwargs)
            finally:
                _RAW_OUTPUTS.reset(token)
            self._record(messages, slot.get("outputs"))
            return answers

        def model_call(self, messages: Any, **kwargs: Any) -> Any:
            outputs = super().model_call(messages, **kwargs)
            if outputs is not None:
                self._record(messages, outputs)
            return outputs

    return RecordingChatCompletion


# --- settings, records ------------------------------------------------------------------------
def eval_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings every evaluated model shares (compared across models in results.json)."""
    section = recipe.eval
    return {
        "tasks": list(section.tasks),
        "seed": section.seed,
        "random_seed": seeds_of(recipe)["random_seed"],
        "max_gen_toks": section.max_gen_toks,
        "temperature": section.temperature,
        "num_concurrent": section.num_concurrent,
        "request_timeout_s": section.request_timeout_s,
        "max_retries": section.max_retries,
        "limit": section.limit,
        "apply_chat_template": True,
        "model_type": MODEL_TYPE,
        "include_path": recipe.settings()["eval"]["include_path"],
        "bootstrap_resamples": section.bootstrap_resamples,
        # Batched slots can change greedy outputs slightly: a pair evaluated differently is refused.
        "server_parallel": recipe.serve.parallel,
        "kv_unified": recipe.serve.parallel > 1 and recipe.serve.kv_unified,
    }


def seeds_of(recipe: Recipe) -> dict[str, int]:
    """Every seed lm-eval takes: ``eval.random_seed`` (default ``eval.seed``) for Python's
    ``random`` (gpqa's choice shuffling), ``eval.seed`` for numpy, torch and few-shot sampling."""
    seed = recipe.eval.seed
    return {
        "random_seed": seed if recipe.eval.random_seed is None else recipe.eval.random_seed,
        "numpy_random_seed": seed,
        "torch_random_seed": seed,
        "fewshot_random_seed": seed,
    }


def gguf_file_type(path: Path) -> str | None:
    """``general.file_type`` of a GGUF as llama.cpp's name (e.g. MOSTLY_Q4_K_M), None if unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.file_type")
        if field is None:
            return None
        value = int(field.contents())
        return gguf.LlamaFileType(value).name
    except Exception:  # provenance nicety: a header we cannot read is recorded as unknown
        return None


def run_relative(path: Path, layout: RunLayout) -> str:
    """``path`` relative to the run directory; its name alone when outside it (no machine's path
    in an artifact)."""
    try:
        return Path(path).resolve().relative_to(layout.root.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def gguf_record(path: Path, quant_type: str, layout: RunLayout) -> dict[str, Any]:
    """Path (relative to the run directory; the file name when outside it), sha256, size and quant type."""
    path = Path(path)
    return {
        "path": run_relative(path, layout),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "quant_type": quant_type,
        "file_type": gguf_file_type(path),
    }


def stable_paths(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` with every substring ``old`` of its strings replaced by ``new``."""
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {key: stable_paths(item, replacements) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable_paths(item, replacements) for item in value]
    return value


def stable_flags(flags: list[str], gguf_path: Path) -> list[str]:
    """Server flags as recorded: the port as ``<port>``, the identity nonce as ``<nonce>``, the
    model as its file name."""
    out = list(flags)
    for index, flag in enumerate(out[:-1]):
        if flag == "--port":
            out[index + 1] = "<port>"
        elif flag in ("--alias", "-a"):
            out[index + 1] = "<nonce>"
        elif flag in ("--model", "-m"):
            out[index + 1] = Path(out[index + 1]).name
    return out


def reported_scores(task_results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """lm-eval's ``results[task]`` ({"exact_match,flexible-extract": v, "..._stderr,...": s})
    -> {filter: {metric: {"value", "stderr"}}}; "N/A" stderr -> None."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue  # "alias" and friends
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            entry = scores.setdefault(filter_name, {}).setdefault(metric.removesuffix("_stderr"), {})
            entry["stderr"] = None if value == "N/A" else float(value)
        else:
            scores.setdefault(filter_name, {}).setdefault(metric, {})["value"] = float(value)
    return scores


# --- failure classification ---------------------------------------------------------------------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _server_exit_code(server: Any) -> int | None:
    """Exit code of the server process when it has exited, else None (alive or unknown)."""
    process = getattr(server, "process", None)
    wait = getattr(process, "wait", None)
    if not callable(wait):
        return None
    try:
        # A dropped connection often arrives a moment before the process is reaped.
        return wait(timeout=2.0)
    except subprocess.TimeoutExpired:
        return None


def classify_failure(exc: BaseException, server: Any, timeout_s: float, max_retries: int) -> str | None:
    """A user-facing reason for a failed eval, or None for an unexpected (internal) error."""
    import aiohttp
    import requests

    exit_code = _server_exit_code(server)
    if exit_code is not None:
        check_alive = getattr(server, "check_alive", None)
        if callable(check_alive):  # LlamaServer explains the death and quotes its log
            try:
                check_alive()
            except MoepruneError as err:
                return f"llama-server exited with code {exit_code} during the evaluation: {err}"
        return f"llama-server exited with code {exit_code} during the evaluation (see its log)"
    for item in _chain(exc):
        if isinstance(item, (TimeoutError, asyncio.TimeoutError, requests.Timeout, aiohttp.ServerTimeoutError)):
            return (
                f"a request timed out (eval.request_timeout_s = {timeout_s:g} s, tried "
                f"eval.max_retries = {max_retries} time(s)); raise the timeout, or lower "
                "eval.max_gen_toks / serve.reasoning_budget"
            )
        if isinstance(item, (aiohttp.ClientConnectionError, requests.ConnectionError)):
            return f"the connection to llama-server was lost ({type(item).__name__}: {item})"
        if isinstance(item, (aiohttp.ClientResponseError, requests.HTTPError)):
            return f"llama-server answered with an HTTP error ({item})"
    return None


# --- one model ----------------------------------------------------------------------------------
def _clear_model_dir(model_dir: Path) -> None:
    """Stale outputs of an earlier run go before a rerun (a half-old directory proves nothing)."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)


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
    # What differs between two runs of the same evaluation (the server's free port, where the
    # run directory is) is recorded as a placeholder, so equal evaluations give equal files.
    volatile = {server.base_url.rstrip("/").split("//", 1)[-1]: "127.0.0.1:<port>",
                **(path_placeholders or {}),
                str(model_dir.resolve().parent): "<eval_dir>"}
    model_args = {
        "model": model,
        "base_url": endpoint,
        # No tokenizer: nothing is downloaded, requests go as chat messages, the server's
        # chat template does the formatting.
        "tokenizer_backend": None,
        "tokenized_requests": False,
        "num_concurrent": section.num_concurrent,
        "max_retries": section.max_retries,
        "timeout": int(math.ceil(section.request_timeout_s)),
        "max_gen_toks": section.max_gen_toks,
        "seed": section.seed,
    }
    gen_kwargs = {"max_gen_toks": section.max_gen_toks, "temperature": section.temperature, "do_sample": False}
    partial = PartialLog(partial_path or model_dir / PARTIAL_LOG_NAME)
    try:
        lm = _recording_model_class()(partial_log=partial, **model_args)
        try:
            with private_datasets_cache(model_dir / DATASETS_CACHE_NAME):
                output = lm_eval.simple_evaluate(
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
                f"evaluation of '{model}' at {endpoint} did not complete: "
                f"{reason or f'{type(exc).__name__}: {exc}'}. {partial.count} response(s) received "
                f"so far are kept in {partial.path}; no results were written{where}"
            )
            if reason is None:
                raise EvalError(message) from exc  # unexpected: keep the traceback as the cause
            raise EvalError(message) from None
    finally:
        partial.close()
    if output is None or "samples" not in output:
        raise EvalError(f"lm-eval returned no per-sample records for '{model}' (log_samples was on)")

    tasks_record: dict[str, Any] = {}
    responses = read_sample_log(partial.path)
    for task in section.tasks:
        samples = output["samples"].get(task)
        if not samples:
            raise EvalError(f"lm-eval returned no samples for task '{task}' of '{model}'")
        log_path = model_dir / sample_log_name(task)
        written = write_sample_log(log_path, with_finish_reasons(samples, responses, task))
        if len(read_sample_log(log_path)) != written:
            raise EvalError(f"{log_path}: sample log does not read back whole")
        tasks_record[task] = {
            "task_version": output["versions"].get(task),
            "n_samples": output["n-samples"].get(task, {}),
            "reported": reported_scores(output["results"][task]),
            "sample_log": log_path.name,
        }
    # lm-eval's own aggregate (configs, versions, n-samples), kept as evidence next to the logs;
    # without its wall-clock fields, so equal evaluations give equal bytes.
    summary = {key: value for key, value in output.items() if key not in VOLATILE_LM_EVAL_KEYS}
    summary = stable_paths(summary, volatile)
    with atomic_file(model_dir / LM_EVAL_RESULTS_NAME) as handle:
        json.dump(summary, handle, indent=2, sort_keys=True, default=str)
    return {
        "model_args": stable_paths(dict(model_args), volatile),
        "gen_kwargs": gen_kwargs,
        "seeds": seeds,
        "tasks": tasks_record,
        "lm_eval_version": lm_eval.__version__,
        "partial_log": partial.path,
    }


# --- both models --------------------------------------------------------------------------------
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
    import tempfile

    with tempfile.TemporaryDirectory(prefix="moeprune-eval-tasks-") as tasks_tmp:
        return _run_eval(recipe, layout, Path(tasks_tmp), gguf_paths, server_factory, build_record, combine)


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


def _run_eval(
    recipe: Recipe,
    layout: RunLayout,
    tasks_tmp: Path,
    gguf_paths: dict[str, Path] | None,
    server_factory: ServerFactory | None,
    build_record: dict[str, Any] | None,
    combine: bool,
) -> dict[str, Any]:
    section = recipe.eval
    eval_dir = layout.eval_dir
    # 1. Everything that can be checked without a server, before one starts. Local task YAMLs
    # are rendered outside the run: the artifact must not carry this machine's paths.
    check_lm_eval_version(recipe)
    include = resolve_include_path(recipe, tasks_tmp)
    placeholders = {str(tasks_tmp.resolve()): "<tasks_dir>", str(tasks_tmp): "<tasks_dir>"}
    if include is not None:
        placeholders.setdefault(str(Path(include).resolve()), "<include_path>")
    task_manager = make_task_manager(recipe, include)
    dataset_paths = task_dataset_paths(task_manager, list(section.tasks))
    check_hub_access(dataset_paths, hub_token())
    paths = {m: Path(gguf_paths[m]) if gguf_paths and m in gguf_paths else served_gguf_path(recipe, layout, m)
             for m in section.models}
    for model, path in paths.items():
        if not path.is_file():
            raise EvalError(
                f"GGUF of '{model}' not found: {path}; run `invoke convert --which {model}` and "
                f"`invoke quantize --which {model}` first (quantize.eval_type = {recipe.quantize.eval_type!r})"
            )
    check_datasets(task_manager, list(section.tasks), seeds_of(recipe)["random_seed"], section.limit)

    # Each model is evaluated into a staging directory; eval/<model> and results.json are replaced
    # only when every model completed, so a failed eval leaves the previous good state in place.
    records: dict[str, Any] = {}
    if server_factory is None:
        server_factory, build_record = _llamacpp_server_factory(recipe)
    settings = eval_settings(recipe)
    staged: dict[str, Path] = {}
    try:
        for model in section.models:
            gguf = gguf_record(paths[model], recipe.quantize.eval_type, layout)
            log_path = layout.log_path(f"llama-server-{model}")
            log_path.parent.mkdir(parents=True, exist_ok=True)
            model_dir = _staging_dir(eval_dir, model)
            staged[model] = model_dir
            partial_path = partial_log_path(layout, model)
            with server_factory(model, paths[model], log_path) as server:
                outcome = evaluate_served_model(recipe, model, server, task_manager, model_dir,
                                                partial_path=partial_path, path_placeholders=placeholders)
                _confirm_served_by(server, model)
                flags = stable_flags([str(flag) for flag in server.flags], paths[model])
                identity = dict(server.identity)
            record = {
                "model": model,
                "recipe_name": recipe.name,
                "settings": settings,
                "gguf": gguf,
                "llamacpp_build": build_record or {},
                "server_flags": flags,
                "server": {**identity, "log": run_relative(log_path, layout)},
                "lm_eval": {
                    "version": outcome["lm_eval_version"],
                    "model_type": MODEL_TYPE,
                    "model_args": outcome["model_args"],
                    "gen_kwargs": outcome["gen_kwargs"],
                },
                "seeds": outcome["seeds"],
                "tasks": outcome["tasks"],
            }
            # The raw responses (with finish_reason and reasoning length, which lm-eval's sample
            # log drops) stay as evidence under their final name; run.json marks completion.
            Path(outcome["partial_log"]).replace(model_dir / RESPONSES_LOG_NAME)
            write_json(model_dir / RUN_RECORD_NAME, record)
            records[model] = record
        _commit_model_dirs(layout, staged)
    finally:
        for staging in staged.values():
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return write_results(eval_dir) if combine else records
