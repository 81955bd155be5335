"""Lazy, validated reading of a safetensors checkpoint: one file, or shards plus an index.

Opening a checkpoint reads only the shard headers: every shard named by the index must exist,
parse with ``safetensors.safe_open`` (which rejects truncated files and broken headers) and hold
exactly the tensors the index says it holds. Tensor data is never loaded as a whole model:
callers get :class:`TensorInfo` records in shard order and turn them into byte sources that the
writer streams from disk, one shard file open at a time. Data is handled as raw bytes, so copies
are byte for byte in any dtype (bf16, fp8, ...) without a framework in between.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

# A safetensors file starts with a little-endian u64 header length, then the JSON header.
_HEADER_LEN_BYTES = 8
# safetensors itself refuses headers above 100 MB; anything larger is a corrupt length field.
_MAX_HEADER_BYTES = 100_000_000
# Chunk for the read/write fallback when the kernel cannot copy between the files itself.
_COPY_CHUNK_BYTES = 16 * 1024 * 1024


class CheckpointError(MoepruneError):
    """A checkpoint directory that cannot be read as a safetensors model."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its shard file and the absolute byte range of its data."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    shard: Path
    data_offset: int  # absolute offset in the shard file
    nbytes: int

    def row_nbytes(self) -> int:
        """Bytes of one index along dim 0 (the tensor is stored contiguously, row-major)."""
        if not self.shape or self.shape[0] == 0 or self.nbytes % self.shape[0]:
            raise CheckpointError(
                f"{self.shard}: tensor '{self.name}' (shape {list(self.shape)}, {self.nbytes} bytes) "
                "cannot be split along dimension 0"
            )
        return self.nbytes // self.shape[0]


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header; return (header dict, absolute offset of the data section).

    Raises CheckpointError naming the file when the header is unreadable or the data section is
    shorter than the header says (a truncated download).
    """
    try:
        file_nbytes = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(_HEADER_LEN_BYTES)
            if len(prefix) < _HEADER_LEN_BYTES:
                raise CheckpointError(f"{path}: file is truncated ({file_nbytes} bytes, no safetensors header)")
            (header_nbytes,) = struct.unpack("<Q", prefix)
            if header_nbytes > min(_MAX_HEADER_BYTES, file_nbytes - _HEADER_LEN_BYTES):
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declared header length {header_nbytes} bytes, "
                    f"file is {file_nbytes} bytes); re-download or re-create this shard"
                )
            raw = handle.read(header_nbytes)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read shard: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt safetensors header ({exc}); re-download or re-create this shard"
        ) from None
    data_start = _HEADER_LEN_BYTES + header_nbytes
    data_nbytes = file_nbytes - data_start
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            str(entry["dtype"])
            [int(d) for d in entry["shape"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(
                f"{path}: corrupt safetensors header (bad entry for tensor '{name}'); "
                "re-download or re-create this shard"
            ) from None
        if not 0 <= begin <= end:
            raise CheckpointError(f"{path}: corrupt safetensors header (tensor '{name}' has offsets {begin}..{end})")
        data_end = max(data_end, end)
    if data_end > data_nbytes:
        raise CheckpointError(
            f"{path}: file is truncated: its header describes {data_end} bytes of tensor data but only "
            f"{data_nbytes} are present; re-download or re-create this shard"
        )
    return header, data_start


def _check_with_safetensors(path: Path) -> set[str]:
    """Let the safetensors library validate the file too; return its tensor names."""
    from safetensors import safe_open

    try:
        # framework "numpy" only parses the header here: no tensor is materialised.
        with safe_open(str(path), framework="numpy") as handle:
            return set(handle.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError type
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({exc}); the shard is truncated or corrupt: "
            "re-download or re-create it"
        ) from None


class Checkpoint:
    """A validated safetensors checkpoint. Lazy: holds headers, not tensors.

    Use :meth:`open`. Iterate :meth:`tensors` (shard order, then file order); read bytes with
    :meth:`read` or stream them with the sources from :meth:`source` / :meth:`rows_source`.
    At most one shard file descriptor is open at any time.
    """

    def __init__(self, directory: Path, shards: list[Path], tensors: dict[str, TensorInfo],
                 index: dict[str, Any] | None) -> None:
        self.directory = directory
        self.shards = shards
        self._tensors = tensors
        self.index = index
        self._open_shard: Path | None = None
        self._open_fd: int | None = None

    # --- construction --------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        """Validate and index the checkpoint in ``directory`` (headers only)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory not found: {directory}")
        index_path = directory / INDEX_NAME
        single_path = directory / SINGLE_FILE_NAME
        if index_path.is_file():
            index, shard_names = _read_index(index_path)
            shards = [directory / name for name in shard_names]
        elif single_path.is_file():
            index, shards = None, [single_path]
        else:
            raise CheckpointError(
                f"{directory}: no {SINGLE_FILE_NAME} or {INDEX_NAME}; point it at a Hugging Face model directory"
            )
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise CheckpointError(
                f"{index_path}: names shard(s) that do not exist in {directory}: {', '.join(missing)}; "
                "the download is incomplete: fetch the missing shard(s) or fix the index"
            )
        tensors: dict[str, TensorInfo] = {}
        for shard in shards:
            header, data_start = read_safetensors_header(shard)
            names_in_file = _check_with_safetensors(shard)
            entries = sorted(
                ((name, entry) for name, entry in header.items() if name != "__metadata__"),
                key=lambda item: int(item[1]["data_offsets"][0]),
            )
            if {name for name, _ in entries} != names_in_file:
                raise CheckpointError(f"{shard}: header disagrees with the safetensors library's reading")
            for name, entry in entries:
                begin, end = (int(v) for v in entry["data_offsets"])
                if name in tensors:
                    raise CheckpointError(
                        f"{directory}: tensor '{name}' is stored twice ({tensors[name].shard.name} and {shard.name})"
                    )
                tensors[name] = TensorInfo(
                    name=name,
                    dtype=str(entry["dtype"]),
                    shape=tuple(int(d) for d in entry["shape"]),
                    shard=shard,
                    data_offset=data_start + begin,
                    nbytes=end - begin,
                )
        if index is not None:
            _check_index_matches(index_path, index["weight_map"], tensors)
        return cls(directory, shards, tensors, index)

    # --- queries -------------------------------------------------------------------------
    def tensors(self) -> Iterator[TensorInfo]:
        """Every tensor, in shard order and, within a shard, in file order."""
        return iter(self._tensors.values())

    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __getitem__(self, name: str) -> TensorInfo:
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: no tensor named '{name}'") from None

    @property
    def total_nbytes(self) -> int:
        """Sum of tensor data bytes (what an index's metadata.total_size states)."""
        return sum(info.nbytes for info in self._tensors.values())

    # --- reading -------------------------------------------------------------------------
    def fd(self, shard: Path) -> int:
        """A read-only descriptor of ``shard``; closes the previously opened shard first."""
        if self._open_shard != shard:
            self.close()
            try:
                self._open_fd = os.open(shard, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"{shard}: cannot open shard: {exc.strerror or exc}") from None
            self._open_shard = shard
        assert self._open_fd is not None
        return self._open_fd

    def close(self) -> None:
        """Close the open shard, if any."""
        if self._open_fd is not None:
            os.close(self._open_fd)
        self._open_fd = None
        self._open_shard = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, info: TensorInfo, start: int = 0, length: int | None = None) -> bytes:
        """Raw bytes ``[start, start+length)`` of a tensor's data (default: all of it)."""
        if length is None:
            length = info.nbytes - start
        if start < 0 or length < 0 or start + length > info.nbytes:
            raise ValueError(f"range {start}+{length} outside tensor '{info.name}' ({info.nbytes} bytes)")
        data = _pread_exact(self.fd(info.shard), length, info.data_offset + start, info.shard)
        return data

    def source(self, info: TensorInfo) -> FileRangesSource:
        """A byte source that streams the whole tensor unchanged."""
        return FileRangesSource(self, info.shard, [(info.data_offset, info.nbytes)])

    def rows_source(self, info: TensorInfo, rows: Sequence[int]) -> FileRangesSource:
        """A byte source for ``tensor[rows]`` (dim 0), ``rows`` ascending, as contiguous runs."""
        row_nbytes = info.row_nbytes()
        runs = row_runs(rows, info.shape[0])
        ranges = [(info.data_offset + first * row_nbytes, count * row_nbytes) for first, count in runs]
        return FileRangesSource(self, info.shard, ranges)


