"""Publish a run to the Hugging Face Hub: one atomic commit per repository, then read back.

Order of work:

1. re-render the card if it names other repos than the targets, validate every JSON artifact
   against its schema and (re)write ``manifest.json``;
2. ``--dry-run`` stops here and lists what would be uploaded;
3. per repository (the model repo first: the GGUF repo's card names it as its base model):
   create it if needed, read its head commit, and send ONE ``create_commit`` with every file
   (``CommitOperationAdd``) plus deletions of stale remote files, with ``parent_commit`` set so a
   concurrent change makes the commit fail instead of mixing two artifacts;
4. read the remote tree back at the new commit and compare every file with the manifest: LFS
   files by sha256, regular files by git blob id (sha1 over the same bytes).

The token comes from ``$HF_TOKEN`` or the saved HF login, is passed to ``HfApi`` explicitly, and is
redacted from every message this module raises.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.hub import DEFAULT_ENDPOINT, redact, resolve_endpoint, resolve_token
from moeprune.layout import RunLayout
from moeprune.manifest import MANIFEST_NAME, SCHEMA_OF, ArtifactFile, artifact_files, write_manifest

__all__ = ["DEFAULT_ENDPOINT", "SCHEMA_OF", "PublishError", "PublishReport", "RepoReport", "publish", "redact",
           "resolve_token", "verify_remote"]

# Files every Hub repo starts with; never deleted as "stale".
_KEEP_REMOTE = {".gitattributes"}


class PublishError(MoepruneError):
    """Publishing failed; nothing was committed to the repository named in the message."""


@dataclass
class RepoReport:
    """What was (or would be) published to one repository."""

    kind: str
    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path_in_repo, size_bytes)
    deleted: list[str] = field(default_factory=list)
    commit_oid: str | None = None
    verified: int = 0


@dataclass
class PublishReport:
    dry_run: bool
    manifest_path: Path
    repos: list[RepoReport]
    validated: list[str]


def git_blob_id(path: Path) -> str:
    """The git blob id (sha1 of 'blob <size>\\0' + content) the Hub reports for regular files."""
    digest = hashlib.sha1()
    digest.update(b"blob %d\x00" % path.stat().st_size)
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def validate_artifacts(files: list[ArtifactFile]) -> list[str]:
    """Validate every JSON artifact that has a schema; return the repo paths validated."""
    from moeprune.schemas import SCHEMA_DIR, validate_file

    validated = []
    for item in files:
        schema = SCHEMA_OF.get(item.path_in_repo)
        if schema is None:
            continue
        if not (SCHEMA_DIR / f"{schema}.schema.json").is_file():
            raise PublishError(
                f"{item.local_path}: schemas/{schema}.schema.json is missing, so this artifact cannot be "
                "validated; restore the schema file"
            )
        validate_file(schema, item.local_path)
        validated.append(item.path_in_repo)
    return validated


def _with_manifest(layout: RunLayout, files: list[ArtifactFile]) -> list[ArtifactFile]:
    return sorted(
        [*files, ArtifactFile("model", MANIFEST_NAME, layout.manifest_path)],
        key=lambda f: (f.repo, f.path_in_repo),
    )


def publish(
    layout: RunLayout,
    recipe_settings: dict[str, Any],
    repo_id: str,
    gguf_repo_id: str | None = None,
    *,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    audit: bool = True,
) -> PublishReport:
    """Validate, write the manifest, and publish the run in one commit per repository.

    With ``audit`` (the default) the run must first pass :func:`moeprune.verify.verify_artifact`
    (hashes, recomputed results and card numbers): an artifact that fails its own audit is never
    uploaded. Without ``gguf_repo_id`` the GGUF files are not uploaded (they stay listed in the
    manifest). Raises PublishError (token redacted) on any failure; a failed commit leaves the
    repo as it was.
    """
    repo_ids = {"model": repo_id, "gguf": gguf_repo_id}
    if dry_run:
        # Render the card and the manifest into a temporary copy of the run (its files linked, not
        # copied), so a dry run changes nothing the pipeline's lock records.
        import tempfile

        with tempfile.TemporaryDirectory(prefix="moeprune-publish-dry-run-") as tmp:
            staged = _staged_layout(layout, Path(tmp))
            _, reports, validated = _prepare(staged, recipe_settings, repo_ids, audit, shown_root=layout.root)
        return PublishReport(dry_run=True, manifest_path=layout.manifest_path, repos=reports, validated=validated)
    files, reports, validated = _prepare(layout, recipe_settings, repo_ids, audit)
    report = PublishReport(dry_run=False, manifest_path=layout.manifest_path, repos=reports, validated=validated)

    token = resolve_token(token)
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again")
    for repo_report in reports:
        chosen = [f for f in files if f.repo == repo_report.kind]
        done = "".join(f"; already published: {r.repo_id} at {r.commit_oid}" for r in reports if r.commit_oid)
        try:
            _publish_repo(repo_report, chosen, resolve_endpoint(endpoint), token, private, commit_message, layout)
        except PublishError as exc:
            raise PublishError(redact(str(exc), token) + done) from None
        except Exception as exc:  # noqa: BLE001 - any client/server failure becomes one clear message
            raise PublishError(
                f"publishing to {repo_report.repo_id} failed, nothing was committed there: "
                f"{redact(f'{type(exc).__name__}: {exc}', token)}{done}"
            ) from None
    return report


def _staged_layout(layout: RunLayout, tmp: Path) -> RunLayout:
    """A run directory under ``tmp`` whose entries are symlinks to ``layout``'s (nothing copied).

    Writers replace an entry (atomic_dir/atomic_file rename over the link), so what publish
    renders lands in ``tmp`` and the real run stays byte for byte as it was.
    """
    if not layout.root.is_dir():
        raise PublishError(f"{layout.root}: run directory not found; run `invoke reproduce` first")
    staged = RunLayout(tmp / layout.root.name)
    staged.root.mkdir(parents=True)
    for entry in sorted(layout.root.iterdir()):
        if entry.name.startswith(".") or entry.name == MANIFEST_NAME:
            continue
        (staged.root / entry.name).symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return staged


def _prepare(
    layout: RunLayout,
    recipe_settings: dict[str, Any],
    repo_ids: dict[str, str | None],
    audit: bool,
    shown_root: Path | None = None,
) -> tuple[list[ArtifactFile], list[RepoReport], list[str]]:
    """Re-render the card for the targets, validate, write the manifest and audit ``layout``."""
    shown_root = shown_root or layout.root
    recipe_settings = _retarget_card(layout, recipe_settings, repo_ids["model"], repo_ids["gguf"])
    published, _ = artifact_files(layout, recipe_settings)
    validated = validate_artifacts(published)
    write_manifest(layout, recipe_settings, {"repo_ids": repo_ids})
    files = _with_manifest(layout, published)
    validated += validate_artifacts([f for f in files if f.path_in_repo == MANIFEST_NAME])
    if audit:
        from moeprune.verify import verify_artifact

        audit_report = verify_artifact(layout.root, rehash=False)  # the manifest was hashed just above
        if not audit_report.ok:
            details = "\n  - ".join(f"{c.name} ({c.target}): {c.detail}" for c in audit_report.failures)
            raise PublishError(
                f"{shown_root}: the run fails its own audit, nothing was uploaded (run `invoke verify "
                f"{shown_root}` for the full table):\n  - {details}"
            )
    reports: list[RepoReport] = []
    # Model repo first: the GGUF repo's card names it as base_model, which the Hub checks.
    for kind in ("model", "gguf"):
        target = repo_ids[kind]
        chosen = [f for f in files if f.repo == kind]
        if target is None or not chosen:
            continue
        reports.append(
            RepoReport(kind, target, files=[(f.path_in_repo, f.local_path.stat().st_size) for f in chosen])
        )
    return files, reports, validated


def _retarget_card(
    layout: RunLayout, settings: dict[str, Any], repo_id: str, gguf_repo_id: str | None
) -> dict[str, Any]:
    """Re-render the card when it names other repos than the ones published to (its links and
    "how to use" must point at the real repo); return the settings the artifact now records."""
    import copy
    import json

    numbers_path = layout.card_dir / "card_numbers.json"
    if not numbers_path.is_file():
        return settings
    context = json.loads(numbers_path.read_text(encoding="utf-8")).get("context", {})
    if context.get("repo_ref") == repo_id and context.get("gguf_repo") == gguf_repo_id:
        return settings
    from moeprune.card.render import card_context, render_card
    from moeprune.card.source import ArtifactSource
    from moeprune.manifest import code_version
    from moeprune.schemas import validate_file

    settings = copy.deepcopy(settings)
    settings.setdefault("publish", {}).update({"repo_id": repo_id, "gguf_repo_id": gguf_repo_id})
    results = validate_file("results", layout.results_path)
    source = ArtifactSource.from_run(layout, settings)
    drop_map = json.loads(source.drop_map_path.read_text(encoding="utf-8"))
    render_card(source, results, layout.card_dir, card_context(settings, drop_map["base_model"]["id"], code_version()))
    return settings


def _publish_repo(
    report: RepoReport,
    files: list[ArtifactFile],
    endpoint: str,
    token: str,
    private: bool,
    commit_message: str | None,
    layout: RunLayout,
) -> None:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(report.repo_id, exist_ok=True, private=private)
    parent = api.repo_info(report.repo_id).sha
    remote = {
        entry.path
        for entry in api.list_repo_tree(report.repo_id, recursive=True, revision=parent)
        if isinstance(entry, RepoFile)
    }
    wanted = {f.path_in_repo for f in files}
    report.deleted = sorted(remote - wanted - _KEEP_REMOTE)
    operations: list[Any] = [CommitOperationAdd(f.path_in_repo, str(f.local_path)) for f in files]
    operations += [CommitOperationDelete(path) for path in report.deleted]
    info = api.create_commit(
        report.repo_id,
        operations=operations,
        commit_message=commit_message or f"moeprune: publish run '{layout.root.name}'",
        parent_commit=parent,
    )
    report.commit_oid = info.oid
    report.verified = verify_remote(api, report.repo_id, info.oid, files)


def verify_remote(api: Any, repo_id: str, revision: str, files: list[ArtifactFile]) -> int:
    """Compare the remote tree at ``revision`` with the local files; return how many matched.

    LFS/Xet files are compared by sha256 and size, regular files by git blob id and size.
    Raises PublishError naming every file that is missing or differs.
    """
    from huggingface_hub.hf_api import RepoFile

    from moeprune.hashing import sha256_file

    remote = {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, expand=True, revision=revision)
        if isinstance(entry, RepoFile)
    }
    problems = []
    for item in files:
        entry = remote.get(item.path_in_repo)
        size = item.local_path.stat().st_size
        if entry is None:
            problems.append(f"{item.path_in_repo}: missing on the Hub")
        elif entry.lfs is not None:
            if entry.lfs.sha256 != sha256_file(item.local_path) or entry.lfs.size != size:
                problems.append(f"{item.path_in_repo}: remote sha256 {entry.lfs.sha256} differs from the manifest")
        elif entry.size != size or entry.blob_id != git_blob_id(item.local_path):
            problems.append(f"{item.path_in_repo}: remote blob {entry.blob_id} ({entry.size} bytes) differs")
    if problems:
        raise PublishError(f"{repo_id}@{revision}: read-back does not match the manifest:\n  - " + "\n  - ".join(problems))
    return len(files)


def format_size(size_bytes: int) -> str:
    """Human size with binary units, e.g. '4.2 MiB'."""
    value = float(size_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def print_report(report: PublishReport) -> None:
    """Rich table of what was (or would be) uploaded."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for repo in report.repos:
        title = f"{'would upload to' if report.dry_run else 'published to'} {repo.repo_id} ({repo.kind})"
        console.print(f"[bold]{title}[/bold]")
        table = Table()
        table.add_column("path")
        table.add_column("size", justify="right")
        for path, size in repo.files:
            table.add_row(path, format_size(size))
        total = sum(size for _, size in repo.files)
        table.add_row(f"[bold]{len(repo.files)} files[/bold]", f"[bold]{format_size(total)}[/bold]")
        console.print(table)
        if repo.commit_oid:
            console.print(f"commit {repo.commit_oid}: {repo.verified} files read back and matched the manifest")
        if repo.deleted:
            console.print(f"removed stale remote files: {', '.join(repo.deleted)}")
    console.print(f"validated against schemas: {', '.join(report.validated) or '(none)'}")
