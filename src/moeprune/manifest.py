"""The artifact manifest: every published file with its size and sha256, plus provenance.

A run directory (``runs/<name>/``) is mapped onto two Hub repositories:

``model`` repo
    the pruned checkpoint at the root (``config.json``, shards, index, tokenizer files,
    ``expert_drop_metadata.json``; with ``[recalibrate]`` on, the recalibrated checkpoint the GGUFs
    were converted from, with its ``recalibrate.json``), the card (``README.md``, ``card_numbers.json``, ``plots/``),
    ``eval/`` (``results.json`` and per-sample logs) and ``profile/`` (summary and statistics).
``gguf`` repo
    the GGUF files of the pruned model, their conversion/quantization records, and its own card
    (``card/gguf/README.md``).

Files that are measured but not published (the base model's GGUF and, for a recalibrated run, the
plain pruned model's, compared on the card) are listed
under ``unpublished`` with size and sha256 so a card number derived from them can still be checked.

``manifest.json`` itself is published to the model repo but is not listed in itself.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import moeprune
from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file, sha256_json
from moeprune.layout import UNPUBLISHED_MODELS, RunLayout
from moeprune.recalibrate import recorded_side_dir
from moeprune.resources import checkout_root

MANIFEST_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REPOS = ("model", "gguf")
GGUF_CARD_DIR = "gguf"  # card/gguf/README.md is the GGUF repo's README.md
# repo path -> schema name of the JSON artifacts (validated by publish, checked by verify)
SCHEMA_OF: dict[str, str] = {
    "expert_drop_metadata.json": "drop_map",
    "profile/profile.json": "profile",
    "eval/results.json": "results",
    "eval/kld.json": "kld",
    "card_numbers.json": "card_numbers",
    MANIFEST_NAME: "manifest",
}

# Names inside pruned/ and card/ that are scratch, never published.
_SKIP_NAMES = {".DS_Store"}


@dataclass(frozen=True)
class ArtifactFile:
    """One file of the artifact: where it lives locally and where it goes on the Hub."""

    repo: str  # "model" or "gguf"
    path_in_repo: str
    local_path: Path


def _files_below(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in _SKIP_NAMES
        # atomic writers leave ".name.tmp-*" siblings only on crash; never publish them
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def is_published_gguf(layout: RunLayout, name: str) -> bool:
    """Whether the GGUF repository holds ``gguf/<name>``: every file there but the base model's and
    the plain pruned model's (measured for the card, not published)."""
    return layout.gguf_role(name) not in UNPUBLISHED_MODELS


def artifact_files(layout: RunLayout, recipe: dict[str, Any]) -> tuple[list[ArtifactFile], list[ArtifactFile]]:
    """Map a run directory onto repo paths.

    ``recipe`` is the recorded recipe (``Recipe.settings()``): it says which checkpoint the run
    converted, so which one is published (:func:`moeprune.recalibrate.recorded_side_dir`).

    Returns ``(published, unpublished)``, each sorted by (repo, path_in_repo). Raises
    MoepruneError when two local files would land on the same repo path.
    """
    published: dict[tuple[str, str], ArtifactFile] = {}

    def add(repo: str, path_in_repo: str, local: Path) -> None:
        key = (repo, path_in_repo)
        if key in published and published[key].local_path != local:
            raise MoepruneError(
                f"two files map to {repo}:{path_in_repo}: {published[key].local_path} and {local}; "
                "rename one of them"
            )
        published[key] = ArtifactFile(repo, path_in_repo, local)

    checkpoint = recorded_side_dir(recipe, layout)
    for path in _files_below(checkpoint):
        add("model", path.relative_to(checkpoint).as_posix(), path)
    if layout.drop_map_path.is_file() and ("model", layout.drop_map_path.name) not in published:
        add("model", layout.drop_map_path.name, layout.drop_map_path)
    for path in _files_below(layout.card_dir):
        rel = path.relative_to(layout.card_dir).as_posix()
        if rel.startswith(GGUF_CARD_DIR + "/"):  # the GGUF repo's own card
            add("gguf", rel[len(GGUF_CARD_DIR) + 1:], path)
        else:
            add("model", rel, path)
    for path in _files_below(layout.eval_dir):
        add("model", "eval/" + path.relative_to(layout.eval_dir).as_posix(), path)
    for path in _files_below(layout.profile_dir):
        add("model", "profile/" + path.relative_to(layout.profile_dir).as_posix(), path)
    # run.lock.json is not part of the artifact: the pipeline rewrites it after the manifest stage,
    # so no hash of it could stay true. The manifest carries the provenance it would add.

    unpublished: list[ArtifactFile] = []
    for path in _files_below(layout.gguf_dir):
        rel = path.relative_to(layout.gguf_dir).as_posix()
        if not is_published_gguf(layout, rel):
            unpublished.append(ArtifactFile("gguf", rel, path))
        else:
            add("gguf", rel, path)

    if ("model", MANIFEST_NAME) in published:
        raise MoepruneError(f"{published[('model', MANIFEST_NAME)].local_path}: '{MANIFEST_NAME}' is reserved")
    ordered = sorted(published.values(), key=lambda f: (f.repo, f.path_in_repo))
    return ordered, sorted(unpublished, key=lambda f: (f.repo, f.path_in_repo))


