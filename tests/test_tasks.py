"""Every task through invoke's own command line: its --help, a bad flag, --runner docker, and a
cheap real call where one exists. A task added to tasks.py must be added to TASKS here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakerun import demo_recipe_text
from invoke_cli import invoke

ROOT = Path(__file__).resolve().parents[1]
NO_ENGINE = "unix:///nonexistent/moeprune-test/docker.sock"

# Every task, and whether it is a stage task (honours --runner).
STAGE_TASKS = ["profile", "dropmap", "prune", "verify-prune", "convert", "quantize", "eval", "card", "manifest",
               "stage"]
OTHER_TASKS = ["test", "schema", "check", "audit", "llamacpp", "serve", "compare-criteria", "publish", "verify", "reproduce",
               "demo-model", "docker.build", "docker.shell", "docker.lock", "rpc-worker"]
TASKS = STAGE_TASKS + OTHER_TASKS


def assert_clean_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1 with an "error: ..." message containing every needle, and no traceback."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output, output
    assert "error: " in result.stderr, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"
    return output


@pytest.fixture()
def empty_runs(tmp_path: Path) -> dict[str, str]:
    return {"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs")}


def test_the_task_list_is_the_one_tested():
    result = invoke("--list", "--list-format", "json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    names = [t["name"] for t in listing["tasks"]]
    names += [f"{c['name']}.{t['name']}" for c in listing["collections"] for t in c["tasks"]]
    assert sorted(names) == sorted(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_help_works(name: str):
    result = invoke("--help", name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Docstring:" in result.stdout and "Options:" in result.stdout
    if name in STAGE_TASKS:
        assert "--runner" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["dropmap", "-k", "abc"], "error: --keep-count: expected an integer, got 'abc'"),
        (["dropmap", "--threshold", "high"], "error: --threshold: expected a number, got 'high'"),
        (["convert", "--which", "both"], "error: --which: 'both' is not one of pruned, base"),
        (["prune", "--runner", "podman"], "error: --runner: 'podman' is not one of native, docker"),
        (["prune", "--max-shard-bytes", "5GB"], "error: --max-shard-bytes: expected an integer, got '5GB'"),
        (["serve", "--port", "http"], "error: --port: expected an integer, got 'http'"),
        (["llamacpp", "--jobs", "many"], "error: --jobs: expected an integer, got 'many'"),
        (["compare-criteria", "--limit", "ten"], "error: --limit: expected an integer, got 'ten'"),
        (["demo-model", "--steps", "1e3"], "error: --steps: expected an integer, got '1e3'"),
        (["docker.build", "--jobs", "x"], "error: --jobs: expected an integer, got 'x'"),
        (["docker.lock", "--variant", "gpu"], "error: --variant: 'gpu' is not one of cuda, cpu, all"),
    ],
)
def test_bad_flag_value_is_one_line_naming_the_flag(args: list[str], message: str, empty_runs):
    result = invoke(*args, env=empty_runs)
    assert_clean_error(result)
    assert result.stderr.strip() == message


def test_prune_with_docker_runner_and_no_engine_fails_naming_the_engine(tmp_path: Path, empty_runs):
    result = invoke("prune", "--runner", "docker", env={**empty_runs, "DOCKER_HOST": NO_ENGINE})
    assert_clean_error(result, "cannot reach the Docker engine", NO_ENGINE)
    assert not (tmp_path / "runs").exists(), "nothing may run natively instead"


@pytest.mark.parametrize("name", STAGE_TASKS)
def test_every_stage_task_dispatches_to_the_image(name: str, tmp_path: Path, empty_runs):
    """--runner docker reaches the engine before any native work, for every stage task."""
    args = [name, "--runner", "docker"] + (["prune"] if name == "stage" else [])
    result = invoke(*args, env={**empty_runs, "DOCKER_HOST": NO_ENGINE})
    assert_clean_error(result, "cannot reach the Docker engine")
    assert not (tmp_path / "runs").exists()


def test_recipe_runner_kind_docker_is_honoured_too(tmp_path: Path, empty_runs):
    recipe = tmp_path / "docker.toml"
    text = demo_recipe_text()
    recipe.write_text(text + '\n[runner]\nkind = "docker"\n')
    result = invoke("card", "--recipe", str(recipe), env={**empty_runs, "DOCKER_HOST": NO_ENGINE})
    assert_clean_error(result, "cannot reach the Docker engine")


# --- cheap real calls ------------------------------------------------------------------------
def test_check_passes_the_demo_recipe():
    result = invoke("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "recipe 'demo' is valid" in result.stdout and "preflight checks passed" in result.stdout


def test_schema_rewrites_the_committed_schema_unchanged():
    path = ROOT / "schemas" / "recipe.schema.json"
    before = path.read_bytes()
    result = invoke("schema")
    assert result.returncode == 0, result.stderr
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["dropmap"], ["profile statistics not found", "invoke profile"]),
        (["prune"], ["expert_drop_metadata.json"]),
        (["verify-prune"], ["pruned"]),
        (["convert"], ["no Hugging Face checkpoint there", "invoke prune"]),
        (["quantize", "--which", "base"], ["converted GGUF not found"]),
        (["card"], ["runs"]),
        # manifest and serve open the llama.cpp build before they look at the run (it is built on
        # first use): with the build, so in the slow tier.
        pytest.param(["manifest"], ["no artifact files found"], marks=pytest.mark.llamacpp),
        (["stage", "no-such-stage"], ["no stage 'no-such-stage'"]),
        (["reproduce", "--from", "no-such-stage"], ["no-such-stage"]),
        (["publish", "--dry-run", "--repo-id", "me/x"], ["runs"]),
        (["verify", "no-such-dir-or-repo"], ["no-such-dir-or-repo"]),
        (["audit", "no-such-dir-or-repo"], ["no-such-dir-or-repo"]),
        pytest.param(["serve", "--port", "1"], ["GGUF not found"], marks=pytest.mark.llamacpp),
        (["eval"], ["GGUF of 'base' not found", "invoke convert --which base"]),
        (["compare-criteria", "--limit", "2"], ["profile statistics not found"]),
    ],
)
def test_native_call_on_an_empty_run_fails_cleanly(args: list[str], needles: list[str], empty_runs):
    """The real code path of each task, up to its first missing input: no NameError can hide."""
    assert_clean_error(invoke(*args, env=empty_runs), *needles)


def test_llamacpp_reports_the_cached_build(llama_build_shared):
    result = invoke("llamacpp", timeout=3600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "key " in result.stdout and "CPU-only build" in result.stdout


@pytest.mark.slow
def test_demo_model_writes_an_untrained_model(tmp_path: Path):
    shipped = ROOT / "src" / "moeprune" / "demo" / "tasks" / "demo_mcq"
    before = {path.name: path.read_bytes() for path in shipped.iterdir() if path.is_file()}
    out = tmp_path / "model"
    result = invoke("demo-model", "--steps", "0", "--out", str(out), "--seed", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "config.json").is_file() and (out / "build_record.json").is_file()
    assert json.loads((out / "build_record.json").read_text())["seed"] == 3
    assert (tmp_path / "model.demo_mcq.jsonl").is_file(), "its held-out questions go beside it"
    after = {path.name: path.read_bytes() for path in shipped.iterdir() if path.is_file()}
    assert after == before, "a model built elsewhere must not overwrite the shipped demo_mcq dataset"


@pytest.mark.slow
def test_stage_tasks_on_a_copy_of_the_demo_run(demo_run: Path, tmp_path: Path):
    """prune, verify-prune, card, manifest and verify on a finished demo run, natively."""
    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    env = {"MOEPRUNE_RUNS_DIR": str(runs)}
    for args, needle in [
        (["dropmap"], "wrote"),
        (["prune"], "experts in"),
        (["verify-prune"], "verify-prune"),
        (["card"], "README.md"),
        (["manifest"], "files)"),
        (["verify", str(runs / "demo")], "verify"),
    ]:
        result = invoke(*args, env=env)
        assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
        assert needle in result.stdout, result.stdout


def test_reproduce_failure_prints_the_summary_with_the_error_then_exits_non_zero(tmp_path: Path):
    """DVC's behaviour: the table of every stage, the failed one with its error, later ones not run."""
    text = (ROOT / "recipes" / "demo.toml").read_text().replace('"../', f'"{ROOT}/')
    recipe = tmp_path / "fails.toml"
    recipe.write_text(text.replace('device_map = "cpu"', 'device_map = "no-such-device"'))
    result = invoke("reproduce", "--no-live", "--recipe", str(recipe),
                    env={"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs"), "COLUMNS": "200"})
    assert_clean_error(result, "stage profile failed")
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in (result.stdout + result.stderr).splitlines() if line.startswith("│") and line.count("│") >= 4}
    assert rows["profile"] == "failed"
    assert all(rows[name] == "not run" for name in ("dropmap", "prune", "eval-pruned", "card", "manifest"))
    assert "no-such-device" in result.stderr  # the error, in the summary (the live view's console is stderr)


