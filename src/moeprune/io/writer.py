"""Sharded safetensors writer: streams tensors into shards of at most ``max_shard_bytes``.

Tensors are added as byte *sources* (see :class:`BytesSource` and
``moeprune.io.checkpoint.FileRangesSource``), not as loaded arrays: a shard's header is written
first and then each source streams its bytes straight into the file, so memory stays at one copy
chunk however large the tensors are. A shard is flushed before the next tensor would push its
data past ``max_shard_bytes`` (a single larger tensor gets a shard of its own).

Everything is written into a temporary sibling directory; only when the ``with`` block ends
without an error are the shards renamed to ``model-0000i-of-0000N.safetensors``, the index
(exact ``weight_map`` and ``metadata.total_size``) written and the directory moved into place.
On any error the temporary directory is removed and no output directory appears.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol

from moeprune.atomic import WriteError as AtomicWriteError
from moeprune.atomic import atomic_dir
from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import INDEX_NAME

SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


class WriteError(MoepruneError):
    """The output checkpoint could not be written."""


class TensorSource(Protocol):
    """Bytes of one tensor, produced on demand."""

    nbytes: int

    def write_into(self, out_fd: int) -> None:
        """Append exactly ``nbytes`` bytes at the current position of ``out_fd``."""


class BytesSource:
    """A tensor already in memory (small tensors, tests)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data).cast("B")
        self.nbytes = self.data.nbytes

    def write_into(self, out_fd: int) -> None:
        view = self.data
        while view:
            written = os.write(out_fd, view)
            view = view[written:]


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorSource


def safetensors_header(entries: Sequence[tuple[str, str, Sequence[int], int]],
                       metadata: dict[str, str] | None) -> bytes:
    """Header bytes (length prefix + JSON padded to 8 bytes) for (name, dtype, shape, nbytes)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format allows trailing spaces; 8-byte alignment of the data
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Context manager writing a sharded safetensors checkpoint atomically into ``out_dir``.

    ``staging_dir`` is the temporary directory: put companion files (config, tokenizer) there
    and they move into place together with the shards. An existing ``out_dir`` is replaced only
    on success.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int, *, fsync: bool = True,
                 shard_metadata: dict[str, str] | None = None) -> None:
        if max_shard_bytes < 1:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.fsync = fsync
        self.shard_metadata = {"format": "pt"} if shard_metadata is None else shard_metadata
        self._stack = contextlib.ExitStack()
        self._staging: Path | None = None
        self._pending: list[_Entry] = []
        self._pending_nbytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temporary shard path, tensor names)
        self._names: set[str] = set()
        self.total_size = 0
        self.index: dict[str, object] | None = None

    # --- context management --------------------------------------------------------------
    def __enter__(self) -> ShardedWriter:
        try:
            self._staging = self._stack.enter_context(atomic_dir(self.out_dir))
        except (OSError, AtomicWriteError) as exc:
            reason = exc.reason if isinstance(exc, AtomicWriteError) else exc.strerror or exc
            raise WriteError(
                f"cannot create output directory next to {self.out_dir}: {reason}; choose a writable location"
            ) from None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if exc_type is None:
            try:
                self._finish()
            except OSError as error:
                wrapped = WriteError(f"writing {self.out_dir} failed: {error.strerror or error}")
                self._stack.__exit__(WriteError, wrapped, None)
                raise wrapped from None
            except BaseException as error:
                self._stack.__exit__(type(error), error, error.__traceback__)
                raise
            try:
                self._stack.__exit__(None, None, None)  # the rename into place
            except OSError as error:
                raise WriteError(f"moving the output into {self.out_dir} failed: {error.strerror or error}") from None
            return False
        if isinstance(exc, OSError) and not isinstance(exc, MoepruneError):
            wrapped = WriteError(f"writing {self.out_dir} failed: {exc.strerror or exc}")
            self._stack.__exit__(WriteError, wrapped, None)
            raise wrapped from None
        self._stack.__exit__(exc_type, exc, tb)  # removes the staging directory
        return False

    @property
    def staging_dir(self) -> Path:
        if self._staging is None:
            raise RuntimeError("use ShardedWriter as a context manager")
        return self._staging

    # --- adding tensors ------------------------------------------------------------------
    def add(self, name: str, dtype: str, shape: Sequence[int], source: TensorSource) -> None:
        """Queue one tensor; flushes the current shard first if this one would overflow it."""
        if name in self._names:
            raise ValueError(f"tensor '{name}' added twice")
        self._names.add(name)
        if self._pending and self._pending_nbytes + source.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending.append(_Entry(name, dtype, tuple(int(d) for d in shape), source))
        self._pending_nbytes += source.nbytes

    def add_bytes(self, name: str, dtype: str, shape: Sequence[int], data: bytes) -> None:
        """Queue a tensor given as raw bytes."""
        self.add(name, dtype, shape, BytesSource(data))

    # --- internals -----------------------------------------------------------------------
    def _flush(self) -> None:
        """Write the pending tensors as one shard (temporary name until the count is known)."""
        if not self._pending:
            return
        path = self.staging_dir / f".shard-{len(self._written) + 1:05d}.partial"
        header = safetensors_header(
            [(e.name, e.dtype, e.shape, e.source.nbytes) for e in self._pending], self.shard_metadata
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, header)
            expected_end = len(header)
            for entry in self._pending:
                entry.source.write_into(fd)
                expected_end += entry.source.nbytes
                position = os.lseek(fd, 0, os.SEEK_CUR)
                if position != expected_end:
                    raise WriteError(
                        f"tensor '{entry.name}': source wrote {position - expected_end + entry.source.nbytes} "
                        f"bytes, expected {entry.source.nbytes}"
                    )
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._written.append((path, [e.name for e in self._pending]))
        self.total_size += self._pending_nbytes
        self._pending = []
        self._pending_nbytes = 0

    def _finish(self) -> None:
        self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        for number, (path, names) in enumerate(self._written, start=1):
            final_name = SHARD_NAME.format(index=number, count=count)
            os.replace(path, self.staging_dir / final_name)
            weight_map.update((name, final_name) for name in names)
        self.index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        index_path = self.staging_dir / INDEX_NAME
        with open(index_path, "w", encoding="utf-8") as handle:
            json.dump(self.index, handle, indent=2)
            handle.write("\n")
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())

    @property
    def shard_names(self) -> list[str]:
        """Final shard file names (complete after the ``with`` block)."""
        count = len(self._written)
        return [SHARD_NAME.format(index=n, count=count) for n in range(1, count + 1)]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