def row_runs(rows: Sequence[int], num_rows: int) -> list[tuple[int, int]]:
    """Group ascending row indices into (first row, row count) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    previous = -1
    for row in rows:
        if not previous < row < num_rows:
            raise ValueError(f"row indices must be ascending, unique and below {num_rows}; got {list(rows)}")
        if runs and row == previous + 1:
            first, count = runs[-1]
            runs[-1] = (first, count + 1)
        else:
            runs.append((row, 1))
        previous = row
    return runs


class FileRangesSource:
    """Tensor bytes given as byte ranges of one shard file, copied in order.

    Copies use ``os.copy_file_range`` (the kernel moves the bytes, nothing passes through Python)
    and fall back to bounded read/write chunks where the filesystem cannot do that.
    """

    def __init__(self, checkpoint: Checkpoint, shard: Path, ranges: list[tuple[int, int]]) -> None:
        self.checkpoint = checkpoint
        self.shard = shard
        self.ranges = ranges
        self.nbytes = sum(length for _, length in ranges)

    def write_into(self, out_fd: int) -> None:
        """Append this tensor's bytes at the current position of ``out_fd``."""
        in_fd = self.checkpoint.fd(self.shard)
        for offset, length in self.ranges:
            copy_range(in_fd, offset, length, out_fd, self.shard)


