"""Where the card's inputs live: a run directory or a published (downloaded) artifact.

Both views expose the same files: the published checkpoint (``config.json`` + safetensors shards;
the recalibrated one, with its ``recalibrate.json``, when the recipe recalibrated the router),
the drop map, the profile statistics, the eval directory, and the size/sha256 of the GGUF files
(read from disk in a run directory; from ``manifest.json`` in a published artifact, whose GGUF
files live in another repository and whose base GGUF is not published).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.layout import RunLayout
from moeprune.manifest import MANIFEST_NAME, is_published_gguf

DROP_MAP_NAME = "expert_drop_metadata.json"


@dataclass(frozen=True)
class ArtifactSource:
    """Paths of the card's inputs plus the recipe settings that produced them."""

    model_dir: Path
    drop_map_path: Path
    stats_path: Path
    eval_dir: Path
    recipe: dict[str, Any]
    gguf_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    """{file name: {"size_bytes", "sha256", "published"}} of the GGUF files."""
    base_dir: Path | None = None
    """The base checkpoint, when available (a run's local base, or verify --base)."""
    gguf_dir: Path | None = None
    """Where the GGUF files and their ``*.gguf.json`` records are at hand (a run's ``gguf/``, or the
    files verify downloaded from the GGUF repository); None when none is."""

    @classmethod
    def from_run(cls, layout: RunLayout, recipe: dict[str, Any], base_dir: Path | None = None) -> ArtifactSource:
        """A run directory ``runs/<name>/`` (GGUF files are hashed from ``gguf/``)."""
        gguf: dict[str, dict[str, Any]] = {}
        if layout.gguf_dir.is_dir():
            for path in sorted(layout.gguf_dir.glob("*.gguf")):
                gguf[path.name] = {
                    "size_bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                    "published": is_published_gguf(layout, path.name),
                }
        from moeprune.recalibrate import recorded_side_dir

        checkpoint = recorded_side_dir(recipe, layout)  # the one converted and published
        drop_map = layout.drop_map_path
        if not drop_map.is_file() and (checkpoint / DROP_MAP_NAME).is_file():
            drop_map = checkpoint / DROP_MAP_NAME
        return cls(
            model_dir=checkpoint,
            drop_map_path=drop_map,
            stats_path=layout.profile_stats_path,
            eval_dir=layout.eval_dir,
            recipe=recipe,
            gguf_files=gguf,
            base_dir=base_dir,
            gguf_dir=layout.gguf_dir,
        )

    @classmethod
    def from_artifact(cls, root: Path, base_dir: Path | None = None, gguf_dir: Path | None = None) -> ArtifactSource:
        """A published artifact laid out as its model repo (GGUF facts come from the manifest)."""
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise MoepruneError(f"{manifest_path}: not found; this is not a moeprune artifact")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        gguf: dict[str, dict[str, Any]] = {}
        for entry, published in [(e, True) for e in manifest.get("files", [])] + [
            (e, False) for e in manifest.get("unpublished", [])
        ]:
            if entry.get("repo") == "gguf" and entry["path"].endswith(".gguf"):
                gguf[entry["path"]] = {"size_bytes": entry["size_bytes"], "sha256": entry["sha256"], "published": published}
        return cls(
            model_dir=root,
            drop_map_path=root / DROP_MAP_NAME,
            stats_path=root / "profile" / "stats.safetensors",
            eval_dir=root / "eval",
            recipe=manifest.get("recipe", {}),
            gguf_files=gguf,
            base_dir=base_dir,
            gguf_dir=gguf_dir,
        )

    def gguf_at_hand(self, name: str) -> Path | None:
        """The GGUF file ``name`` of :attr:`gguf_files` if it is here, else None."""
        path = self.gguf_dir / name if self.gguf_dir is not None else None
        return path if path is not None and path.is_file() else None

    def gguf_by_sha256(self, sha256: str) -> tuple[str, dict[str, Any]] | None:
        for name, entry in self.gguf_files.items():
            if entry["sha256"] == sha256:
                return name, entry
        return None
