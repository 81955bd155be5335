"""Fingerprints of stage dependencies, with a stat-keyed cache so large inputs hash once.

Like DVC's state database: a file's sha256 is reused while its (size, mtime_ns, inode) are
unchanged, so a second `invoke reproduce` does not re-read a 50 GB base checkpoint.

Nothing here records an absolute path. A dependency is named by :func:`dep_key`: relative to
the run directory, else to the moeprune checkout (``checkout/...``), the recipe's directory
(``recipe/...``) or the Hugging Face cache (``hf-cache/...``), else by its file name
(``external/<name>``); its content hash does the rest. A checkout copied or moved together with
its ``runs/`` therefore keeps every stage cached, and two machines write the same lock.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.hashing import sha256_file, sha256_json
from moeprune.resources import checkout_root

HASH_CACHE_FORMAT_VERSION = 2


def _hf_cache_root() -> Path | None:
    cache = os.environ.get("HF_HUB_CACHE")
    if cache:
        return Path(cache)
    home = os.environ.get("HF_HOME")
    return Path(home) / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub"


@dataclass
class Anchors:
    """Directories a dependency path is expressed relative to, in order of preference."""

    run: Path
    recipe_dir: Path | None = None
    checkout: Path | None = field(default_factory=checkout_root)
    hf_cache: Path | None = field(default_factory=_hf_cache_root)

    def key(self, path: Path) -> str:
        return dep_key(path, self)


def _under(path: Path, root: Path | None) -> str | None:
    if root is None:
        return None
    try:
        return path.relative_to(root.resolve()).as_posix()
    except (ValueError, OSError):
        return None


def dep_key(path: Path, anchors: Anchors) -> str:
    """A location-independent name of ``path`` (see the module docstring)."""
    resolved = Path(path).resolve()
    inside = _under(resolved, anchors.run)
    if inside is not None:
        return inside or "."
    for prefix, root in (("checkout", anchors.checkout), ("recipe", anchors.recipe_dir),
                         ("hf-cache", anchors.hf_cache)):
        inside = _under(resolved, root)
        if inside is not None:
            return f"{prefix}/{inside}" if inside not in ("", ".") else prefix
    return f"external/{resolved.name}"


class HashCache:
    """sha256 of files keyed by their location-independent name and stat; persisted as JSON.

    Saving is best effort: the cache only saves re-hashing, so a disk that cannot take it costs
    time, never the run (a warning is printed once).
    """

    def __init__(self, path: Path, anchors: Anchors | None = None) -> None:
        self.path = path
        self.anchors = anchors or Anchors(run=path.parent)
        self._entries: dict[str, dict[str, Any]] = {}
        self._dirty = False
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("format_version") == HASH_CACHE_FORMAT_VERSION:
                    entries = data.get("files")
                    self._entries = dict(entries) if isinstance(entries, dict) else {}
            except (OSError, ValueError):
                self._entries = {}  # a damaged cache only costs re-hashing

    def file(self, path: Path, key: str | None = None) -> dict[str, Any]:
        """{"size_bytes", "sha256"} of one file."""
        stat = path.stat()
        key = key or self.anchors.key(path)
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        entry = self._entries.get(key)
        if not isinstance(entry, dict) or entry.get("stamp") != stamp:
            entry = {"stamp": stamp, "sha256": sha256_file(path)}
            self._entries[key] = entry
            self._dirty = True
        return {"size_bytes": stat.st_size, "sha256": entry["sha256"]}

    def path_digest(self, path: Path) -> dict[str, Any]:
        """Digest of a file, or of a directory as the hash of its sorted file listing."""
        if path.is_file():
            return self.file(path)
        if path.is_dir():
            base = self.anchors.key(path)
            children = sorted(p for p in path.rglob("*") if p.is_file())
            files = {
                child.relative_to(path).as_posix(): self.file(child, f"{base}/{child.relative_to(path).as_posix()}")["sha256"]
                for child in children
            }
            size = sum(child.stat().st_size for child in children)
            return {"size_bytes": size, "sha256": sha256_json(files), "files": len(files)}
        raise FileNotFoundError(path)

    def save(self) -> str | None:
        """Write the cache if it changed; return a warning instead of raising when it cannot."""
        if not self._dirty:
            return None
        try:
            write_json(self.path, {"format_version": HASH_CACHE_FORMAT_VERSION, "files": self._entries})
        except (OSError, Exception) as exc:  # noqa: BLE001 - WriteError or anything else: the cache is optional
            message = f"warning: could not save the hash cache ({exc}); the next run re-hashes its inputs"
            print(message, file=sys.stderr)
            return message
        self._dirty = False
        return None

