"""The docker runner against a real Docker engine and the CPU image built from this tree.

The session fixture starts ``dockerd`` (Debian's docker.io) when none answers, with its data
root under ``$MOEPRUNE_CACHE_DIR/docker/engine`` so layers survive between runs; it skips only
when docker.io is not installed. The image is built by the product code
(``build_image(cpu=True)``): debootstrap base + wheelhouse + llama.cpp, all cached by content,
so a warm run reuses everything and a cold one builds it (tens of minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_gemma4 import save_tiny_gemma4

from moeprune.hashing import file_digests, sha256_file
from moeprune.recipe import load_recipe
from moeprune.runner import (
    ContainerKilledError,
    DockerRunner,
    DockerUnavailableError,
    ImageNotFoundError,
    NativeRunner,
    StageFailedError,
    get_runner,
)
from moeprune.runner.docker_runner import RUNNER_LABEL
from moeprune.runner.image import CPU_TAG, IMAGE_KEY_LABEL, build_image, docker_cache_dir

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parents[1]
ENGINE_START_TIMEOUT_S = 90
SECRET = "hf_DockerRunnerTestSecret0123456789"


def _engine_reachable() -> bool:
    from moeprune.runner.engine import connect

    try:
        connect(timeout_s=10).close()
        return True
    except DockerUnavailableError:
        return False


@pytest.fixture(scope="session")
def docker_client():
    """A client of a running engine; starts dockerd for the session when none is running."""
    from moeprune.runner.engine import connect

    started = None
    if not _engine_reachable():
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            pytest.skip("Docker engine not installed (apt-get install docker.io)")
        if os.geteuid() != 0:
            pytest.fail("dockerd is installed but not running, and only root can start it here")
        data_root = docker_cache_dir() / "engine"
        data_root.mkdir(parents=True, exist_ok=True)
        log = open(docker_cache_dir() / "dockerd.log", "a")
        started = subprocess.Popen([dockerd, "--data-root", str(data_root)], stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ENGINE_START_TIMEOUT_S
        while not _engine_reachable():
            if started.poll() is not None or time.monotonic() > deadline:
                started.kill()
                pytest.fail(f"dockerd did not come up; see {docker_cache_dir() / 'dockerd.log'}")
            time.sleep(1)
    client = connect()
    yield client
    client.close()
    if started is not None:
        started.terminate()
        started.wait(timeout=60)


@pytest.fixture(scope="session")
def cpu_image(docker_client) -> str:
    """The CPU image of this tree (reused when its content key is already built).

    ``MOEPRUNE_DOCKER_TEST_IMAGE=<tag>`` uses an existing image instead (quick local iterations;
    CI leaves it unset so the image of the tree under test is what is tested)."""
    override = os.environ.get("MOEPRUNE_DOCKER_TEST_IMAGE")
    if override:
        docker_client.images.get(override)
        return override
    recipe = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    log_path = docker_cache_dir() / "last-test-build.log"
    with open(log_path, "w") as log:
        built = build_image(ROOT, cpu=True, llamacpp=recipe.llamacpp,
                            say=lambda line: (log.write(line + "\n"), log.flush()))
    print(f"\nCPU image {built.tag} {'reused' if built.reused else 'built'} in {built.seconds} s")
    return built.tag


def leftover_containers(client) -> list[str]:
    return [c.name for c in client.containers.list(all=True, filters={"label": RUNNER_LABEL})]


@pytest.fixture()
def no_leftovers(docker_client):
    """Each test must leave no container of the runner behind, running or stopped."""
    assert leftover_containers(docker_client) == []
    yield
    assert leftover_containers(docker_client) == []


# --- a deterministic two-stage pipeline: drop map from profile statistics, then prune --------
def write_tiny_model(directory: Path) -> None:
    save_tiny_gemma4(directory, max_shard_size="200KB")


def write_stats(path: Path, layers: int = 4, experts: int = 16) -> None:
    """Profile statistics in the format of moeprune.profile.stats (safetensors, float64/int64)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    contribution = rng.gamma(0.5, size=(layers, experts)) * 100
    counts = np.ceil(contribution).astype(np.int64)
    tensors = {}
    for prefix, scale in (("", 1.0), ("domain/math/", 0.6), ("domain/code/", 0.4)):
        tensors[prefix + "contribution_sum"] = contribution * scale
        tensors[prefix + "routed_count"] = counts
        tensors[prefix + "reap_mean"] = contribution * scale / np.maximum(counts, 1)
        tensors[prefix + "router_prob_sum"] = contribution * scale / 10
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"layers": json.dumps(list(range(layers))),
                                            "domains": json.dumps(["math", "code"]),
                                            "model_sha256": "c" * 64, "num_tokens": "640"})