def git_commit(repo_dir: Path | None = None) -> dict[str, Any]:
    """The git commit of the moeprune source tree and whether it has local changes, if known.

    An installed moeprune has no source tree of its own: asking git from inside site-packages
    would name whatever repository happens to hold the virtualenv, so it records no commit.
    """
    record: dict[str, Any] = {"commit": None, "dirty": None}
    repo_dir = repo_dir or checkout_root()
    if repo_dir is None:
        return record
    try:
        head = subprocess.run(
            ["git", "-C", str(repo_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode == 0:
            record["commit"] = head.stdout.strip()
            status = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(repo_dir), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            record["dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout (installed wheel): the version alone identifies the code
    return record


def code_version() -> dict[str, Any]:
    """moeprune's version plus the git commit of its source tree when available."""
    return {"moeprune": moeprune.__version__, **{f"git_{k}": v for k, v in git_commit().items()}}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _llamacpp_record(layout: RunLayout) -> dict[str, Any] | None:
    """The llama.cpp build that made and served the GGUF files: the eval's record of the serving
    build, else the build key/commit in the conversion and quantization records."""
    results = _read_json(layout.results_path)
    if isinstance(results, dict):
        for model in ("pruned", *sorted(results.get("models", {}))):
            build = results.get("models", {}).get(model, {}).get("llamacpp_build")
            if build:
                return build
    for path in sorted(layout.gguf_dir.glob("*.gguf.json")) if layout.gguf_dir.is_dir() else []:
        record = _read_json(path)
        if isinstance(record, dict) and record.get("llamacpp_key"):
            return {"key": record["llamacpp_key"], "llama_cpp_commit": record.get("llama_cpp_commit")}
    return None


def _find_docker_image(value: Any) -> dict[str, Any] | None:
    """First docker runner description ({"kind": "docker", "image": {...}}) inside a lock entry."""
    if isinstance(value, dict):
        image = value.get("image")
        if value.get("kind") == "docker" and isinstance(image, dict):
            digests = image.get("repo_digests") or []
            digest = digests[0].split("@", 1)[-1] if digests else image.get("id")
            if digest:
                return {"image": image.get("ref"), "digest": digest}
        for item in value.values():
            found = _find_docker_image(item)
            if found:
                return found
    elif isinstance(value, list):
        for item in value:
            found = _find_docker_image(item)
            if found:
                return found
    return None


def _container_record(layout: RunLayout) -> dict[str, Any] | None:
    """The container image stages ran in: from run.lock.json, else $MOEPRUNE_IMAGE_DIGEST."""
    found = _find_docker_image(_read_json(layout.lock_path)) if layout.lock_path.is_file() else None
    if found is None and os.environ.get("MOEPRUNE_IMAGE_DIGEST"):
        found = {"image": os.environ.get("MOEPRUNE_IMAGE"), "digest": os.environ["MOEPRUNE_IMAGE_DIGEST"]}
    return found


def _file_entry(item: ArtifactFile) -> dict[str, Any]:
    return {
        "repo": item.repo,
        "path": item.path_in_repo,
        "size_bytes": item.local_path.stat().st_size,
        "sha256": sha256_file(item.local_path),
    }


def _deleted_entries(layout: RunLayout) -> list[dict[str, Any]]:
    """The unpublished GGUFs deleted on purpose (moeprune.deleted): their recorded size and sha256,
    marked deleted. A published file is never deleted, so none of these is in ``files``."""
    from moeprune.deleted import DeletedFiles

    return [{"repo": "gguf", "path": name, "size_bytes": entry["size_bytes"], "sha256": entry["sha256"],
             "deleted": {"produced_by": entry["produced_by"], "deleted_after": entry["deleted_after"]}}
            for name, entry in DeletedFiles.load(layout).under(layout.gguf_dir).items()]


def build_manifest(layout: RunLayout, recipe: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe every file of the artifact (sorted, with size and sha256) and its provenance.

    ``recipe`` is ``Recipe.settings()``. ``extra`` may hold ``repo_ids`` ({"model": id, "gguf": id}),
    ``base_model`` ({"id", "revision"}: a Hub base and the commit downloaded),
    ``llamacpp`` (a build record; default: the one found in ``gguf/``) and ``container``
    ({"image": tag, "digest": "sha256:..."}; default: the docker runner recorded in run.lock.json, else
    $MOEPRUNE_IMAGE / $MOEPRUNE_IMAGE_DIGEST when set).
    """
    extra = dict(extra or {})
    published, unpublished = artifact_files(layout, recipe)
    if not published:
        raise MoepruneError(f"{layout.root}: no artifact files found; run the pipeline first")
    files = [_file_entry(item) for item in published]
    totals = {
        repo: {
            "files": sum(1 for f in files if f["repo"] == repo),
            "size_bytes": sum(f["size_bytes"] for f in files if f["repo"] == repo),
        }
        for repo in REPOS
    }
    container = extra.pop("container", None) or _container_record(layout)
    manifest: dict[str, Any] = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "run": layout.root.name,
        "code": code_version(),
        "recipe": recipe,
        "recipe_sha256": sha256_json(recipe),
        "llamacpp": extra.pop("llamacpp", None) or _llamacpp_record(layout),
        "container": container,
        "repo_ids": {repo: (extra.get("repo_ids") or {}).get(repo) for repo in REPOS},
        **({"base_model": extra.pop("base_model")} if extra.get("base_model") else {}),
        "files": files,
        "unpublished": sorted([_file_entry(item) for item in unpublished] + _deleted_entries(layout),
                              key=lambda entry: (entry["repo"], entry["path"])),
        "totals": totals,
    }
    extra.pop("repo_ids", None)
    if extra:
        manifest["extra"] = extra
    return manifest


def write_manifest(layout: RunLayout, recipe: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Build, validate and atomically write ``runs/<name>/manifest.json``; return its path."""
    from moeprune.schemas import validate

    manifest = build_manifest(layout, recipe, extra)
    validate("manifest", manifest, source=layout.manifest_path)
    write_json(layout.manifest_path, manifest)
    return layout.manifest_path


def _hub_base(layout: RunLayout) -> dict[str, Any] | None:
    """The Hub base model and the commit the run downloaded, as the drop map recorded them (None
    for a local base: nothing more than the recipe's path to say)."""
    drop_map = _read_json(layout.drop_map_path) if layout.drop_map_path.is_file() else None
    base = drop_map.get("base_model") if isinstance(drop_map, dict) else None
    if isinstance(base, dict) and base.get("revision"):
        return {"id": base["id"], "revision": base["revision"]}
    return None


def run_manifest(recipe: Any, layout: RunLayout, tools: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pipeline's manifest stage: write ``manifest.json`` for ``recipe``'s run; return it.

    ``tools`` may carry ``llamacpp`` (the build record) and ``image_digest`` (the container image
    the stages ran in). Repo ids come from the recipe's ``[publish]`` section.
    """
    tools = dict(tools or {})
    extra: dict[str, Any] = {"repo_ids": {"model": recipe.publish.repo_id, "gguf": recipe.publish.gguf_repo_id}}
    base = _hub_base(layout)
    if base:
        extra["base_model"] = base
    if tools.get("llamacpp"):
        extra["llamacpp"] = tools["llamacpp"]
    if tools.get("image_digest"):
        extra["container"] = {"image": tools.get("image") or recipe.runner.image, "digest": tools["image_digest"]}
    path = write_manifest(layout, recipe.settings(), extra)
    return json.loads(path.read_text(encoding="utf-8"))
