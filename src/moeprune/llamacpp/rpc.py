"""llama.cpp's RPC backend: workers that hold part of a served model's layers.

A worker is one ``ggml-rpc-server`` of the pinned build (``invoke rpc-worker`` on each node);
the recipe's ``serve.rpc = ["host:port", ...]`` gives llama-server and llama-perplexity
``--rpc``, and llama.cpp splits the offloaded layers (``serve.n_gpu_layers``) across the workers
in proportion to their free memory.

What can be checked over the wire (:func:`probe`; ``ggml/src/ggml-rpc/ggml-rpc.cpp``): that the
worker answers, its RPC protocol version (``HELLO``: major.minor.patch; the patch changes with
ggml's operator list, so an equal version means the same graph operators) and each device's free
and total memory (``DEVICE_COUNT``, ``GET_DEVICE_MEMORY``). What cannot: the worker's llama.cpp
commit, CMake flags and binary. So ``invoke rpc-worker`` also serves its build record, read-only,
on the next port (:func:`build_port`: rpc port + 1), from a thread of the same process, so it
lives and dies with the worker: ``GET /moeprune-rpc-build`` answers :func:`build_document`.
The head fetches it (:func:`fetch_build`) and compares it with its own build
(:func:`build_differences`; :data:`BUILD_FIELDS_MAY_DIFFER` is the one rule of what may differ).
A bare ``ggml-rpc-server`` has no such port, so its build is unknown and it is refused.

The server answers one client at a time: a probe while llama-server is connected waits, so probes
run before a server starts (a timeout says the worker is busy or gone). The build port answers any
time.

Request: ``cmd (1 byte) | size (u64) | payload``; response: ``size (u64) | payload``, native
(little-endian) byte order.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

WORKER_BINARY = "ggml-rpc-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052  # rpc-server's own default
PROBE_TIMEOUT_S = 10.0
START_TIMEOUT_S = 60.0
# enum rpc_cmd in ggml-rpc.cpp (RPC_CMD_HELLO is asserted to stay 14 there).
CMD_GET_DEVICE_MEMORY = 11
CMD_HELLO = 14
CMD_DEVICE_COUNT = 15
CONN_CAPS_SIZE = 24  # transport.h: RPC_CONN_CAPS_SIZE; all zero = plain TCP
PROTOCOL_HEADER = Path("ggml/include/ggml-rpc.h")
_PROTO_RE = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")
_BIND_FAILED = "Failed to create server socket"
# What llama.cpp's RPC client aborts with when a worker is gone (ggml-rpc.cpp).
RPC_FAILURES = ("Remote RPC server crashed", "Failed to connect to")
BUILD_PATH = "/moeprune-rpc-build"
BUILD_FORMAT = "moeprune-rpc-build/1"
# What of a worker's build may differ from the head's (build_identity's field names); every other
# field must be equal. Allowed: the device backend (a CUDA worker serves a CPU head: GGML_CUDA and
# its CUDA architectures) and what follows from it and from the compiler's version, which differ
# between unlike nodes without changing the graph operators or the protocol (the build key, the
# binary's sha256). Everything else must agree: the llama.cpp source (commit and the pinned
# archive's sha256) fixes the operators, their CPU kernels and the protocol; GGML_RPC/RDMA the
# transport; GGML_NATIVE and CMAKE_BUILD_TYPE which CPU kernels run and how they are compiled; and
# the rest of moeprune's flags are constant, so a difference there means another moeprune.
BUILD_FIELDS_MAY_DIFFER = ("key", "worker_sha256", "flags.GGML_CUDA", "flags.CMAKE_CUDA_ARCHITECTURES")


class RpcWorkerError(MoepruneError):
    """An RPC worker cannot be used: it does not answer, speaks another protocol or lacks memory."""


def parse_endpoint(text: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); ValueError naming the entry otherwise (the recipe says which field)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or any(c.isspace() for c in text):
        raise ValueError(f"entry {text!r} is not \"host:port\" (a host name or address, a port 1-65535)")
    return host, int(port)


def rpc_flags(endpoints: Sequence[str]) -> list[str]:
    """The ``--rpc`` flag of llama-server and llama-perplexity for ``serve.rpc`` ([] without workers)."""
    return ["--rpc", ",".join(endpoints)] if endpoints else []


@dataclass(frozen=True)
class WorkerInfo:
    """What one worker said about itself over the wire."""

    endpoint: str
    protocol: str
    devices: tuple[tuple[int, int], ...]
    """(free bytes, total bytes) of each device it serves."""
    build: dict[str, Any] | None = None
    """Its build as recorded (:func:`build_record_entry`), once fetched and compared with the head's."""

    @property
    def free_bytes(self) -> int:
        return sum(free for free, _ in self.devices)

    def record(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "protocol": self.protocol,
                "devices": [{"free_bytes": free, "total_bytes": total} for free, total in self.devices],
                **({"build": self.build} if self.build is not None else {})}


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("it closed the connection")
        data += chunk
    return data


