"""Fingerprints of stage dependencies, with a stat-keyed cache so large inputs hash once.

Like DVC's state database: a file's sha256 is reused while its (size, mtime_ns, inode) are
unchanged, so a second `invoke reproduce` does not re-read a 50 GB base checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.hashing import sha256_file, sha256_json


class HashCache:
    """sha256 of files keyed by their stat; persisted as JSON beside the lock file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path.is_file():
            try:
                self._entries = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self._entries = {}  # a damaged cache only costs re-hashing

    def file(self, path: Path) -> dict[str, Any]:
        """{"size_bytes", "sha256"} of one file."""
        stat = path.stat()
        key = str(path.resolve())
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self._entries.get(key)
        if entry is None or entry.get("stamp") != stamp:
            entry = {"stamp": stamp, "sha256": sha256_file(path)}
            self._entries[key] = entry
            self._dirty = True
        return {"size_bytes": stat.st_size, "sha256": entry["sha256"]}

    def path_digest(self, path: Path) -> dict[str, Any]:
        """Digest of a file, or of a directory as the hash of its sorted file listing."""
        if path.is_file():
            return self.file(path)
        if path.is_dir():
            files = {
                child.relative_to(path).as_posix(): self.file(child)["sha256"]
                for child in sorted(p for p in path.rglob("*") if p.is_file())
            }
            size = sum(child.stat().st_size for child in path.rglob("*") if child.is_file())
            return {"size_bytes": size, "sha256": sha256_json(files), "files": len(files)}
        raise FileNotFoundError(path)

    def save(self) -> None:
        if self._dirty:
            write_json(self.path, self._entries)
            self._dirty = False


def source_digest(packages: list[str]) -> str:
    """Hash of the Python sources of the given moeprune subpackages/modules (the stage's code)."""
    root = Path(__file__).resolve().parents[1]
    listing: dict[str, str] = {}
    for name in packages:
        target = root / Path(*name.split(".")[1:])
        paths = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
        for path in paths:
            if path.is_file():
                listing[path.relative_to(root).as_posix()] = sha256_file(path)
    return sha256_json(listing)
