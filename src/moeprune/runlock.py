"""One writer per run: an exclusive ``flock`` on the run directory, held for the whole task.

Two writers on one run interleave: one's leftover sweep deletes the other's half-written GGUF,
both rewrite ``run.lock.json`` from their own copy. So every task that writes a run holds this
lock from start to end, and a second one fails at once, naming the holder, or waits (``--wait``).

The flock is the truth: the kernel drops it when its holder exits, however it exits (``kill -9``
included), so a lock is never stale. ``.writer.json`` beside it names the holder (pid, command,
start time, a token) only for the message a second writer prints; it is written atomically
after the lock is taken and removed before it is released.

Once the lock is taken no other writer of this run is alive, so every temporary a killed writer
left anywhere in the run (``.NAME.tmp-*``: a partial GGUF of a killed convert can be many GB) is
removed then. A live writer's temporaries are never touched: that writer holds the lock.

A process that the holder starts for part of its work (``invoke stage NAME`` in the container)
gets the holder's token in ``$MOEPRUNE_RUN_WRITER``; finding it in ``.writer.json`` while the
lock is held, it works under the holder's lock instead of waiting for it. Within one process the
lock is re-entrant (a task that runs the pipeline takes it once).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout

WRITER_ENV = "MOEPRUNE_RUN_WRITER"
TEMPORARY_PATTERN = ".*.tmp-*"  # moeprune.atomic's temporary siblings, and the tools' own

_held: set[Path] = set()  # run directories this process holds


class RunInUse(MoepruneError):
    """Another live process writes this run."""


@dataclass(frozen=True)
class Writer:
    """The holder of a run, as ``.writer.json`` records it."""

    pid: int
    command: str
    since_unix: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since_unix))
        return f"PID {self.pid} ({self.command}) since {since}"


def read_writer(layout: RunLayout) -> Writer | None:
    """The recorded holder, or None when there is no readable record (the text is only a hint)."""
    try:
        data = json.loads(layout.writer_path.read_text(encoding="utf-8"))
        return Writer(int(data["pid"]), str(data["command"]), float(data["since_unix"]), str(data["token"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shown(path: Path) -> str:
    """``runs/demo`` when the run is below the working directory, else the absolute path."""
    absolute = Path(path).absolute()
    try:
        return absolute.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(absolute)


def in_use(layout: RunLayout, writer: Writer | None) -> str:
    """``runs/demo is in use by PID 1234 (invoke reproduce) since ... UTC``."""
    return f"{shown(layout.root)} is in use by {writer.describe() if writer else 'another process'}"


def stale_temporaries(root: Path) -> list[Path]:
    """Every ``.NAME.tmp-*`` file or directory below ``root`` (not below another one; links not followed)."""
    found = []
    for directory, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            if fnmatch.fnmatchcase(name, TEMPORARY_PATTERN):
                found.append(Path(directory) / name)
        dirs[:] = [d for d in dirs if not fnmatch.fnmatchcase(d, TEMPORARY_PATTERN)]
    return sorted(found)


def _remove(path: Path) -> None:
    """Best effort: a leftover that cannot go (a read-only run) costs disk space, never the run."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _first_missing(path: Path) -> Path | None:
    """The topmost directory of ``path`` that does not exist yet (None if it exists)."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _remove_if_empty(path: Path, up_to: Path) -> None:
    """A task that wrote nothing leaves no directory behind: remove the empty ones it created."""
    for directory in (path, *path.parents):
        try:
            directory.rmdir()
        except OSError:
            return
        if directory == up_to:
            return


def _record(layout: RunLayout, command: str, token: str) -> None:
    """Write ``.writer.json``; only a hint for others' messages, so a run that cannot take it
    (a read-only run directory) still runs, and fails on its real output if at all."""
    with contextlib.suppress(MoepruneError, OSError):
        write_json(layout.writer_path, {"pid": os.getpid(), "command": command, "since_unix": time.time(),
                                        "token": token})


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _same_directory(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _acquire(layout: RunLayout, wait: bool, say: Callable[[str], Any]) -> tuple[int | None, Path | None]:
    """The descriptor that holds the run's flock (None: we work under the holder that started
    us), and the topmost directory this call created (None if the run existed)."""
    while True:
        created = _first_missing(layout.root.absolute())
        layout.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(layout.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if not _try_lock(fd):
                writer = read_writer(layout)
                if writer is not None and writer.token == os.environ.get(WRITER_ENV):
                    os.close(fd)
                    return None, None
                if not wait:
                    raise RunInUse(f"{in_use(layout, writer)}; wait for it or pass --wait")
                say(f"{in_use(layout, writer)}; waiting")
                fcntl.flock(fd, fcntl.LOCK_EX)  # Ctrl-C interrupts it
        except BaseException:
            os.close(fd)
            raise
        if _same_directory(fd, layout.root):
            return fd, created
        os.close(fd)  # the holder removed the (empty) run directory we waited on: lock the new one


@contextlib.contextmanager
def run_writer(layout: RunLayout, command: str, *, wait: bool = False,
               say: Callable[[str], Any] = _stderr) -> Iterator[None]:
    """Hold ``layout``'s run as its one writer for the ``with`` block (see the module docstring).

    Raises :class:`RunInUse` at once when another process holds it, unless ``wait``.
    """
    if layout.root.exists() and layout.root.resolve() in _held:  # this process holds it already
        yield
        return
    fd, created = _acquire(layout, wait, say)
    if fd is None:  # started by the holder to do part of its work: its lock covers us
        yield
        return
    key = layout.root.resolve()
    try:
        for leftover in stale_temporaries(key):
            _remove(leftover)
        token = secrets.token_hex(16)
        _record(layout, command, token)
        outer_token = os.environ.get(WRITER_ENV)
        os.environ[WRITER_ENV] = token
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            if outer_token is None:
                os.environ.pop(WRITER_ENV, None)
            else:
                os.environ[WRITER_ENV] = outer_token
            with contextlib.suppress(OSError):
                layout.writer_path.unlink()  # before the flock goes, so a next holder's record stays
            if created is not None:
                _remove_if_empty(key, created.resolve())
    finally:
        os.close(fd)  # releases the flock


def child_env() -> dict[str, str]:
    """The environment that lets a process this writer starts work under its lock."""
    token = os.environ.get(WRITER_ENV)
    return {WRITER_ENV: token} if token else {}
