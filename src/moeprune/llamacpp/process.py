"""Child tools (converter, quantizer, imatrix, perplexity) that die with their parent.

Each tool runs in a process group of its own (so the whole group can be signalled at once) and,
on Linux, with a parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``): when the Python
process that started it dies, even by ``kill -9``, the kernel kills the tool too, so no orphaned
``convert_hf_to_gguf.py`` keeps writing while a rerun starts. An exception or Ctrl-C in the parent
kills the group before it propagates.

Note: Linux sends the parent-death signal when the *thread* that started the child exits; start
tools from a thread that lives as long as the work (the main thread, as the stages do).

A tool that fails is reported in one line (:func:`failure_line`): its cause (a signal, a full disk,
a file-size limit, or the tool's own last error line) and where its whole output is.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoepruneError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 5.0
MAX_CAUSE_CHARS = 300

# Messages of the C library and of Python for a write that found no room, first match wins.
_RESOURCE_CAUSES = (
    ("No space left on device", "disk full (No space left on device)"),
    ("Disk quota exceeded", "disk quota exceeded (Disk quota exceeded)"),
    ("File too large", "file-size limit reached (File too large)"),
)
_ERROR_LINE_RE = re.compile(r"\b(error|failed|fatal|abort(ed)?|exception)\b|terminate called|what\(\):", re.IGNORECASE)
_TRACEBACK_HEAD = "Traceback (most recent call last):"


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


class ToolError(MoepruneError):
    """A tool that failed; the message is :func:`failure_line`'s one line."""


@dataclass(frozen=True)
class ToolResult:
    command: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _python_exception_line(lines: list[str]) -> str | None:
    """The exception line of the last Python traceback in ``lines`` (``KeyError: 'architectures'``)."""
    starts = [index for index, line in enumerate(lines) if line.startswith(_TRACEBACK_HEAD)]
    if not starts:
        return None
    for line in lines[starts[-1] + 1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return None


def last_error_line(output: str, *, or_last_line: bool = True) -> str | None:
    """The line of a tool's output that says what went wrong, or None when none does.

    A Python traceback's exception line; else the last line that reads like an error; else
    (``or_last_line``) the last line printed.
    """
    lines = output.splitlines()
    found = _python_exception_line(lines)
    if found is None:
        errors = [line.strip() for line in lines if _ERROR_LINE_RE.search(line)]
        last = next((line.strip() for line in reversed(lines) if line.strip()), None) if or_last_line else None
        found = errors[-1] if errors else last
    if found is not None and len(found) > MAX_CAUSE_CHARS:
        found = found[: MAX_CAUSE_CHARS - 3] + "..."
    return found


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def failure_line(
    tool: str,
    returncode: int,
    output: str,
    log_path: Path | None,
    *,
    writing: Path | None = None,
    cause: str | None = None,
    log_problem: str | None = None,
) -> str:
    """One line saying why ``tool`` failed and where its whole output is.

    ``returncode`` as subprocess gives it (negative: killed by that signal; 0: a tool that exited
    0 and still failed, then ``cause`` says how). ``writing`` names the file the tool was writing
    (said when a file-size limit stopped it); ``cause`` replaces the cause read from ``output``;
    ``log_problem`` says why the log could not be written. The whole output stays in the log, so
    a summary table or a terminal shows one readable line, never a tool's traceback. E.g.::

        llama-quantize killed by SIGXFSZ (signal 25: file-size limit reached writing X); log: L
        convert_hf_to_gguf.py failed: ValueError: Failed to detect model architecture (exit 1); log: L
        llama-quantize failed: disk full (No space left on device) (exit 1); log: L
    """
    resource = next((text for needle, text in _RESOURCE_CAUSES if needle in output), None)
    if returncode < 0:
        number = -returncode
        detail = f"signal {number}"
        if number == getattr(signal, "SIGXFSZ", -1):
            detail += ": file-size limit reached" + (f" writing {writing}" if writing else "")
        elif cause or resource:
            detail += f": {cause or resource}"
        what = f"killed by {_signal_name(number)} ({detail})"
    else:
        reason = cause or resource or last_error_line(output) or "no output"
        what = reason if returncode == 0 else f"failed: {reason} (exit {returncode})"
    where = f"; {log_problem}" if log_problem else (f"; log: {log_path}" if log_path else "")
    return f"{tool} {what}{where}"


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


def run_logged(
    command: list[str],
    log_path: Path | None,
    tool: str,
    *,
    env: dict[str, str] | None = None,
    writing: Path | None = None,
) -> str:
    """Run a tool (:func:`run_tool`), write its whole output to ``log_path``, return the output.

    A non-zero exit raises :class:`ToolError` with :func:`failure_line`'s one line; a log that
    could not be written is said next to that line, or warned about after a success.
    """
    result = run_tool(command, env=env)
    log_problem = write_tool_log(log_path, command, result.output)
    if result.returncode != 0:
        raise ToolError(failure_line(tool, result.returncode, result.output, log_path, writing=writing,
                                     log_problem=log_problem))
    if log_problem:
        print(f"warning: {log_problem}", file=sys.stderr)
    return result.output


def no_output_error(tool: str, output: str, missing: Path, log_path: Path | None) -> ToolError:
    """A tool that exited 0 without writing its output file (one line, as :func:`failure_line`)."""
    return ToolError(failure_line(tool, 0, output, log_path, cause=f"exited 0 but wrote no {Path(missing).name}"))
