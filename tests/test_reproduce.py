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
import time
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
    assert set(entries) == {"profile", "dropmap", "prune", "convert-base", "convert-pruned", "mmproj", "quantize-base",
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
    for name in ("convert-base", "mmproj", "quantize-base", "eval-base"):
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
    elif _where == "convert":
        from moeprune.llamacpp import process as _process
        _original_log = _process.write_tool_log
        def _log(path, command, *args, **kwargs):
            if any("convert_hf_to_gguf" in str(part) for part in command):
                _kill()  # the converter wrote its whole output into the temporary dir
            return _original_log(path, command, *args, **kwargs)
        _process.write_tool_log = _log
    elif _where == "eval":
        from moeprune.eval import session as _session
        _original_write = _session.write_sample_log
        def _write(path, records):
            if "pruned" in str(path):  # base done; the pruned model's server is up and has answered
                _kill()
            return _original_write(path, records)
        _session.write_sample_log = _write
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


def _kill_hook(tmp_path: Path, stage: str) -> dict[str, str]:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(SITE_HOOK)
    return {"MOEPRUNE_TEST_KILL_IN": stage,
            "PYTHONPATH": os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")])}


def test_kill_during_convert_leaves_no_temporary_past_the_next_start(reference_run: Path, tmp_path: Path):
    """Issue 22: a partial GGUF of a killed convert went only when convert reran; now any next
    writer of the run removes it, whichever stages it runs."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference_run, runs / "demo", symlinks=True)
    killed = reproduce(runs, "--from", "convert-base", "--until", "convert-base", check=False,
                       extra_env=_kill_hook(tmp_path, "convert"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert list((runs / "demo" / "gguf").glob(".base-*.gguf.tmp-*")), "the killed convert left its partial output"
    later = reproduce(runs, "--until", "prune")  # convert is not even selected
    assert set(stage_lines(later).values()) == {"skipped"}, later.stderr
    assert not list((runs / "demo").rglob(".*.tmp-*"))


# --- code fingerprints: editing a module reruns the stages whose action imports it -------------
def copied_checkout(tmp_path: Path) -> Path:
    """A copy of this checkout's sources, for tests that edit them (never the real checkout)."""
    import shutil

    checkout = tmp_path / "checkout"
    for name in ("src", "recipes", "calibration", "schemas", "model_card"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, checkout / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("tasks.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, checkout / name)
    return checkout


def reproduce_in(checkout: Path, runs_dir: Path) -> subprocess.CompletedProcess:
    env = _env(runs_dir, {"PYTHONPATH": str(checkout / "src"), "COLUMNS": "200"})
    result = subprocess.run([sys.executable, "-m", "invoke", "reproduce", "--no-live"], cwd=checkout, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result


def test_editing_code_reruns_exactly_the_stages_that_import_it(reference_run: Path, tmp_path: Path):
    import shutil

    from moeprune.card.render import TEMPLATE_PATH

    checkout = copied_checkout(tmp_path)
    runs = tmp_path / "runs"
    shutil.copytree(reference_run, runs / "demo", symlinks=True)

    template = checkout / TEMPLATE_PATH.resolve().relative_to(ROOT)
    template.write_text(template.read_text(encoding="utf-8") + "\n<!-- edited by a test -->\n", encoding="utf-8")
    statuses = stage_lines(reproduce_in(checkout, runs))
    assert {name for name, status in statuses.items() if status == "ran"} == {"card", "manifest"}, statuses
    assert len(statuses) == 14 and set(statuses.values()) == {"ran", "skipped"}

    module = checkout / "src" / "moeprune" / "arch" / "gemma4.py"
    module.write_text(module.read_text(encoding="utf-8") + "# edited by a test\n", encoding="utf-8")
    result = reproduce_in(checkout, runs)
    statuses = stage_lines(result)
    for name in ("profile", "dropmap", "prune"):
        assert statuses[name] == "ran", (name, result.stderr)
        assert f"[{name}] running (code changed: moeprune/arch/gemma4.py)" in result.stderr
    for name, entry in lock(runs / "demo").items():  # every stage whose code holds the module, and only those
        assert statuses[name] == ("ran" if "moeprune/arch/gemma4.py" in entry["code"] else "skipped"), name


# --- one writer per run ---------------------------------------------------------------------------
def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        assert process.poll() is None, f"exited ({process.returncode}) before {text!r}:\n{path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout_s} s"
        time.sleep(0.2)


def test_two_concurrent_reproduces_the_second_fails_at_once_naming_the_holder(reference_run: Path, tmp_path: Path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference_run, runs / "demo", symlinks=True)
    command = [sys.executable, "-m", "invoke", "reproduce", "--recipe", str(DEMO), "--no-live"]
    logs = {name: tmp_path / f"{name}.err" for name in ("first", "waiter")}
    with open(logs["first"], "w") as first_err, open(logs["waiter"], "w") as waiter_err:
        first = subprocess.Popen([*command, "--force"], cwd=ROOT, env=_env(runs), stdout=subprocess.DEVNULL,
                                 stderr=first_err)
        try:
            _wait_for(logs["first"], "[convert-base] running", first)  # inside a stage, its GGUF half written
            started = time.monotonic()
            second = subprocess.run([*command, "--force"], cwd=ROOT, env=_env(runs), capture_output=True, text=True,
                                    timeout=300)
            assert time.monotonic() - started < 60 and first.poll() is None, "it did not fail at once"
            assert second.returncode != 0 and second.stdout == ""
            assert len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert second.stderr.startswith(f"error: {runs / 'demo'} is in use by PID {first.pid} (invoke reproduce) "
                                            "since "), second.stderr
            assert second.stderr.strip().endswith("; wait for it or pass --wait")

            waiter = subprocess.Popen([*command, "--wait"], cwd=ROOT, env=_env(runs), stdout=subprocess.PIPE,
                                      stderr=waiter_err, text=True)
            _wait_for(logs["waiter"], f"in use by PID {first.pid} (invoke reproduce)", waiter)
            assert first.wait(timeout=1800) == 0, logs["first"].read_text()
            waiter_out, _ = waiter.communicate(timeout=600)
        finally:
            for process in (first, locals().get("waiter")):
                if process is not None and process.poll() is None:
                    process.kill()
    assert waiter.returncode == 0, logs["waiter"].read_text()
    waited = stage_lines(subprocess.CompletedProcess([], 0, waiter_out, logs["waiter"].read_text()))
    assert set(waited.values()) == {"skipped"}, waited  # it ran after the first, which had finished everything
    verify = subprocess.run([sys.executable, "-m", "invoke", "verify", str(runs / "demo")], cwd=ROOT, env=_env(runs),
                            capture_output=True, text=True, timeout=1800)
    assert verify.returncode == 0, verify.stdout + verify.stderr
