"""The runner interface without a Docker engine: native runs, redaction, mounts, container specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moeprune.recipe import parse_recipe
from moeprune.runner import (
    DockerRunner,
    Mount,
    NativeRunner,
    RunnerError,
    StageFailedError,
    get_runner,
    recipe_mounts,
    redact,
    stage_argv,
)
from moeprune.runner.base import LogSink
from moeprune.runner.docker_runner import merge_mounts

SECRET = "hf_UnitTestSecretValue42"


def make_recipe(tmp_path: Path, **runner):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "config.json").write_text("{}")
    data = {
        "name": "unit",
        "model": {"base": "model", "name": "unit"},
        "calibration": {"prompts": "p.jsonl", "domains": ["math"], "prompts_per_domain": 1, "max_new_tokens": 4},
        "dropmap": {"strategy": "uniform-min-retention", "retention_threshold": 0.9},
        "prune": {"max_shard_bytes": 4096},
        "serve": {"ctx_size": 256},
        "eval": {"tasks": ["demo_mcq"], "max_gen_toks": 8},
    }
    if runner:
        data["runner"] = runner
    return parse_recipe(data, source_path=tmp_path / "recipe.toml")


def test_native_runner_streams_logs_and_records(tmp_path):
    lines: list[str] = []
    missing = tmp_path / "missing.toml"
    with pytest.raises(StageFailedError) as caught:
        NativeRunner().run_stage(["check", "--recipe", str(missing)], log_path=tmp_path / "check.log",
                                 stream=lines.append)
    assert caught.value.exit_code == 1
    assert "exited with status 1" in str(caught.value) and "recipe file not found" in str(caught.value)
    assert any("recipe file not found" in line for line in lines)
    assert "recipe file not found" in (tmp_path / "check.log").read_text()


def test_native_runner_success_returns_a_record(tmp_path):
    result = NativeRunner().run_stage(["--list"], stream=None)
    assert result.exit_code == 0 and result.runner == "native"
    record = result.record()
    assert record["argv"] == ["--list"] and record["environment"]["kind"] == "native"


def test_secrets_are_redacted_even_when_split_across_chunks(tmp_path):
    lines: list[str] = []
    sink = LogSink(tmp_path / "log.txt", lines.append, [SECRET])
    half = len(SECRET) // 2
    sink.write(f"token={SECRET[:half]}")
    sink.write(f"{SECRET[half:]} end\nnext")
    sink.close()
    assert lines == ["token=*** end", "next"]
    assert SECRET not in (tmp_path / "log.txt").read_text()
    assert redact(f"a {SECRET} b", [SECRET, ""]) == "a *** b"


def test_native_runner_redacts_hf_token(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    tasks_dir = tmp_path / "proj"
    tasks_dir.mkdir()
    (tasks_dir / "tasks.py").write_text(
        "import os\nfrom invoke import task\n\n@task\ndef leak(c):\n    print('token', os.environ['HF_TOKEN'])\n"
        "    raise SystemExit(2)\n")
    lines: list[str] = []
    with pytest.raises(StageFailedError) as caught:
        NativeRunner(project_root=tasks_dir).run_stage(["leak"], stream=lines.append)
    assert lines[-1] == "token ***"
    assert SECRET not in str(caught.value) and caught.value.exit_code == 2


def test_merge_mounts_dedupes_and_keeps_read_write(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    merged = merge_mounts([
        Mount(tmp_path / "a", read_only=True),
        Mount(tmp_path / "a" / "b", read_only=True),  # covered by its parent
        Mount(tmp_path / "a", read_only=False),  # same target: read-write wins
        Mount(tmp_path / "c"),
    ])
    assert [(m.container_path, m.read_only) for m in merged] == [
        (str(tmp_path / "a"), False), (str(tmp_path / "a" / "b"), True), (str(tmp_path / "c"), False)]


def test_docker_spec_has_gpus_user_mounts_and_no_secret_on_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("MOEPRUNE_RUNS_DIR", str(tmp_path / "runs"))
    recipe = make_recipe(tmp_path)
    runner = get_runner("docker", recipe, image="moeprune:test", gpus=True)
    assert isinstance(runner, DockerRunner)
    spec = runner.container_spec(stage_argv("prune", recipe), [], {})
    assert spec["command"] == ["prune", "--recipe", str(tmp_path / "recipe.toml")]
    assert spec["user"] == f"{os.getuid()}:{os.getgid()}"
    request = spec["device_requests"][0]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]
    targets = {m["Target"]: m["ReadOnly"] for m in spec["mounts"]}
    assert targets[str(tmp_path)] is True  # recipe directory (model inside it), read-only
    assert targets[str(tmp_path / "runs")] is False  # outputs at the same path as natively
    assert spec["environment"]["HF_TOKEN"] == SECRET  # only in the environment ...
    assert SECRET not in " ".join(spec["command"]) + spec["name"]  # ... never on the command line
    assert spec["environment"]["MOEPRUNE_RUNS_DIR"] == str(tmp_path / "runs")
    no_gpu = get_runner("docker", recipe, image="moeprune:test", gpus=False).container_spec(["x"], [], {})
    assert "device_requests" not in no_gpu


def test_recipe_mounts_cover_inputs_and_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    mounts = recipe_mounts(make_recipe(tmp_path), runs_dir=tmp_path / "out")
    by_path = {Path(m.source): m.read_only for m in mounts}
    assert by_path[tmp_path] is True and by_path[tmp_path / "model"] is True
    assert by_path[tmp_path / "out"] is False and by_path[tmp_path / "hf"] is False


def test_get_runner_defaults_to_the_recipe_and_is_native_inside_the_image(tmp_path, monkeypatch):
    monkeypatch.delenv("MOEPRUNE_IN_CONTAINER", raising=False)
    assert get_runner(None, make_recipe(tmp_path)).kind == "native"
    assert get_runner(None, make_recipe(tmp_path, kind="docker", image="x:y")).kind == "docker"
    monkeypatch.setenv("MOEPRUNE_IN_CONTAINER", "1")
    assert get_runner("docker", make_recipe(tmp_path)).kind == "native"
    with pytest.raises(RunnerError, match="native, docker"):
        get_runner("podman", make_recipe(tmp_path))
