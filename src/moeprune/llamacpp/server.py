"""llama-server as a context manager: started on 127.0.0.1, ready once it proves it is ours, always stopped.

::

    with LlamaServer(build, gguf_path, recipe.serve, log_path) as server:
        requests.post(server.base_url + "/v1/chat/completions", ...)
        server.confirm_serving()  # the answers came from this server

Whatever answers on a port is not necessarily the process that was started for it: a port that
was free when looked at can be taken by another server before ours binds it, and then that
server's answers would be scored as ours. Hence:

- no port is picked in advance: llama-server is started with ``--port 0`` and binds a port the
  kernel chooses, which it then announces in its log ("listening on http://127.0.0.1:N");
- "ready" needs all of: our child alive, the listening socket on that port held by our child
  (``/proc``, on Linux), GET /health 200, and GET /props naming the random alias (a nonce) and
  the model path this process passed;
- a bind failure is retried on another port, never "ready";
- :meth:`LlamaServer.confirm_serving` checks the same after the work, so a server that died or
  was replaced meanwhile voids it.

The server runs in its own process group (``start_new_session``) and the whole group is
killed on exit, on error and on Ctrl-C, so no llama-server outlives the ``with`` block. Its
output goes to ``log_path``; every failure is one line naming the cause and the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.process import failure_line, kill_group, last_error_line
from moeprune.llamacpp.rpc import RPC_FAILURES, rpc_flags, silent_workers
from moeprune.recipe import ServeSection

HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.25
NO_GPU_WARNING = "no usable GPU found"  # llama.cpp common/arg.cpp, printed for --n-gpu-layers
STOP_GRACE_S = 10.0
PORT_RACE_ATTEMPTS = 5
ALIAS_PREFIX = "moeprune-"
ANY_PORT = 0  # llama-server binds a port the kernel chooses and announces it
_LISTENING_RE = re.compile(rf"listening on https?://{re.escape(HOST)}:(\d+)\b")
_TCP_LISTEN_STATE = "0A"  # include/net/tcp_states.h, as /proc/net/tcp shows it


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
    return flags + rpc_flags(serve.rpc)


def _get(host: str, port: int, path: str, timeout_s: float = 2.0) -> tuple[int, bytes] | None:
    """(HTTP status, body) of GET ``path``, or None when nothing answers."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _health_status(host: str, port: int, timeout_s: float = 2.0) -> int | None:
    """HTTP status of GET /health, or None when nothing answers."""
    answer = _get(host, port, "/health", timeout_s)
    return answer[0] if answer is not None else None


def read_props(host: str, port: int, timeout_s: float = 2.0) -> Any:
    """The decoded JSON of GET /props (llama-server's own description), None if there is none."""
    answer = _get(host, port, "/props", timeout_s)
    if answer is None or answer[0] != 200:
        return None
    try:
        return json.loads(answer[1])
    except ValueError:
        return None


def _bind_failed(log_text: str) -> bool:
    """llama-server's log says it could not bind its port (tools/server/server-http.cpp)."""
    return "couldn't bind" in log_text or "Address already in use" in log_text


def new_alias() -> str:
    """A model alias no other server has: the nonce a started server must answer with."""
    return ALIAS_PREFIX + secrets.token_hex(12)


def identity_problem(props: Any, alias: str, model_path: str) -> str | None:
    """Why a /props answer is not from the server started with ``--alias alias --model model_path``
    (None when it is). llama-server reports the first alias as ``model_alias`` and the
    ``--model`` argument as ``model_path`` (tools/server/server-context.cpp, get_res_props)."""
    if not isinstance(props, dict):
        return "GET /props gave no JSON object"
    if props.get("model_alias") != alias:
        return f"GET /props names the alias {props.get('model_alias')!r}, not this server's {alias!r}"
    if props.get("model_path") != model_path:
        return f"GET /props serves {props.get('model_path')!r}, not {model_path!r}"
    return None


def stable_identity(props: dict[str, Any]) -> dict[str, Any]:
    """What a proven server said about itself that two equal evaluations share (no alias, pid,
    port or directory): the served file's name, its type, the build and the slots."""
    settings = props.get("default_generation_settings")
    return {
        "model_file": Path(str(props.get("model_path"))).name,
        "model_ftype": props.get("model_ftype"),
        "build_info": props.get("build_info"),
        "total_slots": props.get("total_slots"),
        "n_ctx": settings.get("n_ctx") if isinstance(settings, dict) else None,
    }


