"""The base model of a run, located once: a local directory, or a Hub snapshot at a pinned commit.

Every stage that reads the base (profile, dropmap, prune, convert-base, verify-prune, the card)
asks :func:`resolve_base`, so they all read the same files. For a Hub id the recipe's
``model.revision`` (a commit sha, or a branch/tag name) is resolved to the commit actually
downloaded; that commit is what the drop map, the manifest and the card record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BaseModelError(MoepruneError):
    """The base model cannot be found or downloaded."""


@dataclass(frozen=True)
class BaseModel:
    """Where the base model's files are and which version they are."""

    id: str
    """``model.base`` as artifacts record it: a Hub id, or a local path named as the recipe
    records paths (``checkout/...``, never absolute: :meth:`moeprune.recipe.Recipe.recorded_path`)."""
    local_dir: Path
    """Directory holding config.json, the safetensors and the tokenizer."""
    revision: str | None
    """``model.revision`` as written in the recipe (None for a local model)."""
    commit: str | None
    """The Hub commit downloaded (None for a local model)."""

    @property
    def is_hub(self) -> bool:
        return self.commit is not None

    def record(self) -> dict[str, Any]:
        """What artifacts record: the id and, for a Hub model, the resolved commit."""
        return {"id": self.id, "revision": self.commit}


def is_hub_id(value: str | None) -> bool:
    """Whether a recorded ``model.base`` (or a repo id) names a Hub repo: ``org/name``, and not a
    local path as the recipe records it (``checkout/...``, ``recipe/...``: see
    :data:`moeprune.recipe.RECORDED_PATH_ANCHORS`)."""
    from moeprune.recipe import RECORDED_PATH_ANCHORS

    return (bool(value) and bool(_HUB_ID.match(value)) and ".." not in value  # type: ignore[arg-type]
            and value.split("/", 1)[0] not in RECORDED_PATH_ANCHORS)  # type: ignore[union-attr]


def is_commit(revision: str | None) -> bool:
    """True for a full commit sha (a pin), False for a branch or tag name (which can move)."""
    return bool(revision and COMMIT_RE.fullmatch(revision))


def resolve_base(recipe: Any, *, download: bool = True) -> BaseModel:
    """The recipe's base model; a Hub model is downloaded (once, into the HF cache) if needed.

    ``download=False`` only looks in the local cache. Raises BaseModelError naming ``model.base``.
    """
    local = recipe.base_dir
    recorded = recipe.recorded_path(recipe.model.base) if local is not None else None
    return _resolve(recipe.model.base, str(local) if local is not None else None, recipe.model.revision, download,
                    recorded)


@lru_cache(maxsize=8)
def _resolve(base: str, local_dir: str | None, revision: str | None, download: bool,
             recorded_id: str | None = None) -> BaseModel:
    if local_dir is not None:
        path = Path(local_dir)
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"model.base = {base!r}: no config.json in {path}; point it at a Hugging Face model directory"
            )
        return BaseModel(id=recorded_id or base, local_dir=path, revision=revision, commit=None)
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(repo_id=base, revision=revision, local_files_only=not download))
    except Exception as exc:  # network, auth, missing revision: all need the same user action
        what = "cannot download it from the Hub" if download else "it is not in the local Hugging Face cache"
        raise BaseModelError(
            f"model.base = {base!r} (model.revision {revision!r}): {what} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); check the repo id, the revision and "
            "HF_TOKEN, or point model.base at a local directory"
        ) from None
    # The HF cache stores every download as snapshots/<commit>/: the commit the revision named.
    commit = snapshot.name if COMMIT_RE.fullmatch(snapshot.name) else None
    if commit is None:
        raise BaseModelError(f"model.base = {base!r}: downloaded to {snapshot}, which does not name a commit")
    return BaseModel(id=base, local_dir=snapshot, revision=revision, commit=commit)
