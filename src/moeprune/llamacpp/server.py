"""llama-server as a context manager: started on 127.0.0.1, ready when /health says 200, always stopped.

::

    with LlamaServer(build, gguf_path, recipe.serve, log_path) as server:
        requests.post(server.base_url + "/v1/chat/completions", ...)

The server runs in its own process group (``start_new_session``) and the whole group is
killed on exit, on error and on Ctrl-C, so no llama-server outlives the ``with`` block. A free
port taken by another process before llama-server binds it (a port race) is retried on another. Its
output goes to ``log_path``; every failure message quotes the log's tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.process import kill_group
from moeprune.recipe import ServeSection

HOST = "127.0.0.1"
LOG_TAIL_LINES = 40
POLL_INTERVAL_S = 0.25
NO_GPU_WARNING = "no usable GPU found"  # llama.cpp common/arg.cpp, printed for --n-gpu-layers
STOP_GRACE_S = 10.0
PORT_RACE_ATTEMPTS = 5


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL us when the parent dies.

    Covers the cases no ``finally`` can: the Python process killed with SIGKILL or SIGTERM.
    """
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# Process groups of every llama-server this Python process started (see leftover_servers).
_started_groups: set[int] = set()


def process_group_members(pgid: int) -> list[int]:
    """Living (non-zombie) processes in process group ``pgid``, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def leftover_servers() -> list[int]:
    """PIDs still alive in any llama-server process group this process started (should be [])."""
    return sorted(pid for pgid in _started_groups for pid in process_group_members(pgid))


class LlamaServerError(MoepruneError):
    """llama-server could not be started, or stopped working."""


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def server_flags(serve: ServeSection) -> list[str]:
    """llama-server flags derived from the recipe's [serve] section (host/port/model excluded)."""
    flags = [
        "--ctx-size", str(serve.ctx_size),
        "--n-gpu-layers", str(serve.n_gpu_layers),
        "--jinja",
        "--reasoning-format", serve.reasoning_format,
        "--reasoning-budget", str(serve.reasoning_budget),
        "--parallel", str(serve.parallel),
        "--seed", str(serve.seed),
        "--no-webui",  # an API server: the UI is not built (LLAMA_BUILD_UI=OFF) and not wanted
    ]
    if serve.parallel > 1 and serve.kv_unified:
        flags.append("--kv-unified")  # every slot may use the whole context, not ctx_size / parallel
    if serve.threads is not None:
        flags += ["--threads", str(serve.threads)]
    if serve.dry_multiplier:
        flags += ["--dry-multiplier", f"{serve.dry_multiplier:g}"]
    return flags


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a log file ('(empty log)' when there is nothing)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = "\n".join(text.rstrip().splitlines()[-lines:])
    return tail or "(empty log)"