def announced_port(log_text: str) -> int | None:
    """The port llama-server says it listens on ("listening on http://127.0.0.1:N"), if it did."""
    found = _LISTENING_RE.findall(log_text)
    return int(found[-1]) if found else None


def _listening_inodes(pid: int, port: int) -> set[int]:
    """Socket inodes listening on TCP ``port`` (any address) in ``pid``'s network namespace."""
    inodes = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
            if len(fields) > 9 and fields[3] == _TCP_LISTEN_STATE and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets open in process ``pid`` (its /proc/<pid>/fd links ``socket:[N]``)."""
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while we looked
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def listener_problem(pid: int, port: int) -> str | None:
    """Why the TCP listener on ``port`` is not process ``pid``'s alone (None when it is).

    Read from /proc; where there is no /proc (not Linux) the /props nonce alone proves identity.
    """
    if not Path("/proc/self/net/tcp").exists():
        return None
    listening = _listening_inodes(pid, port)
    if not listening:
        return f"nothing listens on port {port}"
    foreign = listening - _socket_inodes(pid)
    if foreign:
        return f"port {port} is held by a socket of another process, not by llama-server (pid {pid})"
    return None


class LlamaServer:
    """Run llama-server for the duration of a ``with`` block.

    ``base_url`` ("http://127.0.0.1:PORT"), ``flags`` (the CLI flags used) and ``identity``
    (what the proven server said about itself, :func:`stable_identity`) are set on enter.
    ``port`` None lets llama-server bind a port the kernel chooses; a given port that is in use is
    an error. ``extra_flags`` are appended after the recipe's flags (not ``--alias``: the alias
    is the nonce the server proves its identity with).
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
        if {"-a", "--alias"} & set(self.extra_flags):
            raise LlamaServerError("extra_flags may not set --alias: it is the nonce llama-server proves it is ours with")
        self.env = env
        self.alias = new_alias()
        self.port: int | None = None
        self.flags: list[str] = []
        self.identity: dict[str, Any] = {}
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
        """Start llama-server and wait until it proves it is ready and ours (or fail in one line)."""
        if not self.gguf_path.is_file():
            raise LlamaServerError(f"{self.gguf_path}: GGUF not found; convert/quantize it first")
        binary = self.build.binary("llama-server")
        if self.requested_port is not None:
            if not port_is_free(self.requested_port):
                raise LlamaServerError(
                    f"port {self.requested_port} on {HOST} is already in use; stop what is using it, "
                    "pass another port, or pass none to use a free one"
                )
        # A bind failure (the requested port taken after the look above; with --port 0 only when
        # the kernel has no port left) is never "ready": the child exits, and another port is tried.
        attempts = 1 if self.requested_port is not None else PORT_RACE_ATTEMPTS
        for attempt in range(1, attempts + 1):
            self.port = None
            self._launch(binary)
            try:
                self._wait_ready()
                return
            except LlamaServerError:
                if attempt < attempts and self._lost_port_race():
                    self.stop()
                    continue
                raise

    def _lost_port_race(self) -> bool:
        """The server exited because it could not bind its port."""
        if self.process is None or self.process.poll() is None:
            return False
        return _bind_failed(self._log_text())

    def _launch(self, binary: Path) -> None:
        port = self.requested_port if self.requested_port is not None else ANY_PORT
        self.flags = [
            "--host", HOST, "--port", str(port), *server_flags(self.serve), *self.extra_flags,
            "--alias", self.alias,
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

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        """Poll until the child announces its port, holds it, answers /health and proves its
        identity on /props; a child that exits first fails, and so does one whose port answers
        with another server's identity."""
        assert self.process is not None
        deadline = time.monotonic() + self.serve.startup_timeout_s
        waiting_for = "its log to say which port it listens on"
        while True:
            code = self.process.poll()
            if code is not None:
                raise self._died_error(code, starting=True)
            if self.port is None:
                self.port = announced_port(self._log_text())
                if self.port is not None and self.requested_port not in (None, self.port):
                    raise LlamaServerError(
                        f"llama-server listens on port {self.port}, not the requested {self.requested_port}; "
                        f"log: {self.log_path}")
            if self.port is not None:
                status = _health_status(HOST, self.port)
                waiting_for = f"GET {self.base_url}/health to answer 200 (it answered {status})"
                if status == 200:
                    self._prove_identity()
                    self._refuse_cpu_fallback()
                    return
            if time.monotonic() > deadline:
                raise LlamaServerError(
                    f"llama-server did not become ready within serve.startup_timeout_s = "
                    f"{self.serve.startup_timeout_s:g} s (waited for {waiting_for}); log: {self.log_path}"
                )
            time.sleep(POLL_INTERVAL_S)

    def _identity_problem(self) -> tuple[str | None, dict[str, Any] | None]:
        """(why what answers on our port is not our child, None when it is; its /props)."""
        assert self.process is not None and self.port is not None
        if self.process.poll() is not None:
            return "it is no longer running", None
        problem = listener_problem(self.process.pid, self.port)
        if problem is not None:
            return problem, None
        props = read_props(HOST, self.port)
        problem = identity_problem(props, self.alias, str(self.gguf_path))
        if problem is None and self.process.poll() is not None:  # answered, then died: not proven
            problem = "it exited while proving its identity"
        return problem, props

    def _prove_identity(self) -> None:
        problem, props = self._identity_problem()
        if problem is not None:
            code = self.process.poll() if self.process is not None else None
            if code is not None:
                raise self._died_error(code, starting=True)
            raise LlamaServerError(
                f"what answers on {HOST}:{self.port} is not the llama-server started here ({problem}); "
                f"nothing was sent to it; log: {self.log_path}")
        assert props is not None
        self.identity = stable_identity(props)

    def confirm_serving(self) -> None:
        """Raise LlamaServerError (one line, naming the log) unless the server started here is still
        running, still holds its port and still proves its identity: call it after the work whose
        answers must have come from this server."""
        self.check_alive()
        problem, _ = self._identity_problem()
        if problem is not None:
            self.check_alive()
            raise LlamaServerError(
                f"the llama-server started here no longer answers on {self.base_url} ({problem}); "
                f"what it served is void; log: {self.log_path}")

    def _refuse_cpu_fallback(self) -> None:
        """llama-server only warns when it cannot offload (no GPU, or a CPU-only build) and then
        runs everything on the CPU; with serve.n_gpu_layers > 0 that is an error, not a warning.
        A build with GGML_RPC counts the RPC backend as one that can offload and does not warn, so
        a CPU-only build without serve.rpc workers is refused on the build record too."""
        if self.serve.n_gpu_layers <= 0:
            return
        if NO_GPU_WARNING in self._log_text() or not (self.build.cuda or self.serve.rpc):
            self.stop()
            raise LlamaServerError(
                f"serve.n_gpu_layers = {self.serve.n_gpu_layers}, but llama-server found no usable GPU "
                f"(\"{NO_GPU_WARNING}\" in {self.log_path}) and would run on the CPU: build llama.cpp with "
                "CUDA (llamacpp.cuda = \"on\") on a machine with a GPU, or set serve.n_gpu_layers = 0"
            )

    def _died_error(self, code: int, starting: bool) -> LlamaServerError:
        """One line: how the server ended, why (from its log), and the log."""
        text = self._log_text()
        if _bind_failed(text):
            cause = f"it could not bind {HOST}:{self.port or self.requested_port or 'its port'} (in use)"
        elif starting and ("failed to load model" in text or "error loading model" in text):
            detail = next((line.strip() for line in text.splitlines() if "error loading model" in line), None)
            cause = f"it could not load {self.gguf_path}" + (f" ({detail})" if detail else "")
        else:
            # An error line of its own, if it printed one (not our command line, not its last info line).
            said = last_error_line(text.split("\n", 1)[1] if "\n" in text else "", or_last_line=False)
            cause = ("it stopped while starting" if starting else "it died while serving") + (f": {said}" if said else "")
            if self.serve.rpc and any(failure in text for failure in RPC_FAILURES):
                gone = silent_workers(self.serve.rpc) or self.serve.rpc
                cause += (f" (RPC worker {', '.join(gone)} of serve.rpc = {', '.join(self.serve.rpc)} "
                          "stopped answering)")
        return LlamaServerError(failure_line("llama-server", code, text, self.log_path, cause=cause))

    def check_alive(self) -> None:
        """Raise LlamaServerError (one line, naming the log) if the server process has exited."""
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
