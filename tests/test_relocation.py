"""Issue 15: no absolute path in the lock, the hash cache or any artifact.

A checkout copied elsewhere together with its runs reruns zero stages, and the same inputs on two
checkout paths ("two machines") give byte-identical artifacts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_reproduce import ARTIFACTS, artifact_hashes, stage_lines

from moeprune.pipeline.stages import stage_names

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]
_SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info")


def _copy_checkout(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=_SKIP, symlinks=True)
    if (ROOT / ".git").exists():  # the same commit, so code versions agree
        git = ROOT / ".git"
        (shutil.copy2 if git.is_file() else shutil.copytree)(git, dest / ".git")
    return dest


def _reproduce(checkout: Path, runs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # tasks.py puts the copy's own src/ first
    result = subprocess.run([sys.executable, "-m", "invoke", "reproduce", "--no-live", *args], cwd=checkout,
                            env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _files_with(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.parent.name == "logs" or "logs" in path.relative_to(root).parts:
            continue  # logs say where they ran; they are not part of the artifact or the cache
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return found


def test_no_absolute_path_in_lock_cache_or_artifacts(demo_run: Path):
    needles = [str(ROOT), str(demo_run.parent.resolve()), str(Path.home())]
    assert _files_with(demo_run, needles) == []


def test_copied_checkout_with_its_runs_reruns_zero_stages(demo_run: Path, tmp_path: Path):
    checkout = _copy_checkout(tmp_path / "elsewhere" / "moeprune")
    runs = checkout / "runs"
    shutil.copytree(demo_run, runs / "demo", symlinks=True)
    lock_before = (runs / "demo" / "run.lock.json").read_bytes()
    result = _reproduce(checkout, runs)
    statuses = stage_lines(result)
    assert list(statuses) == stage_names() and set(statuses.values()) == {"skipped"}, result.stdout + result.stderr
    assert (runs / "demo" / "run.lock.json").read_bytes() == lock_before
    cache = json.loads((runs / "demo" / ".hashcache.json").read_text())
    assert all(not key.startswith("/") for key in cache["files"]), "absolute path in the hash cache"


def test_two_checkout_paths_give_byte_identical_artifacts(demo_run: Path, tmp_path: Path):
    checkout = _copy_checkout(tmp_path / "machine-b" / "src-tree")
    runs = tmp_path / "machine-b-runs"
    _reproduce(checkout, runs)
    ours, theirs = artifact_hashes(demo_run), artifact_hashes(runs / "demo")
    differing = sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))
    assert differing == [], differing
    assert set(ARTIFACTS) <= {name.split("/", 1)[0] for name in ours}


def test_recipe_with_absolute_paths_records_no_path_and_reruns_nothing(tmp_path: Path):
    """Issue 22: paths are not parameters. The demo recipe copied elsewhere with every path
    absolute runs the pipeline without writing the checkout, run or home path into any file of
    the run; the original (relative) recipe then finds every stage done."""
    from fakerun import demo_recipe_text
    from test_reproduce import reproduce

    from moeprune.layout import RunLayout
    from moeprune.manifest import artifact_files

    recipe = tmp_path / "elsewhere" / "demo.toml"
    recipe.parent.mkdir()
    recipe.write_text(demo_recipe_text())
    assert f'"{ROOT}/' in recipe.read_text()
    runs = tmp_path / "runs"
    first = reproduce(runs, recipe=recipe)
    assert set(stage_lines(first).values()) == {"ran"}, first.stdout + first.stderr

    run = runs / "demo"
    published, unpublished = artifact_files(RunLayout(run), {})
    assert not any("logs" in f.local_path.relative_to(run).parts for f in published + unpublished)
    needles = [str(ROOT), str(run.resolve()), str(runs.resolve()), str(recipe.parent), str(Path.home())]
    assert _files_with(run, needles) == []

    again = reproduce(runs)  # recipes/demo.toml, relative paths
    statuses = stage_lines(again)
    assert list(statuses) == stage_names() and set(statuses.values()) == {"skipped"}, again.stdout + again.stderr
