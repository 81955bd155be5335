"""Run a stage command here, in a subprocess of this Python."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune.runner.base import LogSink, Mount, Runner, RunnerResult, Stream, _print_line, redact, secret_values
from moeprune.runner.errors import RunnerError, StageFailedError

TERMINATE_GRACE_S = 10


def default_project_root() -> Path:
    """The directory holding tasks.py: the checkout this package was installed from."""
    return Path(__file__).resolve().parents[3]


class NativeRunner(Runner):
    """``python -m invoke --search-root <project> <argv...>`` in a subprocess.

    The stage runs with this interpreter (so this venv) and the project's tasks.py; mounts are
    ignored (host paths are already visible).
    """

    kind = "native"

    def __init__(self, project_root: Path | None = None, mounts: Sequence[Mount] = (),
                 workdir: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        super().__init__(mounts=mounts, workdir=workdir, env=env)
        self.project_root = Path(project_root or default_project_root()).resolve()
        if not (self.project_root / "tasks.py").is_file():
            raise RunnerError(
                f"{self.project_root}: no tasks.py here; the native runner needs the moeprune "
                "checkout (pass project_root)"
            )

    def command(self, argv: Sequence[str]) -> list[str]:
        """The full command line run for a stage."""
        return [sys.executable, "-m", "invoke", "--search-root", str(self.project_root), *argv]

    def run_stage(
        self,
        argv: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        stream: Stream | None = _print_line,
    ) -> RunnerResult:
        full_env = {**os.environ, **self.env, **(env or {})}
        secrets = secret_values(full_env)
        sink = LogSink(log_path, stream, secrets)
        command = self.command(argv)
        started = time.monotonic()
        sink.note(f"native: {' '.join(argv)}")
        try:
            # Own process group: Ctrl-C cleanup can stop the stage and everything it started.
            process = subprocess.Popen(
                command, cwd=self._workdir(), env=full_env, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
                start_new_session=True,
            )
        except OSError as exc:
            sink.close()
            raise RunnerError(redact(f"could not start {' '.join(command)}: {exc}", secrets)) from None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                sink.write(line)
            exit_code = process.wait()
        except BaseException:
            _stop_group(process)
            sink.close()
            raise
        sink.close()
        duration_s = time.monotonic() - started
        if exit_code != 0:
            how = (f"was killed by signal {-exit_code} ({_signal_name(-exit_code)})" if exit_code < 0
                   else f"exited with status {exit_code}")
            where = f"; full log: {log_path}" if log_path else ""
            raise StageFailedError(
                redact(f"stage `invoke {' '.join(argv)}` {how} (native run){where}\n"
                       f"--- last lines ---\n{sink.tail_text()}", secrets),
                exit_code=exit_code, log_tail=sink.tail_text(),
            )
        return RunnerResult(self.kind, tuple(argv), exit_code, duration_s, log_path, self.describe())

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "python": platform.python_version(),
            "executable": sys.executable,
            "platform": platform.platform(),
        }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def _stop_group(process: subprocess.Popen[str]) -> None:
    """Terminate the stage's process group, then kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