_kernel_copy_works = hasattr(os, "copy_file_range")


def copy_range(in_fd: int, offset: int, length: int, out_fd: int, in_path: Path) -> None:
    """Append ``length`` bytes of ``in_fd`` starting at ``offset`` to ``out_fd``."""
    global _kernel_copy_works
    done = 0
    while done < length and _kernel_copy_works:
        try:
            copied = os.copy_file_range(in_fd, out_fd, length - done, offset + done)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                _kernel_copy_works = False  # not supported here: use read/write from now on
                break
            raise
        if copied == 0:
            raise CheckpointError(f"{in_path}: file ended early (truncated while being read?)")
        done += copied
    while done < length:
        step = min(_COPY_CHUNK_BYTES, length - done)
        chunk = _pread_exact(in_fd, step, offset + done, in_path)
        view = memoryview(chunk)
        while view:
            written = os.write(out_fd, view)
            view = view[written:]
        done += step


def _pread_exact(fd: int, length: int, offset: int, path: Path) -> bytes:
    parts: list[bytes] = []
    remaining = length
    while remaining:
        part = os.pread(fd, remaining, offset + length - remaining)
        if not part:
            raise CheckpointError(f"{path}: file ended early (truncated while being read?)")
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_index(index_path: Path) -> tuple[dict[str, Any], list[str]]:
    """Parse an index file; return it and its shard file names in shard order."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{index_path}: not a readable JSON index ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CheckpointError(f"{index_path}: tensor '{name}' maps to {shard!r}, not a file name in the directory")
    # Shard order: sorted file names (model-00001-of-N, model-00002-of-N, ... sort numerically).
    return index, sorted(set(weight_map.values()))


def _check_index_matches(index_path: Path, weight_map: dict[str, str], tensors: dict[str, TensorInfo]) -> None:
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{index_path}: tensor '{name}' is listed in shard {shard} but not stored there")
        if info.shard.name != shard:
            raise CheckpointError(
                f"{index_path}: tensor '{name}' is listed in shard {shard} but stored in {info.shard.name}"
            )
    unlisted = [name for name in tensors if name not in weight_map]
    if unlisted:
        raise CheckpointError(
            f"{index_path}: does not list tensor(s) stored in the shards: {', '.join(unlisted[:5])}"
            + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
        )
