"""run.lock.json: what produced each output, in the spirit of dvc.lock.

Per stage: the command, each dependency's hash and size, the parameter values, the code and tool
versions, and each output's hash, sorted by path. An entry is written only after its stage
succeeded, and the whole file is replaced atomically, so an interrupted run never leaves a lock
that claims an output it did not finish.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError

LOCK_FORMAT_VERSION = 1


@dataclass
class Lock:
    path: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> Lock:
        if not path.is_file():
            return cls(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise MoepruneError(
                f"{path}: damaged lock file ({exc}); delete it to rerun every stage"
            ) from None
        if data.get("format_version") != LOCK_FORMAT_VERSION:
            raise MoepruneError(
                f"{path}: lock format {data.get('format_version')!r} is not {LOCK_FORMAT_VERSION}; "
                "delete it to rerun every stage"
            )
        return cls(path, dict(data.get("stages", {})))

    def entry(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def record(self, stage: str, entry: dict[str, Any]) -> None:
        """Store a finished stage's entry and write the file atomically."""
        self.stages[stage] = entry
        self.save()

    def forget(self, stage: str) -> None:
        if self.stages.pop(stage, None) is not None:
            self.save()

    def save(self) -> None:
        write_json(self.path, {"format_version": LOCK_FORMAT_VERSION, "stages": self.stages})


def stage_key(entry: dict[str, Any]) -> dict[str, Any]:
    """The parts of a lock entry that decide whether a stage must rerun."""
    return {name: entry.get(name) for name in ("cmd", "deps", "params", "code", "tools")}
