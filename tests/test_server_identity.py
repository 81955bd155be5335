"""Issue 22, item 4: only the llama-server this process started is ever "ready" or scored.

These tests need no llama.cpp: ``LlamaServer`` starts tests/fake_chat_server.py in llama-server's
place (it takes llama-server's flags, announces its port as llama-server does and answers /health
and /props), so every rule of ``LlamaServer`` is exercised against a real process on a real
port. The tests against real llama-servers are in test_eval.py and test_faults.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import moeprune.llamacpp.server as server_module
from moeprune.llamacpp.server import (
    LlamaServer,
    LlamaServerError,
    announced_port,
    identity_problem,
    listener_problem,
    stable_identity,
)
from moeprune.recipe import ServeSection

ROOT = Path(__file__).resolve().parents[1]
FAKE_SERVER = ROOT / "tests" / "fake_chat_server.py"
SERVE = ServeSection(ctx_size=512, n_gpu_layers=0, parallel=1, startup_timeout_s=20)


def _fake_build(tmp_path: Path, *extra: str, first_only: tuple[str, ...] = ()) -> SimpleNamespace:
    """A stand-in llama.cpp build whose ``llama-server`` is fake_chat_server.py with ``extra``
    arguments after llama-server's own (the last of a repeated option wins); ``first_only``
    arguments are added to the first start only."""
    marker = tmp_path / "started-once"
    script = tmp_path / "llama-server"
    first = " ".join(first_only)
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -e "{marker}" ]; then FIRST=""; else FIRST="{first}"; touch "{marker}"; fi\n'
        f'exec "{sys.executable}" "{FAKE_SERVER}" "$@" {" ".join(extra)} $FIRST\n'
    )
    script.chmod(0o755)
    return SimpleNamespace(binary=lambda name: script)


@pytest.fixture
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF-not-really")
    return path


@pytest.fixture
def rival(tmp_path):
    """Another server on 127.0.0.1 answering 200 on /health, with another identity."""
    process = subprocess.Popen([sys.executable, str(FAKE_SERVER), "--alias", "moeprune-rival",
                                "--model", str(tmp_path / "other.gguf")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline().split()[1])
        yield SimpleNamespace(port=port, pid=process.pid)
    finally:
        process.kill()
        process.wait()


# --- the pure checks -------------------------------------------------------------------------------
def test_identity_needs_our_alias_and_our_model_path():
    ours = {"model_alias": "moeprune-abc", "model_path": "/runs/demo/gguf/base-Q4_K_M.gguf"}
    assert identity_problem(ours, "moeprune-abc", "/runs/demo/gguf/base-Q4_K_M.gguf") is None
    assert "alias 'moeprune-rival'" in identity_problem({**ours, "model_alias": "moeprune-rival"}, "moeprune-abc",
                                                        ours["model_path"])
    assert "pruned-Q4_K_M.gguf" in identity_problem({**ours, "model_path": "/runs/demo/gguf/pruned-Q4_K_M.gguf"},
                                                    "moeprune-abc", ours["model_path"])
    assert identity_problem(None, "moeprune-abc", ours["model_path"]) == "GET /props gave no JSON object"
    assert identity_problem({"status": "ok"}, "moeprune-abc", ours["model_path"]) is not None


def test_stable_identity_keeps_no_alias_path_or_port():
    props = {"model_alias": "moeprune-abc", "model_path": "/home/me/runs/demo/gguf/base-Q4_K_M.gguf",
             "model_ftype": "Q4_K - Medium", "build_info": "b1-abc", "total_slots": 1,
             "default_generation_settings": {"n_ctx": 2048}}
    assert stable_identity(props) == {"model_file": "base-Q4_K_M.gguf", "model_ftype": "Q4_K - Medium",
                                      "build_info": "b1-abc", "total_slots": 1, "n_ctx": 2048}


def test_announced_port_is_read_from_llama_servers_log_line():
    log = "main: loading model\nsrv          main: listening on http://127.0.0.1:41234\n"
    assert announced_port(log) == 41234
    assert announced_port("srv  main: listening on http://0.0.0.0:41234\n") is None
    assert announced_port("main: loading model\n") is None


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="the socket owner is read from Linux's /proc")
def test_listener_check_names_a_port_held_by_another_process(rival):
    assert listener_problem(rival.pid, rival.port) is None
    problem = listener_problem(os.getpid(), rival.port)
    assert problem is not None and "another process" in problem
    free = server_module.socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert listener_problem(rival.pid, port) == f"nothing listens on port {port}"


# --- LlamaServer against fake llama-servers ------------------------------------------------------
def test_a_server_that_proves_itself_is_ready_and_records_its_identity(tmp_path, gguf):
    log = tmp_path / "server.log"
    with LlamaServer(_fake_build(tmp_path), gguf, SERVE, log) as server:
        assert server.flags[server.flags.index("--port") + 1] == "0"  # the kernel picks the port at bind
        assert server.identity == {"model_file": "model.gguf", "model_ftype": "fake", "build_info": "fake-build",
                                   "total_slots": 1, "n_ctx": 512}
        server.confirm_serving()
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait()
        with pytest.raises(LlamaServerError) as caught:
            server.confirm_serving()
    message = str(caught.value)
    assert "\n" not in message and "killed by SIGKILL (signal 9" in message and f"log: {log}" in message


def test_health_200_with_another_identity_is_never_ready(tmp_path, gguf):
    """Our own child answers /health 200 but /props names another alias: refused at once."""
    log = tmp_path / "server.log"
    with pytest.raises(LlamaServerError) as caught:
        with LlamaServer(_fake_build(tmp_path, "--props-alias", "moeprune-rival"), gguf, SERVE, log):
            pytest.fail("a server that did not prove its identity was reported ready")
    message = str(caught.value)
    assert "\n" not in message and "not the llama-server started here" in message
    assert "moeprune-rival" in message and f"log: {log}" in message


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="the socket owner is read from Linux's /proc")
def test_a_rival_on_the_announced_port_is_never_ready(tmp_path, gguf, rival, monkeypatch):
    """The port our child names is answered by another process, even one that knows our nonce
    and model path: the listening socket is not our child's, so it is refused."""
    monkeypatch.setattr(server_module, "new_alias", lambda: "moeprune-rival")
    rival_gguf = tmp_path / "other.gguf"
    rival_gguf.write_bytes(b"GGUF-not-really")
    with pytest.raises(LlamaServerError) as caught:
        with LlamaServer(_fake_build(tmp_path, "--announce-port", str(rival.port)), rival_gguf, SERVE,
                         tmp_path / "server.log"):
            pytest.fail("a rival's port was reported ready")
    assert "held by a socket of another process" in str(caught.value)