def test_the_command_run_in_the_image_is_the_same_task_with_the_same_flags(tmp_path: Path):
    """What `--runner docker` hands the image: the task, its non-default flags, absolute paths."""
    sys.path.insert(0, str(ROOT))
    import tasks

    from moeprune.cli import task_argv

    argv = task_argv("prune", tasks.prune.body, {"recipe": Path("recipes/demo.toml"), "base": Path("m"),
                                                "max_shard_bytes": 1024, "runner": "docker"})
    assert argv == ["prune", "--recipe", str(Path("recipes/demo.toml").resolve()), "--base", str(Path("m").resolve()),
                    "--max-shard-bytes", "1024"]
    assert task_argv("profile", tasks.profile.body, {"progress": False}) == ["profile", "--no-progress"]
    assert task_argv("stage", tasks.stage.body, {"name": "eval-pruned"}) == ["stage", "--name", "eval-pruned"]


def _stage_functions(path: Path) -> dict[str, set]:
    """{function: the objects it imports whose name is a stage function (run_*, *_stage)}, by
    function of ``path`` (nested actions count for their enclosing function)."""
    import ast
    import importlib

    found: dict[str, set] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = {getattr(importlib.import_module(inner.module), alias.name)
                                for inner in ast.walk(node) if isinstance(inner, ast.ImportFrom)
                                for alias in inner.names
                                if alias.name.startswith("run_") or alias.name.endswith("_stage")}
    return found


def test_tasks_reach_stages_by_one_route():
    """Each stage task calls the stage function its pipeline stage calls; only `invoke stage` runs a
    pipeline stage by name."""
    from moeprune.pipeline.stages import run_single_stage

    commands = _stage_functions(ROOT / "src" / "moeprune" / "commands.py")
    actions = _stage_functions(ROOT / "src" / "moeprune" / "pipeline" / "stages.py")
    pairs = {"profile": "_profile", "dropmap": "_dropmap", "prune": "_prune", "convert": "_convert",
             "quantize": "_quantize", "eval_models": "_eval", "card": "_card", "manifest": "_manifest"}
    for command, action in pairs.items():
        assert actions[action], action
        assert commands[command] == actions[action], f"commands.{command} and the pipeline's {action} differ"
    assert [name for name, used in commands.items() if run_single_stage in used] == ["stage"]
