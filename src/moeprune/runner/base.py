"""The runner interface: run one stage command (an ``invoke`` task line) somewhere.

A stage command is the argument list of ``invoke`` after the program name, e.g.
``["prune", "--recipe", "recipes/demo.toml"]``. :class:`NativeRunner` runs it here in a
subprocess; :class:`~moeprune.runner.docker.DockerRunner` runs the very same list as the
command of a container of the moeprune image (whose entry point is ``invoke``). Host paths are
mounted at the same absolute paths inside the container and the working directory is the same,
so relative paths in the command and absolute paths in outputs mean the same thing both ways.
"""

from __future__ import annotations

import abc
import collections
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

LOG_TAIL_LINES = 40
# Environment variables whose values are secrets: passed through, never printed.
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
REDACTED = "***"
MIN_SECRET_CHARS = 4

Stream = Callable[[str], None]


def _print_line(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Mount:
    """A host path made visible to the stage.

    ``target`` defaults to the same absolute path as ``source`` (what keeps paths identical in
    and out of the container). Native runs ignore mounts: the host paths are already there.
    """

    source: Path
    target: str | None = None
    read_only: bool = False

    @property
    def container_path(self) -> str:
        return self.target or str(Path(self.source).resolve())


@dataclass(frozen=True)
class RunnerResult:
    """What happened when a stage command ran."""

    runner: str
    argv: tuple[str, ...]
    exit_code: int
    duration_s: float
    log_path: Path | None
    environment: dict[str, Any] = field(default_factory=dict)
    """The runner's record (``Runner.describe()``); for docker it holds the image id/digests."""

    def record(self) -> dict[str, Any]:
        """JSON-able summary for manifests and lock files."""
        return {
            "runner": self.runner,
            "argv": list(self.argv),
            "exit_code": self.exit_code,
            "duration_s": round(self.duration_s, 3),
            "log_path": str(self.log_path) if self.log_path else None,
            "environment": self.environment,
        }


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret variables (HF_TOKEN, ...) present in ``env`` (default os.environ)."""
    env = os.environ if env is None else env
    return [env[name] for name in SECRET_ENV_VARS if len(env.get(name, "")) >= MIN_SECRET_CHARS]


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``***``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, REDACTED)
    return text


class LogSink:
    """Receives a stage's output: redacts secrets, streams lines, appends to a log file,
    and keeps the last lines for error messages. Handles chunks that split lines."""

    def __init__(self, log_path: Path | None, stream: Stream | None, secrets: Iterable[str]) -> None:
        self.log_path = log_path
        self.stream = stream
        self.secrets = list(secrets)
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._partial = ""
        self._handle: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(log_path, "a", encoding="utf-8")

    def write(self, chunk: str) -> None:
        text = self._partial + chunk
        *lines, self._partial = text.split("\n")
        for line in lines:
            self._line(line)

    def _line(self, line: str) -> None:
        line = redact(line.rstrip("\r"), self.secrets)
        self.tail.append(line)
        if self._handle is not None:
            self._handle.write(line + "\n")
            self._handle.flush()
        if self.stream is not None:
            self.stream(line)

    def note(self, message: str) -> None:
        """A line from the runner itself (not the stage)."""
        self._line(f"[moeprune runner] {message}")

    def close(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def tail_text(self) -> str:
        return "\n".join(self.tail) if self.tail else "(no output)"


class Runner(abc.ABC):
    """Runs stage commands. Get one with :func:`moeprune.runner.get_runner`."""

    kind: str

    def __init__(self, mounts: Sequence[Mount] = (), workdir: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.mounts = list(mounts)
        self.workdir = Path(workdir) if workdir else None
        self.env = dict(env or {})

    @abc.abstractmethod
    def run_stage(
        self,
        argv: Sequence[str],
        *,
        mounts: Sequence[Mount] = (),
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        stream: Stream | None = _print_line,
    ) -> RunnerResult:
        """Run ``invoke <argv...>``; stream its output; return a RunnerResult.

        ``mounts`` and ``env`` add to those the runner was made with. Output lines (secrets
        redacted) go to ``stream`` and are appended to ``log_path``. Raises StageFailedError
        (non-zero exit, with the log tail), ContainerKilledError, DockerUnavailableError or
        ImageNotFoundError; always cleans up what it started, also on Ctrl-C.
        """

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What the manifest records about where stages ran."""

    def _workdir(self) -> Path:
        return (self.workdir or Path.cwd()).resolve()

    @staticmethod
    def _started() -> float:
        return time.monotonic()