RECIPE = """
name = "dockertest"
[model]
base = "model"
dtype = "float32"
name = "docker test model"
[calibration]
prompts = "prompts.jsonl"
domains = ["math", "code"]
prompts_per_domain = 1
max_new_tokens = 4
[dropmap]
strategy = "uniform-min-retention"
retention_threshold = 0.9
[prune]
max_shard_bytes = 200000
[serve]
ctx_size = 256
[eval]
tasks = ["demo_mcq"]
max_gen_toks = 8
"""


@pytest.fixture(scope="module")
def pipeline_inputs(tmp_path_factory) -> Path:
    inputs = tmp_path_factory.mktemp("inputs")
    write_tiny_model(inputs / "model")
    (inputs / "prompts.jsonl").write_text(
        '{"id": "m", "domain": "math", "prompt": "1+1?"}\n{"id": "c", "domain": "code", "prompt": "def f"}\n')
    (inputs / "recipe.toml").write_text(RECIPE)
    return inputs / "recipe.toml"


def run_pipeline(runner, recipe_path: Path, runs_dir: Path, env: dict[str, str] | None = None) -> Path:
    # One stats file copied to both runs: safetensors orders __metadata__ keys arbitrarily, so two
    # writes of the same statistics need not be byte-identical.
    stats = recipe_path.parent / "stats.safetensors"
    if not stats.exists():
        write_stats(stats)
    (runs_dir / "dockertest" / "profile").mkdir(parents=True)
    shutil.copy2(stats, runs_dir / "dockertest" / "profile" / "stats.safetensors")
    for stage in ("dropmap", "prune"):
        runner.run_stage([stage, "--recipe", str(recipe_path)], env=env, log_path=runs_dir / f"{stage}.log",
                         stream=None)
    return runs_dir / "dockertest"


def test_stages_in_the_image_write_the_same_bytes_as_native(cpu_image, pipeline_inputs, tmp_path, no_leftovers):
    recipe = load_recipe(pipeline_inputs, check_inputs=False)
    native_runs, docker_runs = tmp_path / "native", tmp_path / "docker"
    native = run_pipeline(NativeRunner(), pipeline_inputs, native_runs, env={"MOEPRUNE_RUNS_DIR": str(native_runs)})
    docker = run_pipeline(get_runner("docker", recipe, image=cpu_image, runs_dir=docker_runs),
                          pipeline_inputs, docker_runs)

    drop_map = "expert_drop_metadata.json"
    assert sha256_file(docker / drop_map) == sha256_file(native / drop_map)
    pruned = file_digests(docker / "pruned")
    assert pruned == file_digests(native / "pruned")
    assert any(name.endswith(".safetensors") for name in pruned)
    # Written as the calling user, not as the image's user (uid 1000).
    assert {p.stat().st_uid for p in docker.rglob("*")} == {os.getuid()}


def test_manifest_record_names_the_image_by_id(cpu_image, docker_client, pipeline_inputs):
    runner = get_runner("docker", load_recipe(pipeline_inputs, check_inputs=False), image=cpu_image)
    record = runner.describe()
    image = docker_client.images.get(cpu_image)
    assert record["kind"] == "docker"
    assert record["image"]["id"] == image.id and image.id.startswith("sha256:")
    assert record["image"]["labels"][IMAGE_KEY_LABEL] == image.labels[IMAGE_KEY_LABEL]


