"""Intermediates deleted on purpose (recipe ``[disk] delete_intermediates``), and their records.

Which files: the converted base GGUF (``gguf/base-<OUTTYPE>.gguf``). It is never published (the
GGUF repository holds the pruned model's files, :func:`moeprune.manifest.is_published_gguf`), and
only llama-quantize and the kld stage read it. The pruned model's converted GGUF is published, so
it stays. The KLD rival quants are the kld stage's own scratch: that stage deletes each once scored
(their size and sha256 stay in ``eval/kld.json``).

When: right after :func:`last_reader` of the file has finished in this run (ran, or found cached).
That is the last stage, in pipeline order, whose declared inputs name the file (tests check it
against the pipeline's dependencies); the stages after it that read ``gguf/`` as a whole (card,
manifest) read its listing and the records beside the GGUFs, not the deleted file's bytes. A run
stopped before that stage (``--until``) keeps the file.

The record: ``deleted.json`` maps the file's run-relative name to the digest the run's lock holds
for it (``size_bytes``, ``sha256``), the stage that made it and the stage after which it went. The
pipeline takes that digest for the missing file, so the stages that made and read it stay cached;
a stage that must rerun and reads it has the stage that made it rerun first (the file is made
again). The manifest lists it among the unpublished files, marked deleted; ``invoke verify`` says
"deleted, record kept" for it, and still fails on a missing file without such a record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout

DELETED_FORMAT_VERSION = 1


def intermediates(recipe: Any, layout: RunLayout) -> list[Path]:
    """The files ``[disk] delete_intermediates`` deletes in this run (none when it is off)."""
    from moeprune.manifest import is_published_gguf

    if not recipe.disk.delete_intermediates:
        return []
    converted = layout.gguf_path("base", recipe.quantize.convert_outtype)
    return [] if is_published_gguf(layout, converted.name) else [converted]


def last_reader(recipe: Any) -> str:
    """The last stage that reads the converted base GGUF: the kld stage (its reference) when KLD is
    on, else the base's quantize stage."""
    return "kld" if recipe.kld.enabled else "quantize-base"


@dataclass
class DeletedFiles:
    """``deleted.json`` of one run: {run-relative name: record}."""

    layout: RunLayout
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, layout: RunLayout) -> DeletedFiles:
        path = layout.deleted_path
        if not path.is_file():
            return cls(layout)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise MoepruneError(f"{path}: damaged ({exc}); restore it, or delete it and rerun the stages that "
                                "made the files it lists") from None
        if not isinstance(data, dict) or data.get("format_version") != DELETED_FORMAT_VERSION:
            raise MoepruneError(f"{path}: format {data.get('format_version') if isinstance(data, dict) else None!r} "
                                f"is not {DELETED_FORMAT_VERSION}")
        return cls(layout, dict(data.get("files", {})))

    def name(self, path: Path) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.layout.root.resolve()).as_posix()
        except ValueError:
            return None

    def record(self, path: Path) -> dict[str, Any] | None:
        """The record of ``path`` when it was deleted on purpose and is still absent; else None."""
        name = self.name(path)
        if name is None or name not in self.entries or Path(path).exists():
            return None
        return self.entries[name]

    def digest(self, path: Path) -> dict[str, Any] | None:
        """What the lock recorded for ``path`` before it was deleted (``size_bytes``, ``sha256``)."""
        found = self.record(path)
        return None if found is None else {"size_bytes": found["size_bytes"], "sha256": found["sha256"]}

    def mark(self, path: Path, digest: dict[str, Any], produced_by: str, deleted_after: str) -> None:
        """Record ``path`` as deleted (written before the file goes: a crash between leaves the file
        and a record that is ignored while the file exists)."""
        name = self.name(path)
        if name is None:
            raise MoepruneError(f"{path}: outside the run directory {self.layout.root}; not deleted")
        self.entries[name] = {"size_bytes": digest["size_bytes"], "sha256": digest["sha256"],
                              "produced_by": produced_by, "deleted_after": deleted_after}
        self.save()

    def forget(self, path: Path) -> None:
        """Drop the record of a file made again."""
        name = self.name(path)
        if name is not None and self.entries.pop(name, None) is not None:
            self.save()

    def under(self, directory: Path) -> dict[str, dict[str, Any]]:
        """{name relative to ``directory``: record} of the absent files deleted on purpose below it."""
        out = {}
        for name, entry in self.entries.items():
            path = self.layout.root / name
            if not path.exists():
                try:
                    out[path.relative_to(directory).as_posix()] = entry
                except ValueError:
                    continue
        return dict(sorted(out.items()))

    def save(self) -> None:
        write_json(self.layout.deleted_path, {"format_version": DELETED_FORMAT_VERSION,
                                              "files": dict(sorted(self.entries.items()))})
