"""Serving across machines with llama.cpp's RPC backend (issue 25, item 2).

Fast: the recipe field, its flags and its place outside every cache key, the preflight's lines for
workers that cannot serve, the build record a worker serves and the rule of what may differ. Slow
(the real build): ``invoke rpc-worker`` processes on 127.0.0.1; ``invoke check`` refusing a worker
of another build and a bare ``ggml-rpc-server``; ``invoke profile`` generating phase 1 through
llama-server on two workers; ``invoke eval`` and ``invoke stage kld`` of the demo with
``serve.rpc`` naming two of them, compared with the single-process demo run, and a worker killed
mid-eval.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fakerun import demo_recipe_text
from invoke_cli import invoke

from moeprune.errors import RecipeError
from moeprune.llamacpp.rpc import (BUILD_FIELDS_MAY_DIFFER, RpcWorkerError, WorkerInfo, build_problem,
                                   build_record_entry, fetch_build, record_identity, rpc_flags, serving_build,
                                   worker_problems)
from moeprune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20


def _free_port() -> int:
    """A port free now whose next port is free too (a worker's build record is served there)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 65535:
            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.bind(("127.0.0.1", port + 1))
                return port


def _rpc_recipe(tmp_path: Path, endpoints: list[str], n_gpu_layers: int = 99, name: str = "demo") -> Path:
    text = demo_recipe_text().replace('name = "demo"', f'name = "{name}"', 1)
    text = text.replace("n_gpu_layers = 0\n", f"n_gpu_layers = {n_gpu_layers}\nrpc = {json.dumps(endpoints)}\n")
    path = tmp_path / f"{name}-rpc.toml"
    path.write_text(text)
    return path


# --- the recipe field ---------------------------------------------------------------------------
@pytest.mark.parametrize("entries, needle", [
    (["127.0.0.1"], "entry '127.0.0.1' is not \"host:port\""),
    (["127.0.0.1:0"], "entry '127.0.0.1:0'"),
    (["127.0.0.1:70000"], "entry '127.0.0.1:70000'"),
    ([":50052"], "entry ':50052'"),
    (["h:1", "h:1"], "names a worker twice"),
])
def test_a_bad_rpc_entry_is_refused_naming_the_field(tmp_path: Path, entries: list[str], needle: str):
    path = _rpc_recipe(tmp_path, entries)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path, check_inputs=False)
    lines = [line for line in str(caught.value).splitlines() if "serve.rpc" in line]
    assert len(lines) == 1 and needle in lines[0], str(caught.value)


def test_a_bad_rpc_entry_through_invoke_check_is_one_line_without_a_traceback(tmp_path: Path):
    result = invoke("check", "--recipe", str(_rpc_recipe(tmp_path, ["workerA"])))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert any("field 'serve.rpc'" in line and "'workerA'" in line for line in result.stderr.splitlines()), result.stderr


def test_the_workers_are_no_setting_of_what_is_made(tmp_path: Path):
    """serve.rpc is outside recipe.settings() (so outside every stage key and recipe hash), like
    profile.data_parallel; the flags reach llama-server, and the recorded flags do not carry them."""
    from moeprune.eval.records import stable_flags
    from moeprune.llamacpp.server import server_flags

    with_workers = load_recipe(_rpc_recipe(tmp_path, ["10.0.0.2:50052", "10.0.0.3:50052"]), check_inputs=False)
    alone = with_workers.model_copy(update={"serve": with_workers.serve.model_copy(update={"rpc": []})})
    assert with_workers.settings() == alone.settings()
    assert "rpc" not in with_workers.settings()["serve"]
    flags = server_flags(with_workers.serve)
    assert flags[-2:] == ["--rpc", "10.0.0.2:50052,10.0.0.3:50052"] == rpc_flags(with_workers.serve.rpc)
    assert "--rpc" not in server_flags(alone.serve)
    assert stable_flags(["--port", "9", *flags], Path("m.gguf")) == stable_flags(["--port", "9", *server_flags(alone.serve)],
                                                                              Path("m.gguf"))


