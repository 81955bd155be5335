"""Outputs appear whole or not at all: write to a temporary path, rename on success.

A write that fails for a reason of the machine (disk full, read-only file system, no
permission) ends as :class:`WriteError`, a MoepruneError naming the output and what to do, and
leaves the previous output in place and no temporary sibling behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

# errno values that mean "this machine cannot store the output": the user frees space or
# fixes permissions, then reruns.
DISK_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "the file is too large for this file system (or ulimit -f)",
}


class WriteError(MoepruneError):
    """An output could not be written; the previous version (if any) is unchanged.

    ``reason`` is the cause in words (e.g. "the disk is full"), for callers that word their own message.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def describe_write_error(final: Path, exc: OSError, what: str | None = None) -> str:
    """One line: which output, why (errno in words plus the file the OS named), what to do."""
    reason = DISK_ERRNOS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(final) else ""
    todo = ("free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else f"make {Path(final).parent} writable")
    return (f"{final}: cannot write {what or 'this output'}: {reason}{where}; {todo}, then rerun "
            f"(the previous {Path(final).name}, if any, is unchanged)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success replace ``final`` with it.

    On any exception the temporary directory is removed and ``final`` is left as it was; an
    OSError of the disk (full, read-only, no permission) becomes a WriteError naming ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        if is_disk_error(exc):
            raise WriteError(describe_write_error(final, exc), DISK_ERRNOS[exc.errno]) from None
        raise
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        replace_dir(tmp, final)
    except OSError as exc:
        _remove_tree(tmp)
        if is_disk_error(exc):
            raise WriteError(describe_write_error(final, exc), DISK_ERRNOS[exc.errno]) from None
        raise
    except BaseException:
        _remove_tree(tmp)
        raise
    _fsync_dir(final.parent)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put directory ``tmp`` in place of ``final`` (a file, directory or link, or nothing)."""
    if final.exists() or final.is_symlink():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove_tree(trash)
        os.replace(final, trash)
        try:
            os.replace(tmp, final)
        except OSError:
            os.replace(trash, final)  # put the good output back
            raise
        _remove_tree(trash)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def atomic_file(final: Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Open a temporary sibling file for writing; rename it to ``final`` on success."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
        os.close(fd)
    except OSError as exc:
        if is_disk_error(exc):
            raise WriteError(describe_write_error(final, exc), DISK_ERRNOS[exc.errno]) from None
        raise
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        kwargs = {} if "b" in mode else {"encoding": encoding}
        handle = open(tmp, mode, **kwargs)
        try:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(OSError):  # a failing close must not hide the first error
                handle.close()
        os.replace(tmp, final)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_error(exc):
            raise WriteError(describe_write_error(final, exc), DISK_ERRNOS[exc.errno]) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


def write_json(final: Path, value: Any) -> None:
    """Write JSON atomically, indented, with sorted keys and a trailing newline."""
    with atomic_file(final) as handle:
        json.dump(value, handle, indent=2, sort_keys=True, ensure_ascii=False)
        handle.write("\n")


def write_text(final: Path, text: str) -> None:
    """Write text atomically."""
    with atomic_file(final) as handle:
        handle.write(text)