def test_image_finds_its_prebuilt_llamacpp_under_the_same_key(cpu_image, no_leftovers):
    """At run time the recipe's llama.cpp resolves to the build made in the image (no rebuild)."""
    probe = (
        "from moeprune.recipe import LlamaCppSection\n"
        "from moeprune.llamacpp.build import resolve_build, builds_root, BINARIES\n"
        "source, flags, tools, key = resolve_build(LlamaCppSection())\n"
        "print('key', key, all((builds_root() / key / 'bin' / b).is_file() for b in BINARIES))\n"
    )
    lines: list[str] = []
    DockerRunner(cpu_image, entrypoint=["python", "-c"], gpus=False).run_stage([probe], stream=lines.append)
    assert any(line.startswith("key ") and line.endswith(" True") for line in lines), lines


def test_hf_token_reaches_the_stage_but_is_never_printed(cpu_image, monkeypatch, tmp_path, no_leftovers):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    code = "import os, sys; t = os.environ['HF_TOKEN']; print('token', t, len(t)); sys.exit(3)"
    lines: list[str] = []
    runner = DockerRunner(cpu_image, entrypoint=["python", "-c"], gpus=False)
    with pytest.raises(StageFailedError) as caught:
        runner.run_stage([code], log_path=tmp_path / "stage.log", stream=lines.append)
    assert caught.value.exit_code == 3
    log = (tmp_path / "stage.log").read_text()
    assert f"token *** {len(SECRET)}" in log  # it arrived whole ...
    for text in (log, "\n".join(lines), str(caught.value), caught.value.log_tail):
        assert SECRET not in text  # ... and was shown nowhere


def test_non_zero_exit_is_a_clear_error_with_the_log_tail(cpu_image, tmp_path, no_leftovers):
    runner = DockerRunner(cpu_image, gpus=False)
    missing = tmp_path / "no-such-recipe.toml"
    with pytest.raises(StageFailedError) as caught:
        runner.run_stage(["check", "--recipe", str(missing)], stream=None)
    message = str(caught.value)
    assert caught.value.exit_code == 1
    assert "exited with status 1" in message and "invoke check" in message
    assert "recipe file not found" in message  # the stage's own error, from the log tail


def test_container_killed_mid_stage_is_reported_and_removed(cpu_image, docker_client, no_leftovers):
    def kill_when_started(line: str) -> None:
        if line == "started":
            for container in docker_client.containers.list(filters={"label": RUNNER_LABEL}):
                container.kill()

    runner = DockerRunner(cpu_image, entrypoint=["python", "-c"], gpus=False)
    code = "import time; print('started', flush=True); time.sleep(600)"
    with pytest.raises(ContainerKilledError) as caught:
        runner.run_stage([code], stream=kill_when_started)
    assert "was killed" in str(caught.value) and "incomplete" in str(caught.value)


def test_ctrl_c_removes_the_container(cpu_image, docker_client, no_leftovers):
    def interrupt_when_started(line: str) -> None:
        if line == "started":
            raise KeyboardInterrupt

    runner = DockerRunner(cpu_image, entrypoint=["python", "-c"], gpus=False)
    with pytest.raises(KeyboardInterrupt):
        runner.run_stage(["import time; print('started', flush=True); time.sleep(600)"],
                         stream=interrupt_when_started)


def test_missing_image_says_how_to_build_it(docker_client, no_leftovers):
    with pytest.raises(ImageNotFoundError, match="invoke docker.build"):
        DockerRunner("moeprune:no-such-image", gpus=False).run_stage(["--list"], stream=None)


def test_missing_engine_names_the_socket(docker_client, monkeypatch, tmp_path, no_leftovers):
    bogus = f"unix://{tmp_path}/no-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", bogus)
    with pytest.raises(DockerUnavailableError) as caught:
        DockerRunner(CPU_TAG, gpus=False).run_stage(["--list"], stream=None)
    assert bogus in str(caught.value) and "--runner native" in str(caught.value)


def test_stage_output_is_streamed_while_the_container_runs(cpu_image, docker_client, no_leftovers):
    running_at_first_line: list[bool] = []

    def on_line(line: str) -> None:
        if line == "tick 0":
            running = docker_client.containers.list(filters={"label": RUNNER_LABEL, "status": "running"})
            running_at_first_line.append(bool(running))

    code = "import time\nfor i in range(3):\n    print('tick', i, flush=True); time.sleep(1)"
    DockerRunner(cpu_image, entrypoint=["python", "-c"], gpus=False).run_stage([code], stream=on_line)
    assert running_at_first_line == [True]
