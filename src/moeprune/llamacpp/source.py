"""The pinned llama.cpp source tree.

Two kinds of pin (``[llamacpp]`` in the recipe):

``pypi-sdist``
    The llama.cpp vendored in the ``llama-cpp-python`` sdist from PyPI, pinned by version and by
    the archive's sha256. PyPI is reachable where GitHub may not be, and the sdist carries
    ``convert_hf_to_gguf.py`` with its own ``gguf-py``, so conversion and the binaries come from
    the same llama.cpp commit.
``git``
    A git URL at a full commit sha.

Everything lands under ``$MOEPRUNE_CACHE_DIR/src`` (default ``~/.cache/moeprune/src``). An
extracted tree carries a marker file naming the archive hash it came from; a tree without a
matching marker is never used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_dir, write_json
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_bytes, sha256_file
from moeprune.recipe import LlamaCppSection

SDIST_PACKAGE = "llama-cpp-python"
MARKER_NAME = ".moeprune-source.json"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")


def cache_root() -> Path:
    """Root of moeprune's caches: $MOEPRUNE_CACHE_DIR, else ~/.cache/moeprune."""
    return Path(os.environ.get("MOEPRUNE_CACHE_DIR", Path.home() / ".cache" / "moeprune")).expanduser()


@dataclass(frozen=True)
class SourceTree:
    """A verified llama.cpp source tree."""

    root: Path
    """The llama.cpp tree: CMakeLists.txt, convert_hf_to_gguf.py, gguf-py/."""
    pin_sha256: str
    """What the source is identified by: the sdist sha256, or sha256 of 'git:<commit>'."""
    record: dict[str, Any] = field(default_factory=dict)
    """Provenance for build records: kind, version/url, sha256/commit, llama.cpp commit."""


def _sdist_name(version: str) -> str:
    # PyPI normalises the project name to underscores in sdist file names.
    return f"llama_cpp_python-{version}"


def fetch_sdist(version: str, sha256: str, dest_dir: Path | None = None) -> Path:
    """Return the sdist archive for ``version``, downloading it with pip if needed.

    The archive's sha256 must equal ``sha256``; a mismatch is an error (never silently replaced).
    """
    if not _SHA256_RE.fullmatch(sha256):
        raise MoepruneError(
            f"llamacpp.sdist_sha256 = {sha256!r}: not a sha256 (64 lowercase hex digits)"
        )
    dest_dir = dest_dir or cache_root() / "src"
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / f"{_sdist_name(version)}.tar.gz"
    if not archive.is_file():
        with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=dest_dir) as tmp:
            command = [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "--dest", tmp, f"{SDIST_PACKAGE}=={version}",
            ]
            result = subprocess.run(command, capture_output=True, text=True)
            downloaded = list(Path(tmp).glob("*.tar.gz"))
            if result.returncode != 0 or len(downloaded) != 1:
                tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
                raise MoepruneError(
                    f"could not download {SDIST_PACKAGE}=={version} from PyPI "
                    f"(llamacpp.sdist_version); pip said:\n  " + "\n  ".join(tail)
                    + f"\nPlace the archive at {archive} by hand to work offline."
                )
            os.replace(downloaded[0], archive)
    actual = sha256_file(archive)
    if actual != sha256:
        raise MoepruneError(
            f"{archive}: sha256 is {actual}, but the recipe pins llamacpp.sdist_sha256 = {sha256}. "
            "Delete the file if it is corrupt, or fix the pin if the version changed on purpose."
        )
    return archive


def _sdist_llama_commit(sdist_root: Path) -> str | None:
    """The vendored llama.cpp commit, read from the git metadata the sdist ships (if any)."""
    head = sdist_root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD"
    try:
        text = head.read_text().strip()
    except OSError:
        return None
    return text if _COMMIT_RE.fullmatch(text) else None


def extract_sdist(archive: Path, sha256: str, version: str) -> Path:
    """Extract ``archive`` once into the cache; return the sdist root directory."""
    target = archive.parent / f"{_sdist_name(version)}-{sha256[:12]}"
    marker = target / MARKER_NAME
    if marker.is_file():
        try:
            if json.loads(marker.read_text()).get("sha256") == sha256:
                return target
        except (OSError, ValueError):
            pass  # unreadable marker: extract again below
    with atomic_dir(target) as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            # "data" refuses absolute paths, links out of the tree and device files.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # Python < 3.11.4 (Debian bookworm, Ubuntu 22.04): no filters; the sha256 was checked
                tar.extractall(tmp)
        tops = [p for p in tmp.iterdir()]
        if len(tops) != 1 or not tops[0].is_dir():
            raise MoepruneError(f"{archive}: expected one top-level directory in the sdist")
        for child in tops[0].iterdir():
            os.replace(child, tmp / child.name)
        tops[0].rmdir()
        write_json(tmp / MARKER_NAME, {"archive": archive.name, "sha256": sha256, "version": version})
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (e.g. mounted in a container)
    return target


def _run_git(args: list[str], cwd: Path | None = None) -> str:
    if shutil.which("git") is None:
        raise MoepruneError("llamacpp.source = 'git' needs git on PATH; install git or use 'pypi-sdist'")
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MoepruneError(f"git {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout.strip()


def clone_git(url: str, commit: str, dest_dir: Path | None = None) -> Path:
    """Clone ``url`` and check out ``commit`` (a full sha) into the cache, once."""
    if not _COMMIT_RE.fullmatch(commit):
        raise MoepruneError(
            f"llamacpp.git_commit = {commit!r}: pin a full 40-hex commit sha, not a branch or tag"
        )
    dest_dir = dest_dir or cache_root() / "src"
    target = dest_dir / f"llama.cpp-git-{commit[:12]}"
    marker = target / MARKER_NAME
    if marker.is_file():
        return target
    with atomic_dir(target) as tmp:
        _run_git(["clone", "--no-checkout", "--quiet", url, str(tmp)])
        _run_git(["checkout", "--quiet", "--detach", commit], cwd=tmp)
        head = _run_git(["rev-parse", "HEAD"], cwd=tmp)
        if head != commit:
            raise MoepruneError(f"{url}: checked out {head}, expected {commit}")
        write_json(tmp / MARKER_NAME, {"url": url, "commit": commit})
        tmp.chmod(0o755)
    return target


def ensure_source(section: LlamaCppSection) -> SourceTree:
    """Fetch (if needed), verify and return the llama.cpp tree pinned by the recipe section."""
    if section.source == "pypi-sdist":
        archive = fetch_sdist(section.sdist_version, section.sdist_sha256)
        sdist_root = extract_sdist(archive, section.sdist_sha256, section.sdist_version)
        root = sdist_root / "vendor" / "llama.cpp"
        record = {
            "kind": "pypi-sdist",
            "package": SDIST_PACKAGE,
            "version": section.sdist_version,
            "sha256": section.sdist_sha256,
            "llama_cpp_commit": _sdist_llama_commit(sdist_root),
        }
        pin = section.sdist_sha256
    else:
        assert section.git_url and section.git_commit  # enforced by LlamaCppSection
        root = clone_git(section.git_url, section.git_commit)
        record = {"kind": "git", "url": section.git_url, "llama_cpp_commit": section.git_commit}
        pin = sha256_bytes(f"git:{section.git_commit}".encode())
    for needed in ("CMakeLists.txt", "convert_hf_to_gguf.py", "gguf-py"):
        if not (root / needed).exists():
            raise MoepruneError(f"{root}: not a llama.cpp tree ({needed} is missing)")
    return SourceTree(root=root, pin_sha256=pin, record=record)

