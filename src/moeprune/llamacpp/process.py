"""Child tools (converter, quantizer, imatrix, perplexity) that die with their parent.

Each tool runs in a process group of its own (so the whole group can be signalled at once) and,
on Linux, with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): when the Python
process that started it dies, even by ``kill -9``, the kernel kills the tool too, so no orphaned
``convert_hf_to_gguf.py`` keeps writing while a rerun starts. An exception or Ctrl-C in the parent
kills the group before it propagates.

Note: Linux sends the parent-death signal when the *thread* that started the child exits; start
tools from a thread that lives as long as the work (the main thread, as the stages do).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 5.0


def die_with_parent() -> None:
    """In the child, before exec: own process group, and SIGKILL when the parent dies (Linux).

    If the parent already died between fork and prctl, exit at once (the kernel would not signal).
    """
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:
            os._exit(1)


@dataclass(frozen=True)
class ToolResult:
    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def kill_group(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left (also after a clean exit of
    the leader: its children must not survive)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)


def run_tool(command: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> ToolResult:
    """Run ``command`` to completion, capturing its output, as a child that dies with us."""
    process = subprocess.Popen(
        [str(part) for part in command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, cwd=cwd, text=True, errors="replace",
        preexec_fn=die_with_parent if os.name == "posix" else None,
    )
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        kill_group(process)
        raise
    # Nothing of the tool's group may outlive it (helpers it started, for instance).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return ToolResult(tuple(str(part) for part in command), process.returncode, stdout or "", stderr or "")


def write_tool_log(log_path: Path | None, command: list[str], output: str) -> str | None:
    """Write a tool's log; return why it could not be written (never raise: the log must not hide
    the tool's own outcome)."""
    if log_path is None:
        return None
    try:
        from moeprune.atomic import write_text

        write_text(Path(log_path), f"$ {' '.join(str(c) for c in command)}\n{output}")
    except Exception as exc:  # noqa: BLE001 - WriteError, OSError...: reported next to the real outcome
        return f"the log {log_path} could not be written ({exc})"
    return None
