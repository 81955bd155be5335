"""`invoke reproduce` end to end on the demo: caching, invalidation, and resuming after kill -9.

These run the real pipeline (transformers, llama.cpp, lm-eval) on the embedded demo model, so
they are marked slow. One uninterrupted run is shared by the tests that compare against it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.toml"

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

# Files whose bytes must not depend on how the run got there (killed and resumed or not).
ARTIFACTS = ("profile", "expert_drop_metadata.json", "pruned", "gguf", "eval", "card", "manifest.json")


def _env(runs_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs_dir), "PYTHONUNBUFFERED": "1"}
    env.update(extra or {})
    return env


def reproduce(runs_dir: Path, *args: str, recipe: Path = DEMO, extra_env: dict[str, str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "invoke", "reproduce", "--recipe", str(recipe), "--no-live", *args]
    result = subprocess.run(command, cwd=ROOT, env=_env(runs_dir, extra_env), capture_output=True, text=True,
                            timeout=1800)
    if check and result.returncode != 0:
        raise AssertionError(f"reproduce failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def lock(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.lock.json").read_text())["stages"]


def artifact_hashes(run_dir: Path) -> dict[str, str]:
    """sha256 of every artifact file of a run (logs, lock and caches excluded)."""
    from moeprune.hashing import sha256_file

    hashes = {}
    for name in ARTIFACTS:
        target = run_dir / name
        files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
        for path in files:
            hashes[path.relative_to(run_dir).as_posix()] = sha256_file(path)
    return hashes


def stage_lines(result: subprocess.CompletedProcess) -> dict[str, str]:
    """{stage: 'ran' | 'skipped'} from the non-terminal progress lines."""
    statuses = {}
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("[") and "] " in line:
            name, rest = line[1:].split("] ", 1)
            word = rest.split(" ", 1)[0]
            if word in ("ran", "skipped", "failed"):
                statuses[name] = word
    return statuses


@pytest.fixture(scope="module")
def reference_run(demo_run: Path, tmp_path_factory) -> Path:
    """A private copy of the session's uninterrupted demo run (this module reruns in it)."""
    import shutil

    runs = tmp_path_factory.mktemp("reference-runs")
    shutil.copytree(demo_run, runs / "demo", symlinks=True)
    return runs / "demo"


def test_full_demo_then_everything_skipped(reference_run: Path):
    entries = lock(reference_run)
    assert set(entries) == {"profile", "dropmap", "prune", "convert-base", "convert-pruned", "quantize-base",
                             "quantize-pruned", "eval-base", "eval-pruned", "results", "kld", "card", "manifest"}
    for name in ARTIFACTS:
        assert (reference_run / name).exists(), name
    second = reproduce(reference_run.parent)
    assert set(stage_lines(second).values()) == {"skipped"}, second.stderr
    assert lock(reference_run) == entries


@pytest.fixture
def variant_recipe():
    """The demo recipe with another threshold, beside it (same relative paths), removed after."""
    made: list[Path] = []

    def make(threshold: float) -> Path:
        text = DEMO.read_text()
        old = tomllib.loads(text)["dropmap"]["retention_threshold"]
        target = DEMO.with_name(f".test-variant-{os.getpid()}.toml")
        target.write_text(text.replace(f"retention_threshold = {old}", f"retention_threshold = {threshold!r}"))
        made.append(target)
        return target

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def test_new_threshold_reruns_dropmap_and_downstream_only(reference_run: Path, tmp_path: Path, variant_recipe):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference_run, runs / "demo", symlinks=True)
    drop_map = json.loads((reference_run / "expert_drop_metadata.json").read_text())
    kept = drop_map["num_experts_kept"]
    # A threshold just above the worst layer's retention forces one more expert per layer.
    worst = min(layer["retained_fraction"] for layer in drop_map["layers"])
    result = reproduce(runs, recipe=variant_recipe(min(1.0, worst + 1e-6)))
    statuses = stage_lines(result)
    assert statuses["profile"] == "skipped"
    for name in ("convert-base", "quantize-base", "eval-base"):
        assert statuses[name] == "skipped", (name, result.stderr)
    for name in ("dropmap", "prune", "convert-pruned", "quantize-pruned", "eval-pruned", "results", "kld", "card",
                 "manifest"):
        assert statuses[name] == "ran", (name, result.stderr)
    new_map = json.loads((runs / "demo" / "expert_drop_metadata.json").read_text())
    assert new_map["num_experts_kept"] > kept


SITE_HOOK = textwrap.dedent(
    '''
    """Test-only fault injection: SIGKILL this process in the middle of one stage."""
    import os, signal

    def _kill():
        os.kill(os.getpid(), signal.SIGKILL)

    _where = os.environ.get("MOEPRUNE_TEST_KILL_IN")
    if _where == "prune":
        from moeprune.io import writer as _writer
        _original_add = _writer.ShardedWriter.add
        _calls = [0]
        def _add(self, *args, **kwargs):
            _calls[0] += 1
            if _calls[0] == 20:   # halfway through the tensors: some shard bytes are written
                _kill()
            return _original_add(self, *args, **kwargs)
        _writer.ShardedWriter.add = _add
    elif _where == "eval":
        from moeprune.eval import run as _run
        _original_write = _run.write_sample_log
        def _write(path, records):
            if "pruned" in str(path):  # base done; the pruned model's server is up and has answered
                _kill()
            return _original_write(path, records)
        _run.write_sample_log = _write
    '''
)


@pytest.mark.parametrize("stage", ["prune", "eval"])
def test_kill_during_stage_resumes_there_with_identical_hashes(reference_run: Path, tmp_path: Path, stage: str):
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITE_HOOK)
    runs = tmp_path / "runs"
    killed = reproduce(runs, check=False, extra_env={
        "MOEPRUNE_TEST_KILL_IN": stage,
        "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")]),
    })
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    done_before = set(lock(runs / "demo"))
    expected_stage = "prune" if stage == "prune" else "eval-pruned"
    assert expected_stage not in done_before

    resumed = reproduce(runs)
    statuses = stage_lines(resumed)
    assert statuses[expected_stage] == "ran"
    assert all(statuses[name] == "skipped" for name in done_before), statuses
    assert artifact_hashes(runs / "demo") == artifact_hashes(reference_run)
    assert not list((runs / "demo").rglob(".*.tmp-*")), "no temporary leftovers"