# --- the preflight ----------------------------------------------------------------------------------
def test_check_names_every_worker_that_does_not_answer(tmp_path: Path):
    dead = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]
    result = invoke("check", "--recipe", str(_rpc_recipe(tmp_path, dead)))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    for endpoint in dead:
        lines = [line for line in result.stderr.splitlines() if f"RPC worker {endpoint}:" in line]
        assert len(lines) == 1 and "invoke rpc-worker" in lines[0], result.stderr


def test_workers_without_an_offloaded_layer_are_refused(tmp_path: Path):
    result = invoke("check", "--recipe", str(_rpc_recipe(tmp_path, ["127.0.0.1:50052"], n_gpu_layers=0)))
    assert result.returncode != 0
    assert any("field 'serve.rpc': serve.n_gpu_layers = 0 offloads no layer" in line
               for line in result.stderr.splitlines()), result.stderr


def test_phase1_on_llama_server_checks_the_workers_with_its_own_gguf(tmp_path: Path):
    """Phase 1's llama-server takes serve.rpc too, so the profile stage's preflight checks the
    workers, and the memory they need counts the offloaded share of profile.generate_gguf."""
    from moeprune.plan.gather import phase1_offload_bytes
    from moeprune.preflight import checks_for

    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(bytes(4 * MiB))
    path = _rpc_recipe(tmp_path, ["127.0.0.1:50052"])
    served = load_recipe(path, check_inputs=False)
    assert "rpc-workers" not in checks_for(served, ["profile"]) and phase1_offload_bytes(served) is None
    path.write_text(path.read_text().replace("[profile]\n", f'[profile]\ngenerate = "llama-server"\n'
                                             f'generate_gguf = "{gguf}"\ngenerate_n_gpu_layers = 2\n', 1))
    phase1 = load_recipe(path, check_inputs=False)
    assert "rpc-workers" in checks_for(phase1, ["profile"])
    assert phase1_offload_bytes(phase1) == 2 * MiB  # 2 of the demo's 4 layers


def test_worker_problems_name_the_worker_its_protocol_and_the_memory_shortfall():
    good = WorkerInfo("a:1", "7.0.0", ((300 * MiB, 1000 * MiB),))
    old = WorkerInfo("b:2", "6.1.0", ((200 * MiB, 1000 * MiB),))
    assert worker_problems([good], "7.0.0", 300 * MiB) == []
    problems = worker_problems([good, old], "7.0.0", 600 * MiB)
    assert len(problems) == 2
    assert problems[0].startswith("RPC worker b:2 speaks RPC protocol 6.1.0, the pinned llama.cpp 7.0.0")
    assert "500 MiB free together (a:1 300 MiB, b:2 200 MiB)" in problems[1] and "need 600 MiB" in problems[1]
    assert worker_problems([WorkerInfo("c:3", "7.0.0", ())], "7.0.0", None) == ["RPC worker c:3 reports no device"]


HEAD_RECORD = {"key": "k-head", "source": {"llama_cpp_commit": "c" * 40, "pin_sha256": "s" * 64},
               "flags": {"GGML_RPC": "ON", "GGML_CUDA": "OFF", "GGML_NATIVE": "OFF", "CMAKE_BUILD_TYPE": "Release"},
               "binaries": {"ggml-rpc-server": {"sha256": "a" * 64}}}


def _doctored(record: dict, flags: dict | None = None, **source) -> dict:
    """``record`` with some flags and source fields replaced (another build, as its record says)."""
    return {**record, "key": "k-other", "flags": {**record["flags"], **(flags or {})},
            "source": {**record["source"], **source}}