def _health_status(host: str, port: int, timeout_s: float = 2.0) -> int | None:
    """HTTP status of GET /health, or None when nothing answers."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


class LlamaServer:
    """Run llama-server for the duration of a ``with`` block.

    ``base_url`` ("http://127.0.0.1:PORT") and ``flags`` (the CLI flags used) are set on enter.
    ``port`` None picks a free port; a given port that is in use is an error.
    ``extra_flags`` are appended after the recipe's flags (e.g. ``["--alias", "model"]``).
    """

    def __init__(
        self,
        build: LlamaCppBuild,
        gguf_path: Path,
        serve: ServeSection,
        log_path: Path,
        *,
        port: int | None = None,
        extra_flags: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.build = build
        self.gguf_path = Path(gguf_path)
        self.serve = serve
        self.log_path = Path(log_path)
        self.requested_port = port
        self.extra_flags = list(extra_flags or [])
        self.env = env
        self.port: int | None = None
        self.flags: list[str] = []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise LlamaServerError("llama-server is not running (use LlamaServer as a context manager)")
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> LlamaServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start llama-server and wait until GET /health returns 200 (or fail with the log tail)."""
        if not self.gguf_path.is_file():
            raise LlamaServerError(f"{self.gguf_path}: GGUF not found; convert/quantize it first")
        binary = self.build.binary("llama-server")
        if self.requested_port is not None:
            if not port_is_free(self.requested_port):
                raise LlamaServerError(
                    f"port {self.requested_port} on {HOST} is already in use; stop what is using it, "
                    "pass another port, or pass none to use a free one"
                )
        # A free port is only free when it was looked at: another process may bind it before
        # llama-server does. Then the server exits with "couldn't bind"; try another port.
        attempts = 1 if self.requested_port is not None else PORT_RACE_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port if self.requested_port is not None else free_port()
            self._launch(binary)
            try:
                self._wait_healthy()
                return
            except LlamaServerError:
                if attempt < attempts and self._lost_port_race():
                    self.stop()
                    continue
                raise

    def _lost_port_race(self) -> bool:
        """The server exited because its port was taken after we picked it."""
        if self.process is None or self.process.poll() is None:
            return False
        tail = log_tail(self.log_path)
        return "couldn't bind" in tail or "Address already in use" in tail

    def _launch(self, binary: Path) -> None:
        assert self.port is not None
        self.flags = [
            "--host", HOST, "--port", str(self.port), *server_flags(self.serve), *self.extra_flags,
        ]
        command = [str(binary), "--model", str(self.gguf_path), *self.flags]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        # LLAMA_ARG_* variables would silently change the server's settings: the recipe decides.
        env = {key: value for key, value in env.items() if not key.startswith("LLAMA_ARG_")}
        with open(self.log_path, "wb") as log:  # one log per server run
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # own process group: killed as one on stop()
                preexec_fn=_die_with_parent if os.uname().sysname == "Linux" else None,
            )
        _started_groups.add(self.process.pid)

    def _wait_healthy(self) -> None:
        assert self.process is not None and self.port is not None
        deadline = time.monotonic() + self.serve.startup_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._died_error(code, starting=True)
            if _health_status(HOST, self.port) == 200 and self.process.poll() is None:
                self._refuse_cpu_fallback()
                return  # (ours: a process that lost the port race has exited)
            if time.monotonic() > deadline:
                raise LlamaServerError(
                    f"llama-server did not become healthy within serve.startup_timeout_s = "
                    f"{self.serve.startup_timeout_s:g} s (GET {self.base_url}/health); log: {self.log_path}\n"
                    f"--- last lines of the log ---\n{log_tail(self.log_path)}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _refuse_cpu_fallback(self) -> None:
        """llama-server only warns when it cannot offload (no GPU, or a CPU-only build) and then
        runs everything on the CPU; with serve.n_gpu_layers > 0 that is an error, not a warning."""
        if self.serve.n_gpu_layers <= 0:
            return
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return
        if NO_GPU_WARNING in text:
            self.stop()
            raise LlamaServerError(
                f"serve.n_gpu_layers = {self.serve.n_gpu_layers}, but llama-server found no usable GPU "
                f"(\"{NO_GPU_WARNING}\" in {self.log_path}) and would run on the CPU: build llama.cpp with "
                "CUDA (llamacpp.cuda = \"on\") on a machine with a GPU, or set serve.n_gpu_layers = 0"
            )

    def _died_error(self, code: int, starting: bool) -> LlamaServerError:
        tail = log_tail(self.log_path)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        if "couldn't bind" in tail:
            reason = f"it could not bind {HOST}:{self.port} (port in use?)"
        elif starting and ("failed to load model" in tail or "error loading model" in tail):
            reason = f"it could not load {self.gguf_path}"
        elif starting:
            reason = "it stopped while starting"
        else:
            reason = "it died while serving"
        return LlamaServerError(
            f"llama-server ({how}): {reason}; log: {self.log_path}\n--- last lines of the log ---\n{tail}"
        )

    def check_alive(self) -> None:
        """Raise LlamaServerError (with the log tail) if the server process has exited."""
        if self.process is None:
            raise LlamaServerError("llama-server is not running (use LlamaServer as a context manager)")
        code = self.process.poll()
        if code is not None:
            raise self._died_error(code, starting=False)

    def stop(self) -> None:
        """Stop the server's whole process group: SIGTERM, then SIGKILL after a grace period."""
        if self.process is not None:
            kill_group(self.process, STOP_GRACE_S)

    # --- requests --------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, Any]], timeout_s: float = 600.0, **params: Any) -> dict[str, Any]:
        """POST /v1/chat/completions and return the decoded JSON response.

        If the request fails because the server died, the error says so and quotes the log.
        """
        body = json.dumps({"messages": messages, **params}).encode()
        assert self.port is not None
        connection = http.client.HTTPConnection(HOST, self.port, timeout=timeout_s)
        try:
            connection.request(
                "POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._wait_briefly_for_exit()
            self.check_alive()
            raise LlamaServerError(f"request to {self.base_url}/v1/chat/completions failed: {exc}") from None
        finally:
            connection.close()
        if response.status != 200:
            raise LlamaServerError(
                f"{self.base_url}/v1/chat/completions answered HTTP {response.status}: {payload[:1000]!r}"
            )
        return json.loads(payload)

    def _wait_briefly_for_exit(self) -> None:
        # A dropped connection often arrives a moment before the process is reaped.
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2.0)
