"""lm-eval tasks and their datasets, resolved and checked before any server starts.

A missing task, a gated dataset without a token, a missing data file or a wrong lm-eval version
ends here, before a model is loaded. Each eval also gets a private ``datasets`` cache
(:func:`private_datasets_cache`), without which a warm cache silently reuses another seed's order.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.eval.failure import EvalError
from moeprune.recipe import Recipe

# Hub datasets that need an accepted licence and a token.
GATED_HUB_DATASETS = {"Idavidrein/gpqa": "https://huggingface.co/datasets/Idavidrein/gpqa"}


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