def _call(sock: socket.socket, cmd: int, payload: bytes, answer_size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv_exact(sock, 8))
    if size != answer_size:
        raise ConnectionError(f"command {cmd} answered {size} bytes, not {answer_size}: not an RPC server of this protocol")
    return _recv_exact(sock, size)


def probe(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Connect, say HELLO, read every device's memory; one line naming the worker on failure."""
    host, port = parse_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            hello = _call(sock, CMD_HELLO, bytes(CONN_CAPS_SIZE), 4 + CONN_CAPS_SIZE)
            protocol = "{}.{}.{}".format(*hello[:3])
            (count,) = struct.unpack("<I", _call(sock, CMD_DEVICE_COUNT, b"", 4))
            devices = tuple(
                struct.unpack("<QQ", _call(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16))
                for index in range(count))
    except TimeoutError:
        raise RpcWorkerError(f"RPC worker {endpoint}: no answer within {timeout_s:g} s (busy serving another "
                             "client, or not an rpc-server); start it with `invoke rpc-worker`") from None
    except (OSError, ConnectionError) as exc:
        raise RpcWorkerError(f"RPC worker {endpoint}: {exc}; start it there with "
                             f"`invoke rpc-worker --host {host} --port {port}`") from None
    return WorkerInfo(endpoint, protocol, devices)


def silent_workers(endpoints: Sequence[str], timeout_s: float = 2.0) -> list[str]:
    """The workers that do not answer now (asked after a client of theirs failed)."""
    silent = []
    for endpoint in endpoints:
        try:
            probe(endpoint, timeout_s)
        except RpcWorkerError:
            silent.append(endpoint)
    return silent


def pinned_protocol(source_root: Path) -> str:
    """The RPC protocol version of the pinned llama.cpp source (``ggml-rpc.h``)."""
    path = Path(source_root) / PROTOCOL_HEADER
    found = dict(_PROTO_RE.findall(path.read_text(encoding="utf-8")))
    if set(found) != {"MAJOR", "MINOR", "PATCH"}:
        raise MoepruneError(f"{path}: no RPC_PROTO_MAJOR/MINOR/PATCH_VERSION; is this llama.cpp built with GGML_RPC?")
    return f"{found['MAJOR']}.{found['MINOR']}.{found['PATCH']}"


def worker_problems(infos: Sequence[WorkerInfo], protocol: str, need_bytes: int | None) -> list[str]:
    """Why these workers cannot serve (one line each, naming the worker; [] when they can).

    ``need_bytes``: what the offloaded layers need in all; llama.cpp splits them by free memory,
    so the workers' free memory together must hold them."""
    problems = [f"RPC worker {info.endpoint} speaks RPC protocol {info.protocol}, the pinned llama.cpp {protocol}: "
                "run `invoke rpc-worker` from the same moeprune checkout there" for info in infos
                if info.protocol != protocol]
    problems += [f"RPC worker {info.endpoint} reports no device" for info in infos if not info.devices]
    free = sum(info.free_bytes for info in infos)
    if need_bytes is not None and infos and free < need_bytes:
        each = ", ".join(f"{info.endpoint} {info.free_bytes / 2**20:.0f} MiB" for info in infos)
        problems.append(f"RPC workers have {free / 2**20:.0f} MiB free together ({each}), the offloaded layers "
                        f"need {need_bytes / 2**20:.0f} MiB: add a worker or lower serve.n_gpu_layers")
    return problems


# --- the build a worker runs (its second port) ----------------------------------------------------
def build_port(rpc_port: int) -> int:
    """Where a worker serves its build record: the next port (one rule, so the head needs no setting)."""
    return rpc_port + 1


def build_identity(key: str, commit: str | None, source_sha256: str | None, flags: dict[str, str],
                   worker_sha256: str | None) -> dict[str, str | None]:
    """A llama.cpp build as the head and its workers compare it, one flat field per fact (the names
    :data:`BUILD_FIELDS_MAY_DIFFER` and the refusals use)."""
    return {"key": key, "llama_cpp_commit": commit, "source_sha256": source_sha256, "worker_sha256": worker_sha256,
            **{f"flags.{name}": str(value) for name, value in sorted(flags.items())}}


def record_identity(record: dict[str, Any]) -> dict[str, str | None]:
    """:func:`build_identity` of a finished build's ``build_record.json``."""
    source = record.get("source", {})
    return build_identity(record.get("key", ""), source.get("llama_cpp_commit"), source.get("pin_sha256"),
                          record.get("flags", {}), record.get("binaries", {}).get(WORKER_BINARY, {}).get("sha256"))


def build_document(record: dict[str, Any], rpc_port: int) -> dict[str, Any]:
    """What a worker's build port answers: its build, and the RPC port it belongs to."""
    return {"format": BUILD_FORMAT, "rpc_port": rpc_port, "build": record_identity(record)}


def build_differences(head: dict[str, Any], worker: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, head's value, worker's value) of every field that differs and must not."""
    return [(name, head.get(name), worker.get(name)) for name in sorted(set(head) | set(worker))
            if name not in BUILD_FIELDS_MAY_DIFFER and head.get(name) != worker.get(name)]


def build_record_entry(head: dict[str, Any], worker: dict[str, Any]) -> dict[str, Any]:
    """A verified worker's build as results.json, kld.json, profile.json record it: its key, its
    llama.cpp commit and the fields it may have, and has, unlike the head's."""
    return {"key": worker.get("key"), "llama_cpp_commit": worker.get("llama_cpp_commit"),
            "unlike_head": {name: worker.get(name) for name in BUILD_FIELDS_MAY_DIFFER
                            if name != "key" and worker.get(name) != head.get(name)}}


def _start_hint(endpoint: str) -> str:
    host, port = parse_endpoint(endpoint)
    return (f"start it there with `invoke rpc-worker --host {host} --port {port}`, which also serves its build "
            f"on port {build_port(port)} (open that port to this node too)")


def fetch_build(endpoint: str, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """The build identity a worker serves on its build port; one line naming the worker otherwise."""
    host, port = parse_endpoint(endpoint)
    url = f"http://{host}:{build_port(port)}{BUILD_PATH}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:
            document = json.loads(answer.read(1 << 20))
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RpcWorkerError(f"RPC worker {endpoint}: no build record on port {build_port(port)} ({reason}), so its "
                             f"llama.cpp build is unknown (a bare {WORKER_BINARY}?); {_start_hint(endpoint)}") from None
    except ValueError:
        document = None
    if (not isinstance(document, dict) or document.get("format") != BUILD_FORMAT
            or not isinstance(document.get("build"), dict)):
        raise RpcWorkerError(f"RPC worker {endpoint}: port {build_port(port)} answers, but not with a moeprune "
                             f"rpc-worker build record ({BUILD_FORMAT}); {_start_hint(endpoint)}")
    if document.get("rpc_port") != port:
        raise RpcWorkerError(f"RPC worker {endpoint}: the build record on port {build_port(port)} belongs to the worker "
                             f"on port {document.get('rpc_port')}, not {port}; give each worker on a host its own "
                             "pair of ports (rpc port and the next)")
    return document["build"]


def build_problem(endpoint: str, head: dict[str, Any], worker: dict[str, Any]) -> str | None:
    """One line naming the worker and each field where its build differs from the head's (None: none)."""
    differing = build_differences(head, worker)
    if not differing:
        return None
    fields = "; ".join(f"{name} = {there} there, {here} here" for name, here, there in differing)
    return (f"RPC worker {endpoint} runs another llama.cpp build than this node ({fields}): run `invoke rpc-worker` "
            "there from the same moeprune commit and recipe [llamacpp] section")


def verified_build(endpoint: str, head: dict[str, Any]) -> dict[str, Any]:
    """The worker's build as recorded (:func:`build_record_entry`), once it proved to match ``head``."""
    worker = fetch_build(endpoint)
    problem = build_problem(endpoint, head, worker)
    if problem is not None:
        raise RpcWorkerError(problem)
    return build_record_entry(head, worker)


def topology(endpoints: Sequence[str], head_record: dict[str, Any]) -> dict[str, Any]:
    """Where a served model ran, as results.json, kld.json and profile.json record it: the workers as
    they answered just before serving (protocol, memory, build), or none (every layer in this process).
    A worker whose build differs from ``head_record``'s (this node's ``build_record.json``) is refused."""
    head = record_identity(head_record)
    return {"rpc_workers": [replace(probe(endpoint), build=verified_build(endpoint, head)).record()
                            for endpoint in endpoints]}


# --- the worker ---------------------------------------------------------------------------------
def worker_command(binary: Path, host: str, port: int, threads: int | None) -> list[str]:
    command = [str(binary), "--host", host, "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command


def build_line(record: dict[str, Any]) -> str:
    """The worker's build, as it prints it on start (and serves on its build port)."""
    flags = record.get("flags", {})
    commit = record.get("source", {}).get("llama_cpp_commit", "unknown")
    sha = record.get("binaries", {}).get(WORKER_BINARY, {}).get("sha256", "unknown")
    return (f"rpc-worker: llama.cpp build {record.get('key')} (commit {str(commit)[:12]}, GGML_RPC={flags.get('GGML_RPC')}, "
            f"GGML_CUDA={flags.get('GGML_CUDA')}), {WORKER_BINARY} sha256 {sha}")


class _BuildHandler(BaseHTTPRequestHandler):
    """Answers ``GET /moeprune-rpc-build`` with the worker's build document; nothing else."""

    body = b""
    timeout = 5  # a silent client cannot hold the port

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        found = self.path == BUILD_PATH
        body = self.body if found else b"not found\n"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json" if found else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # one line per probe is noise in the worker's output


@contextmanager
def serving_build(host: str, rpc_port: int, record: dict[str, Any]) -> Iterator[int]:
    """Serve ``record``'s :func:`build_document` on ``host``:``build_port(rpc_port)`` from a thread
    of this process while the block runs; yields that port. One line if it cannot bind."""
    port = build_port(rpc_port)
    if port > 65535:
        raise RpcWorkerError(f"rpc-worker {host}:{rpc_port}: its build port would be {port}; choose a lower --port")
    handler = type("Handler", (_BuildHandler,), {"body": json.dumps(build_document(record, rpc_port)).encode()})
    try:
        server = HTTPServer((host, port), handler)
    except OSError as exc:
        raise RpcWorkerError(f"rpc-worker {host}:{rpc_port}: could not bind its build port {host}:{port} "
                             f"({exc.strerror or exc}); choose another --port (it uses that port and the next)") from None
    thread = threading.Thread(target=server.serve_forever, name=f"rpc-build-{port}", daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        server.server_close()


def _wait_answering(process: subprocess.Popen[bytes], endpoint: str, log_path: Path) -> WorkerInfo:
    """The worker's own answer: it runs, holds the port (/proc: not another process that had it
    first) and answers the protocol."""
    from moeprune.llamacpp.server import listener_problem

    deadline = time.monotonic() + START_TIMEOUT_S
    port = parse_endpoint(endpoint)[1]
    while True:
        code = process.poll()
        text = log_path.read_text(errors="replace") if log_path.is_file() else ""
        if code is not None or _BIND_FAILED in text:
            why = f"could not bind {endpoint} (in use?)" if _BIND_FAILED in text else f"exited with {code}"
            raise RpcWorkerError(f"rpc-worker {endpoint}: {WORKER_BINARY} {why}; log: {log_path}")
        if listener_problem(process.pid, port) is None:
            try:
                return probe(endpoint, timeout_s=5.0)
            except RpcWorkerError:
                pass
        if time.monotonic() > deadline:
            raise RpcWorkerError(f"rpc-worker {endpoint}: no answer within {START_TIMEOUT_S:g} s; log: {log_path}")
        time.sleep(0.2)


def run_worker(binary: Path, record: dict[str, Any], host: str, port: int, *, mem_mb: int | None,
               threads: int | None, log_path: Path, say: Callable[[str], None]) -> int:
    """Run one worker in the foreground until it ends (Ctrl-C or a signal stops it).

    ``mem_mb``: refuse to serve unless its devices report at least this much free memory
    (this llama.cpp's rpc-server has no memory cap of its own: llama.cpp sizes each worker's share
    by what it reports). Returns the worker's exit status.
    """
    from moeprune.llamacpp.process import kill_group
    from moeprune.llamacpp.process import die_with_parent

    endpoint = f"{host}:{port}"
    say(build_line(record))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with serving_build(host, port, record) as record_port:  # bound first: a taken port fails before the worker starts
        with open(log_path, "wb") as log:
            process = subprocess.Popen(worker_command(binary, host, port, threads), stdin=subprocess.DEVNULL,
                                       stdout=log, stderr=subprocess.STDOUT,  # own group, dies with us
                                       preexec_fn=die_with_parent if os.name == "posix" else None)
        try:
            info = _wait_answering(process, endpoint, log_path)
            free_mb = info.free_bytes // 2**20
            if mem_mb is not None and free_mb < mem_mb:
                raise RpcWorkerError(f"rpc-worker {endpoint}: its devices have {free_mb} MiB free, fewer than "
                                     f"--mem {mem_mb}; free memory there or lower --mem")
            say(f"rpc-worker: serving {endpoint} (RPC protocol {info.protocol}, {free_mb} MiB free, pid {process.pid}; "
                f"build record on port {record_port}); log: {log_path}")
            return process.wait()
        finally:
            kill_group(process, 5.0)


def worker_log_path(cache: Path, host: str, port: int) -> Path:
    """Where a worker's own output goes (one worker per endpoint at a time)."""
    return cache / "rpc-worker" / f"{host}-{port}.log"
