"""Content hashes of files, directories and JSON-able values."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CHUNK_BYTES = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Hex sha256 of one file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values hash equally."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return sha256_bytes(canonical_json(value))


def file_digests(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"size_bytes", "sha256"}} of every file below root, sorted."""
    entries: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        entries[path.relative_to(root).as_posix()] = {
            "size_bytes": path.stat().st_size,
            "sha256": sha256_file(path),
        }
    return entries


def sha256_tree(root: Path) -> str:
    """One hash for a directory: the hash of its sorted (path, sha256) listing."""
    listing = {name: entry["sha256"] for name, entry in file_digests(root).items()}
    return sha256_json(listing)


def sha256_path(path: Path) -> str:
    """sha256 of a file, or the tree hash of a directory."""
    return sha256_tree(path) if path.is_dir() else sha256_file(path)
