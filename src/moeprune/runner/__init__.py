"""Where stages run: here (``native``) or in the pinned image (``docker``).

Public interface:

- ``get_runner(kind, recipe, image=None) -> Runner``: ``kind`` is "native", "docker" or None
  (the recipe's ``[runner] kind``). Inside the image it is always native.
- ``runner.run_stage(argv, mounts=(), env=None, log_path=None, stream=print) -> RunnerResult``:
  ``argv`` is the ``invoke`` command line after ``invoke``, e.g.
  ``stage_argv("prune", recipe)`` = ``["prune", "--recipe", "/abs/recipes/demo.toml"]``.
- ``runner.describe() -> dict``: what the manifest records (docker: image id, repo digests).
- ``recipe_mounts(recipe) -> list[Mount]``: the host paths a stage of ``recipe`` needs.
"""

from __future__ import annotations

import os
from pathlib import Path

from moeprune.layout import runs_root
from moeprune.recipe import Recipe
from moeprune.runner.base import Mount, Runner, RunnerResult, redact, secret_values
from moeprune.runner.docker_runner import DockerRunner, gpu_present
from moeprune.runner.errors import (
    ContainerKilledError,
    DockerUnavailableError,
    ImageBuildError,
    ImageNotFoundError,
    RunnerError,
    StageFailedError,
)
from moeprune.runner.native import NativeRunner

RUNNER_KINDS = ("native", "docker")
IN_CONTAINER_ENV = "MOEPRUNE_IN_CONTAINER"

__all__ = [
    "RUNNER_KINDS", "ContainerKilledError", "DockerRunner", "DockerUnavailableError", "ImageBuildError",
    "ImageNotFoundError", "Mount", "NativeRunner", "Runner", "RunnerError", "StageFailedError",
    "RunnerResult", "get_runner", "gpu_present", "hf_home", "in_container", "recipe_mounts", "redact",
    "secret_values", "stage_argv",
]


def in_container() -> bool:
    """True inside the moeprune image (its Dockerfile sets MOEPRUNE_IN_CONTAINER=1)."""
    return os.environ.get(IN_CONTAINER_ENV) == "1"


def hf_home() -> Path:
    """The Hugging Face cache root: $HF_HOME, else ~/.cache/huggingface."""
    return Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser().resolve()


def recipe_mounts(recipe: Recipe, runs_dir: Path | None = None) -> list[Mount]:
    """Host paths a stage of ``recipe`` reads or writes, at the same paths in the container.

    Read-only: the recipe's directory, the local base model, the prompts' directory, the eval
    include path. Read-write: the runs root (``$MOEPRUNE_RUNS_DIR`` or ./runs) and the HF cache.
    """
    mounts: list[Mount] = []
    if recipe.source_path is not None:
        mounts.append(Mount(recipe.source_path.parent, read_only=True))
    if recipe.base_dir is not None and recipe.base_dir.exists():
        mounts.append(Mount(recipe.base_dir, read_only=True))
    if recipe.prompts_path.parent.exists():
        mounts.append(Mount(recipe.prompts_path.parent, read_only=True))
    if recipe.include_path is not None and recipe.include_path.exists():
        mounts.append(Mount(recipe.include_path, read_only=True))
    mounts.append(Mount((runs_dir or runs_root()).resolve()))
    mounts.append(Mount(hf_home()))
    return mounts


def _docker_env(runs_dir: Path | None) -> dict[str, str]:
    # Same absolute paths inside: outputs land where a native run puts them.
    return {"MOEPRUNE_RUNS_DIR": str((runs_dir or runs_root()).resolve()), "HF_HOME": str(hf_home())}


def stage_argv(stage: str, recipe: Recipe, *extra: str) -> list[str]:
    """``[stage, "--recipe", <absolute recipe path>, *extra]``: a stage command for any runner."""
    if recipe.source_path is None:
        raise RunnerError("the recipe has no file (source_path): stages are run from a recipe file")
    return [stage, "--recipe", str(recipe.source_path), *extra]


def get_runner(kind: str | None, recipe: Recipe, image: str | None = None,
               runs_dir: Path | None = None, gpus: bool | None = None) -> Runner:
    """The runner for ``kind`` ("native" | "docker"; None: the recipe's ``[runner] kind``).

    Docker runners get the recipe's mounts and run ``image`` (default: ``[runner] image``).
    Inside the image every kind is native (a stage never starts a container in a container).
    """
    kind = kind or recipe.runner.kind
    if kind not in RUNNER_KINDS:
        raise RunnerError(f"--runner {kind!r}: use one of {', '.join(RUNNER_KINDS)}")
    if kind == "native" or in_container():
        return NativeRunner()
    return DockerRunner(
        image or recipe.runner.image,
        mounts=recipe_mounts(recipe, runs_dir),
        env=_docker_env(runs_dir),
        gpus=gpus,
    )