def test_a_worker_build_may_differ_only_in_its_device_backend():
    """The one rule (BUILD_FIELDS_MAY_DIFFER): a CUDA worker of a CPU head passes and is recorded with
    what differs; another commit, source archive or CPU-kernel flag is one line naming each field."""
    head = record_identity(HEAD_RECORD)
    cuda = record_identity(_doctored(HEAD_RECORD, {"GGML_CUDA": "ON", "CMAKE_CUDA_ARCHITECTURES": "90"}))
    assert build_problem("w:1", head, head) is None and build_problem("w:1", head, cuda) is None
    assert build_record_entry(head, cuda) == {"key": "k-other", "llama_cpp_commit": "c" * 40,
                                              "unlike_head": {"flags.GGML_CUDA": "ON",
                                                              "flags.CMAKE_CUDA_ARCHITECTURES": "90"}}
    assert build_record_entry(head, head)["unlike_head"] == {}
    native = record_identity(_doctored(HEAD_RECORD, {"GGML_NATIVE": "ON"}, llama_cpp_commit="d" * 40))
    line = build_problem("w:1", head, native)
    assert line is not None and line.startswith("RPC worker w:1 runs another llama.cpp build than this node (")
    assert f"flags.GGML_NATIVE = ON there, OFF here; llama_cpp_commit = {'d' * 40} there, {'c' * 40} here" in line
    assert "invoke rpc-worker" in line
    assert build_problem("w:1", head, record_identity(_doctored(HEAD_RECORD, pin_sha256="t" * 64))) is not None
    assert build_problem("w:1", head, {k: v for k, v in head.items() if k != "flags.GGML_RPC"}) is not None
    # The rule names fields of the identity (flags: only where a build sets them).
    assert all(name in head or name.startswith("flags.") for name in BUILD_FIELDS_MAY_DIFFER)


def test_the_build_port_serves_the_record_and_nothing_answers_when_it_stops():
    """serving_build (the thread of `invoke rpc-worker`) answers fetch_build with the record; the port
    is taken while it serves, and nothing answers once the worker stopped."""
    port = _free_port()
    with serving_build("127.0.0.1", port, HEAD_RECORD) as served:
        assert served == port + 1
        assert fetch_build(f"127.0.0.1:{port}") == record_identity(HEAD_RECORD)
        with pytest.raises(RpcWorkerError, match=rf"^rpc-worker 127.0.0.1:{port}: could not bind its build port"):
            with serving_build("127.0.0.1", port, HEAD_RECORD):
                pass
    with pytest.raises(RpcWorkerError, match=rf"^RPC worker 127.0.0.1:{port}: no build record on port {port + 1} "
                                             r".*a bare ggml-rpc-server.*`invoke rpc-worker --host 127.0.0.1"):
        fetch_build(f"127.0.0.1:{port}", timeout_s=2)