def test_a_bind_failure_is_retried_on_another_port(tmp_path, gguf, rival):
    """The first start cannot bind (the port is the rival's): it exits, and the next start, on a
    port the kernel picks, is the one used; the rival is never 'ready'."""
    build = _fake_build(tmp_path, first_only=("--port", str(rival.port)))
    with LlamaServer(build, gguf, SERVE, tmp_path / "server.log") as server:
        assert server.port != rival.port and (tmp_path / "started-once").exists()
        assert server.identity["model_file"] == "model.gguf"


def test_a_requested_port_taken_after_the_look_fails_in_one_line(tmp_path, gguf, rival, monkeypatch):
    """A port the user asked for, free when looked at and taken before the child binds it: the
    child exits, the start fails naming the bind, and the rival's 200 is never 'ready'."""
    monkeypatch.setattr(server_module, "port_is_free", lambda port, host="127.0.0.1": True)
    log = tmp_path / "server.log"
    with pytest.raises(LlamaServerError) as caught:
        with LlamaServer(_fake_build(tmp_path), gguf, SERVE, log, port=rival.port):
            pytest.fail("the rival on the requested port was reported ready")
    message = str(caught.value)
    assert "\n" not in message and f"could not bind 127.0.0.1:{rival.port}" in message and f"log: {log}" in message


def test_extra_flags_may_not_replace_the_identity_nonce(tmp_path, gguf):
    with pytest.raises(LlamaServerError, match="--alias"):
        LlamaServer(_fake_build(tmp_path), gguf, SERVE, tmp_path / "server.log", extra_flags=["--alias", "x"])