@contextlib.contextmanager
def _http_answering(port: int, body: bytes):
    """Some other HTTP service on ``port`` that answers ``body`` to every GET."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("document, needle", [
    (b"<html>hello</html>", "answers, but not with a moeprune rpc-worker build record (moeprune-rpc-build/1)"),
    (b'{"format": "moeprune-rpc-build/1", "build": []}', "answers, but not with a moeprune rpc-worker build record"),
    (b'{"format": "moeprune-rpc-build/1", "rpc_port": 7, "build": {}}', "belongs to the worker on port 7, not "),
])
def test_a_build_port_that_answers_something_else_is_refused(document: bytes, needle: str):
    port = _free_port()
    with _http_answering(port + 1, document):
        with pytest.raises(RpcWorkerError, match=rf"^RPC worker 127.0.0.1:{port}: ") as caught:
            fetch_build(f"127.0.0.1:{port}")
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_the_recorded_topology_has_one_definition_in_every_schema():
    """results.json, kld.json and profile.json record the same topology (one JSON Schema $def each:
    a schema cannot $ref another file here, so they are held equal)."""
    defs = [json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())["$defs"]["topology"]
            for name in ("results", "kld", "profile")]
    assert defs[0] == defs[1] == defs[2]
    worker = defs[0]["properties"]["rpc_workers"]["items"]
    assert "build" in worker["required"]


# --- real workers ------------------------------------------------------------------------------------
class Worker:
    """``invoke rpc-worker`` as a real process (its own process group, so a test can kill it whole)."""

    def __init__(self, port: int, *extra: str, env: dict[str, str] | None = None) -> None:
        self.endpoint = f"127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "invoke", "rpc-worker", "--port", str(port), "--threads", "1", *extra],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[str] = []

    def wait_serving(self, timeout_s: float = 300) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if line.startswith("rpc-worker: serving"):
                return
        raise AssertionError(f"{self.endpoint} did not start: {self.lines} {self.finish()[1]}")

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        _, err = self.process.communicate(timeout=timeout_s)
        return self.process.returncode, err

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)


@pytest.mark.llamacpp
def test_rpc_worker_serves_the_pinned_build_and_refuses_what_it_cannot_do(llama_build_shared):
    """`invoke rpc-worker` prints the build it runs, answers the protocol of the pinned source with
    its memory; a port in use and a --mem it lacks are one-line errors."""
    from moeprune.llamacpp.rpc import WORKER_BINARY, pinned_protocol, probe

    port = _free_port()
    worker = Worker(port)
    try:
        worker.wait_serving()
        build = llama_build_shared
        assert any(line.startswith(f"rpc-worker: llama.cpp build {build.key} ") and
                   build.record["binaries"][WORKER_BINARY]["sha256"] in line for line in worker.lines), worker.lines
        info = probe(worker.endpoint)
        assert info.protocol == pinned_protocol(build.root)
        assert info.devices and all(total >= free > 0 for free, total in info.devices)
        assert fetch_build(worker.endpoint) == record_identity(build.record)  # its build, on the next port
        second = invoke("rpc-worker", "--port", str(port), timeout=300)
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert (f"rpc-worker 127.0.0.1:{port}: could not bind its build port 127.0.0.1:{port + 1}"
                in second.stderr.strip().splitlines()[-1]), second.stderr
    finally:
        worker.kill()
    with pytest.raises(RpcWorkerError, match="no build record"):  # it lived and died with the worker
        fetch_build(worker.endpoint, timeout_s=2)
    taken = _free_port()
    with socket.socket() as holder:  # only the RPC port is taken: ggml-rpc-server itself cannot bind
        holder.bind(("127.0.0.1", taken))
        holder.listen()
        third = invoke("rpc-worker", "--port", str(taken), timeout=300)
    assert third.returncode != 0 and "Traceback" not in third.stderr
    assert f"rpc-worker 127.0.0.1:{taken}: ggml-rpc-server could not bind" in third.stderr.strip().splitlines()[-1]
    greedy = invoke("rpc-worker", "--port", str(_free_port()), "--mem", str(10**9), timeout=300)
    assert greedy.returncode != 0 and "Traceback" not in greedy.stderr
    assert "fewer than --mem 1000000000" in greedy.stderr.strip().splitlines()[-1], greedy.stderr


def _doctored_cache(tmp_path: Path, build, name: str, **flags: str) -> Path:
    """A moeprune cache whose pinned build is the real one (the same binaries, linked) but whose
    build record says other CMake flags: what `invoke rpc-worker` on a node built otherwise serves."""
    from moeprune.llamacpp.build import RECORD_NAME
    from moeprune.llamacpp.source import cache_root

    cache = tmp_path / name
    home = cache / "llama.cpp" / build.key
    home.mkdir(parents=True)
    (cache / "src").symlink_to(cache_root() / "src")
    (home / "bin").symlink_to(build.bin_dir)
    record = {**build.record, "flags": {**build.record["flags"], **flags}}
    (home / RECORD_NAME).write_text(json.dumps(record))
    return cache


def _bare_rpc_server(build, port: int) -> subprocess.Popen:
    """The pinned ggml-rpc-server started by hand, without `invoke rpc-worker` (no build port)."""
    from moeprune.llamacpp.rpc import RpcWorkerError, probe

    process = subprocess.Popen([str(build.binary("ggml-rpc-server")), "--port", str(port), "--threads", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            probe(f"127.0.0.1:{port}", timeout_s=2)
            return process
        except RpcWorkerError:
            assert process.poll() is None and time.monotonic() < deadline, "the bare rpc-server did not start"
            time.sleep(0.2)


def _worker_lines(stderr: str, endpoint: str) -> list[str]:
    return [line for line in stderr.splitlines() if f"RPC worker {endpoint}" in line]


@pytest.mark.llamacpp
def test_check_refuses_a_worker_of_another_build_and_a_bare_rpc_server(tmp_path: Path, workers, llama_build_shared):
    """`invoke check` with four workers on loopback: the pinned build's, one whose record says CUDA
    (allowed to differ), one whose record says GGML_NATIVE=ON (must not), and a bare ggml-rpc-server.
    The last two get one line each naming the worker (and the field, or how to start it); without
    them the check passes."""
    build = llama_build_shared
    cuda = Worker(_free_port(), env={"MOEPRUNE_CACHE_DIR": str(_doctored_cache(
        tmp_path, build, "cuda", GGML_CUDA="ON", CMAKE_CUDA_ARCHITECTURES="90"))})
    native = Worker(_free_port(), env={"MOEPRUNE_CACHE_DIR": str(_doctored_cache(tmp_path, build, "native",
                                                                                 GGML_NATIVE="ON"))})
    bare_port = _free_port()
    bare = _bare_rpc_server(build, bare_port)
    try:
        cuda.wait_serving()
        native.wait_serving()
        assert any("GGML_CUDA=ON" in line for line in cuda.lines), cuda.lines  # its record, as it prints it
        same = workers[0].endpoint
        endpoints = [same, cuda.endpoint, native.endpoint, f"127.0.0.1:{bare_port}"]
        refused = invoke("check", "--recipe", str(_rpc_recipe(tmp_path, endpoints)), timeout=600)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert not _worker_lines(refused.stderr, same) and not _worker_lines(refused.stderr, cuda.endpoint)
        [line] = _worker_lines(refused.stderr, native.endpoint)
        assert "runs another llama.cpp build than this node (flags.GGML_NATIVE = ON there, OFF here)" in line, line
        [line] = _worker_lines(refused.stderr, f"127.0.0.1:{bare_port}")
        assert f"no build record on port {bare_port + 1}" in line and "`invoke rpc-worker --host 127.0.0.1" in line
        passed = invoke("check", "--recipe", str(_rpc_recipe(tmp_path, [same, cuda.endpoint])), timeout=600)
        assert passed.returncode == 0, passed.stderr[-3000:]
    finally:
        cuda.kill()
        native.kill()
        os.killpg(bare.pid, signal.SIGKILL)
        bare.wait(timeout=60)


@pytest.fixture(scope="module")
def demo_f32_gguf(tmp_path_factory, llama_build_shared) -> Path:
    """The demo base model as an F32 GGUF (a type no CPU backend repacks: see KLD_BOUNDS below)."""
    from moeprune.demo import MODEL_DIR
    from moeprune.llamacpp.convert import convert_to_gguf

    out = tmp_path_factory.mktemp("phase1-gguf") / "demo-base-F32.gguf"
    convert_to_gguf(llama_build_shared, MODEL_DIR, out, "f32", log_path=out.with_suffix(".log"))
    return out


def _profile_through_llama_server(runs: Path, name: str, gguf: Path, endpoints: list[str]) -> tuple[dict, list]:
    """`invoke profile` of the demo with phase 1 through llama-server: on the workers (every layer
    offloaded to them), or in one process (no layer offloaded); (profile.json, sequences)."""
    from moeprune.layout import RunLayout
    from moeprune.profile.generate import read_sequences

    layers = 99 if endpoints else 0
    path = _rpc_recipe(runs, endpoints, name=name) if endpoints else runs / f"{name}.toml"
    text = path.read_text() if endpoints else demo_recipe_text().replace('name = "demo"', f'name = "{name}"', 1)
    path.write_text(text.replace("[profile]\n", f'[profile]\ngenerate = "llama-server"\ngenerate_gguf = "{gguf}"\n'
                                                f"generate_n_gpu_layers = {layers}\n", 1))
    done = invoke("profile", "--recipe", str(path), "--no-progress", env={"MOEPRUNE_RUNS_DIR": str(runs)},
                  timeout=1800)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    layout = RunLayout.for_recipe(name, runs_dir=runs)
    return json.loads(layout.profile_summary_path.read_text()), read_sequences(layout.sequences_path)


def test_phase1_generation_on_two_workers_gives_the_single_process_sequences(tmp_path: Path, workers,
                                                                             demo_f32_gguf: Path, llama_build_shared):
    """`invoke profile` with profile.generate = "llama-server" and serve.rpc: llama-server gets --rpc,
    every layer goes to the two workers, the generated token ids equal the one-process run's, and
    profile.json records the workers and their build like results.json does."""
    endpoints = [w.endpoint for w in workers]
    spread, spread_sequences = _profile_through_llama_server(tmp_path, "spread", demo_f32_gguf, endpoints)
    alone, alone_sequences = _profile_through_llama_server(tmp_path, "alone", demo_f32_gguf, [])
    tokens = [[(r["id"], r["prompt_len"], r["input_ids"]) for r in run] for run in (spread_sequences, alone_sequences)]
    assert tokens[0] and tokens[0] == tokens[1]
    assert spread["phase1"]["generated"] == len(spread_sequences) and spread["num_response_tokens"] > 0
    recorded = spread["phase1"]["topology"]["rpc_workers"]
    assert [worker["endpoint"] for worker in recorded] == endpoints
    assert all(worker["devices"] and worker["build"] == {"key": llama_build_shared.key, "unlike_head": {},
               "llama_cpp_commit": llama_build_shared.record["source"]["llama_cpp_commit"]} for worker in recorded)
    assert alone["phase1"]["topology"] == {"rpc_workers": []}
    log = (tmp_path / "spread" / "logs" / "profile-phase1-llama-server.log").read_text()
    assert f"--rpc {','.join(endpoints)}" in log.splitlines()[0], log.splitlines()[:1]


def _samples(run: Path) -> dict[str, list[dict]]:
    """Every evaluated model's per-sample records (lm-eval's sample logs), by file."""
    out = {}
    for path in sorted((run / "eval").glob("*/samples_*.jsonl")):
        out[str(path.relative_to(run))] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


@pytest.fixture(scope="module")
def workers(llama_build_shared):
    started = [Worker(_free_port()), Worker(_free_port())]
    try:
        for worker in started:
            worker.wait_serving()
        yield started
    finally:
        for worker in started:
            worker.kill()


@pytest.fixture(scope="module")
def rpc_run(demo_run: Path, workers, tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """The demo run copied, evaluated and measured again with serve.rpc naming both workers."""
    runs = tmp_path_factory.mktemp("rpc-runs")
    shutil.copytree(demo_run, runs / "demo", symlinks=True)
    recipe = _rpc_recipe(runs, [w.endpoint for w in workers])
    env = {"MOEPRUNE_RUNS_DIR": str(runs)}
    for args in (["eval", "--recipe", str(recipe)], ["stage", "kld", "--recipe", str(recipe)]):
        done = invoke(*args, env=env, timeout=3600)
        assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return runs / "demo", recipe, env


def test_eval_with_two_workers_gives_the_single_process_samples(demo_run: Path, workers, rpc_run):
    run, _, _ = rpc_run
    alone, spread = _samples(demo_run), _samples(run)
    assert alone and alone == spread
    results = json.loads((run / "eval" / "results.json").read_text())
    for model, entry in results["models"].items():
        named = [worker["endpoint"] for worker in entry["topology"]["rpc_workers"]]
        assert named == [w.endpoint for w in workers], model
        assert all(worker["devices"] for worker in entry["topology"]["rpc_workers"])
        assert all(worker["build"]["key"] == entry["llamacpp_build"]["key"] and worker["build"]["unlike_head"] == {}
                   for worker in entry["topology"]["rpc_workers"])
        assert "--rpc" not in entry["server_flags"]
    single = json.loads((demo_run / "eval" / "results.json").read_text())
    assert all(entry["topology"] == {"rpc_workers": []} for entry in single["models"].values())
    for model in results["models"]:  # the same scores, from the same answers
        assert results["models"][model]["tasks"] == single["models"][model]["tasks"]


# Measured on the demo (CPU workers on loopback): KLD rows of types that llama.cpp's CPU backend
# repacks for its own weights (Q4_K, Q3_K, IQ4_XS here) differ from the single-process run by up
# to 2.4e-4 in mean KLD, 3e-3 in top-1 agreement and 0.1 % in PPL; F32, Q5_K and Q6_K rows are
# equal. A worker holds the weights in plain RPC buffers, so it runs the kernels of unrepacked
# weights: the same run in one process with --no-repack gives the workers' figures exactly.
KLD_BOUNDS = {"mean_kld": 1e-3, "top1_agreement": 5e-3, "rms_delta_p": 1e-3}
PPL_RELATIVE_BOUND = 5e-3


def test_kld_with_two_workers_records_them_and_differs_only_by_the_cpu_repack(demo_run: Path, workers, rpc_run):
    import shlex

    run, _, _ = rpc_run
    spread = json.loads((run / "eval" / "kld.json").read_text())
    alone = json.loads((demo_run / "eval" / "kld.json").read_text())
    assert [w["endpoint"] for w in spread["topology"]["rpc_workers"]] == [w.endpoint for w in workers]
    assert all(w["build"]["key"] == spread["llamacpp_build"] for w in spread["topology"]["rpc_workers"])
    assert alone["topology"] == {"rpc_workers": []}
    assert spread["reference"]["ppl"] == alone["reference"]["ppl"]
    rows = {row["label"]: row for row in alone["rows"]}
    for row in spread["rows"]:
        single = rows[row["label"]]
        assert "--rpc" not in row["command"]  # the workers are topology, not a setting
        for name, bound in KLD_BOUNDS.items():
            assert abs(row[name]["value"] - single[name]["value"]) <= bound, (row["label"], name)
        assert abs(row["ppl"]["value"] / single["ppl"]["value"] - 1) <= PPL_RELATIVE_BOUND, row["label"]
        if row["quant_type"] in ("F32", "Q5_K_S", "Q6_K"):  # no repacked kernels: equal
            assert {k: row[k] for k in KLD_BOUNDS} == {k: single[k] for k in KLD_BOUNDS}, row["label"]
    # The whole difference is the repack: one process with --no-repack gives the workers' rows.
    logged = (run / "logs" / "kld-base-Q4_K_M.log").read_text().splitlines()
    command = shlex.split(logged[0].removeprefix("$ "))
    at = command.index("--rpc")
    scored = [line for line in logged if line.split()[:1] == [str(spread["settings"]["chunks"])]]
    assert len(scored) == 1, logged
    outputs = []
    for _ in range(3):  # llama-perplexity can lose its last log lines (moeprune.llamacpp.perplexity)
        local = subprocess.run([*command[:at], *command[at + 2:], "--no-repack"], capture_output=True, text=True,
                               env={**os.environ, "OMP_WAIT_POLICY": "passive"}, timeout=600)
        outputs.append(local.stdout + local.stderr)
        if scored[0] in outputs[-1]:
            break
    assert scored[0] in outputs[-1], (scored[0], outputs[-1][-2000:])


def test_the_card_says_the_layers_were_split_over_the_workers(demo_run: Path, rpc_run):
    run, recipe, env = rpc_run
    done = invoke("card", "--recipe", str(recipe), env=env, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (run / "card" / "README.md").read_text()
    assert "its layers split over 2 llama.cpp RPC workers of this node's llama.cpp source and flags (build `" in card
    assert "RPC workers" not in (demo_run / "card" / "README.md").read_text()


def test_a_worker_killed_mid_eval_is_one_error_and_loses_nothing(workers, rpc_run):
    """SIGKILL one worker while llama-server answers: `invoke eval` ends in one line that names the
    workers, eval/ keeps the previous good results byte for byte, and no staging is left."""
    run, recipe, env = rpc_run
    before = {path.relative_to(run): path.read_bytes() for path in (run / "eval").rglob("*") if path.is_file()}
    partial = run / "logs" / "eval-base.samples.partial.jsonl"
    partial.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "invoke", "eval", "--recipe", str(recipe)], cwd=ROOT,
                               env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while not (partial.is_file() and partial.read_text().count("\n") >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no answer arrived"
            time.sleep(0.2)
        workers[1].kill()
        _, err = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0 and "Traceback" not in err
    # lm-eval's progress bar shares stderr (and, without a newline, the error's line)
    errors = [line[line.index("error:"):] for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1, err
    assert "llama-server" in errors[0] and "no results were written" in errors[0]
    assert f"RPC worker {workers[1].endpoint} of serve.rpc = {workers[0].endpoint}, {workers[1].endpoint}" in errors[0]
    after = {path.relative_to(run): path.read_bytes() for path in (run / "eval").rglob("*") if path.is_file()}
    assert after == before
    assert not list((run / "eval").glob(".*.tmp-*"))
