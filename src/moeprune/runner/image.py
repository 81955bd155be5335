"""Build the moeprune image (``docker/Dockerfile``): CUDA for real runs, CPU for tests.

CUDA (``invoke docker.build``)
    Base ``nvidia/cuda`` pinned by digest (the Dockerfile's default ``BASE_IMAGE``); Python
    packages from PyPI, checked against ``docker/requirements.lock`` (``--require-hashes``);
    llama.cpp built with CUDA for the recipe's ``llamacpp.cuda_architectures``.
CPU (``invoke docker.build --cpu``)
    For machines without Docker Hub or GPU: the base is a Debian rootfs made here with
    ``debootstrap`` and ``docker import``; Python packages come from a wheelhouse downloaded on
    this host for ``docker/requirements-cpu.lock`` (``--no-index``, still ``--require-hashes``).

Everything slow is cached under ``$MOEPRUNE_CACHE_DIR/docker`` and keyed by content:
``base/<key>/rootfs.tar`` (debootstrap inputs), ``wheelhouse/<key>/`` (lock file hash), and the
image itself is tagged ``moeprune:ctx-<key>`` (hash of the build context and build arguments),
so an unchanged tree is not rebuilt at all and a changed one reuses Docker's layer cache.

In both modes the build context is staged in ``$MOEPRUNE_CACHE_DIR/docker/context/<mode>``:
only the files the image needs, the pinned llama.cpp sdist (``sources/``) and the wheelhouse
(``wheelhouse/``, empty for CUDA).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_dir, write_json
from moeprune.hashing import sha256_file, sha256_json, sha256_tree
from moeprune.llamacpp.build import default_jobs
from moeprune.llamacpp.source import cache_root, fetch_sdist
from moeprune.recipe import LlamaCppSection
from moeprune.resources import DATA_DIRS
from moeprune.runner.engine import connect, image_record
from moeprune.runner.errors import ImageBuildError

Say = Callable[[str], None]

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_VARIANT = "minbase"
BASE_REPOSITORY = "moeprune-base"
IMAGE_REPOSITORY = "moeprune"
CPU_TAG = f"{IMAGE_REPOSITORY}:cpu"
CUDA_TAG = f"{IMAGE_REPOSITORY}:cuda"
LOCK_FILES = {"cuda": "requirements.lock", "cpu": "requirements-cpu.lock"}
BOOTSTRAP_LOCK = "requirements-bootstrap.lock"
# Build tools installed (hash-checked) before the locked packages: three packages in the lock
# are sdists built with --no-build-isolation, so setuptools and wheel must be in the venv.
BOOTSTRAP_PACKAGES = ("pip", "setuptools", "wheel")
# Top-level entries of the project copied into the image (everything else stays out). The image
# runs tasks.py from src/, so it reads schemas/ and model_card/ at the top, as a checkout does.
PROJECT_DIRS = ("src", "recipes", "calibration")
PROJECT_ENTRIES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "tasks.py", *PROJECT_DIRS, *DATA_DIRS)
DOCKER_ENTRIES = ("Dockerfile", "build_llamacpp.py", BOOTSTRAP_LOCK, *LOCK_FILES.values())
SKIPPED_NAMES = {"__pycache__", ".pytest_cache", ".mypy_cache"}
SKIPPED_SUFFIXES = (".pyc", ".egg-info")
KEY_CHARS = 16
IMAGE_KEY_LABEL = "moeprune.context_sha256"


def docker_cache_dir() -> Path:
    """``$MOEPRUNE_CACHE_DIR/docker``: base rootfs tarballs, wheelhouses, staged contexts."""
    return cache_root() / "docker"


def _run(command: list[str], what: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise ImageBuildError(f"{what} failed (exit {result.returncode}): {' '.join(command[:6])} ...\n{tail}")
    return result.stdout


# --- base image (CPU mode) ---------------------------------------------------------------
def debian_base_key(suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR) -> str:
    """Cache key of the debootstrap rootfs: changes with the suite, mirror or variant."""
    return sha256_json({"format": 1, "suite": suite, "mirror": mirror, "variant": DEBIAN_VARIANT})[:KEY_CHARS]


def debian_base_tag(suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR) -> str:
    return f"{BASE_REPOSITORY}:{suite}-{debian_base_key(suite, mirror)}"


def make_debian_rootfs(suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR, say: Say = print) -> Path:
    """``base/<key>/rootfs.tar``: a minimal Debian made with debootstrap (cached by key)."""
    key = debian_base_key(suite, mirror)
    final = docker_cache_dir() / "base" / key
    tarball = final / "rootfs.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ImageBuildError(
            "debootstrap is not installed; the CPU image needs it to make its Debian base "
            "(`apt-get install debootstrap`), or build the CUDA image instead"
        )
    if os.geteuid() != 0:
        raise ImageBuildError("debootstrap needs root: run `invoke docker.build --cpu` as root (or via sudo)")
    started = time.monotonic()
    say(f"debootstrap {DEBIAN_VARIANT} {suite} from {mirror} (a few minutes) -> {tarball}")
    with atomic_dir(final) as tmp:
        rootfs = tmp / "rootfs"
        _run(["debootstrap", f"--variant={DEBIAN_VARIANT}", suite, str(rootfs), mirror], "debootstrap")
        # Package downloads are not part of the base (apt caches are cleaned in images anyway).
        for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
        (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tmp / "rootfs.tar"), "."], "tar rootfs")
        shutil.rmtree(rootfs)
        write_json(tmp / "record.json", {
            "suite": suite, "mirror": mirror, "variant": DEBIAN_VARIANT, "key": key,
            "rootfs_tar_sha256": sha256_file(tmp / "rootfs.tar"),
            "seconds": round(time.monotonic() - started, 1),
        })
    return tarball


def ensure_debian_base(client: Any, suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR, say: Say = print) -> str:
    """Tag of the imported Debian base image, importing (and debootstrapping) it if needed."""
    from docker.errors import ImageNotFound

    tag = debian_base_tag(suite, mirror)
    try:
        client.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    tarball = make_debian_rootfs(suite, mirror, say)
    repository, _, tag_name = tag.partition(":")
    say(f"docker import {tarball} {tag}")
    try:
        client.api.import_image(src=str(tarball), repository=repository, tag=tag_name)
        client.images.get(tag)
    except Exception as exc:  # the SDK raises APIError or returns an error status
        raise ImageBuildError(f"docker import of {tarball} failed: {exc}") from None
    return tag


# --- hash-locked requirements -------------------------------------------------------------
def _freeze_constraints(project_root: Path, torch_pin: str) -> list[str]:
    """Pins of the project's venv (what the tests ran with), torch replaced by ``torch_pin``."""
    output = _run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], "pip freeze")
    pins = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "==" not in line:
            continue
        name = line.split("==", 1)[0].lower().replace("_", "-")
        if name == "torch":
            continue
        pins.append(line)
    pins.append(torch_pin)
    return pins


def _resolve_report(project_root: Path, requirements: list[str], constraints: list[str], isolated: bool) -> list[dict[str, Any]]:
    """pip's resolution of ``requirements`` (dry run): one dict per distribution to install."""
    with tempfile.TemporaryDirectory(prefix="moeprune-lock-") as tmp:
        constraint_path = Path(tmp) / "constraints.txt"
        constraint_path.write_text("\n".join(constraints) + "\n")
        report_path = Path(tmp) / "report.json"
        env = dict(os.environ)
        command = [sys.executable, "-m", "pip"]
        if isolated:
            # PyPI only: no local wheel directories or mirrors (what the CUDA image will see).
            for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT"):
                env.pop(name, None)
            env["PIP_CONFIG_FILE"] = os.devnull
            command += ["--isolated"]
        command += ["install", "--dry-run", "--ignore-installed", "--quiet", "--only-binary", "torch",
                    "--report", str(report_path), "-c", str(constraint_path), *requirements]
        if isolated:
            command += ["--index-url", "https://pypi.org/simple"]
        _run(command, "resolving requirements", env=env, cwd=project_root)
        return json.loads(report_path.read_text())["install"]


def _lock_text(entries: list[dict[str, Any]], header: list[str], skip: Iterable[str] = ()) -> str:
    skip = {name.lower() for name in skip}
    lines = [f"# {line}" for line in header]
    rows = []
    for entry in entries:
        name = entry["metadata"]["name"]
        if name.lower() in skip:
            continue
        info = entry["download_info"].get("archive_info") or {}
        hashes = info.get("hashes") or {}
        digest = hashes.get("sha256") or (info.get("hash", "").partition("sha256=")[2])
        if not digest:
            raise ImageBuildError(f"pip reported no sha256 for {name}; cannot lock it")
        rows.append((name.lower(), f"{name}=={entry['metadata']['version']} \\\n    --hash=sha256:{digest}"))
    lines += [row for _, row in sorted(rows)]
    return "\n".join(lines) + "\n"


def lock_requirements(project_root: Path, variant: str, torch_version: str = "2.13.0", say: Say = print) -> Path:
    """Write ``docker/requirements[-cpu].lock`` (and the bootstrap lock) with sha256 hashes.

    ``variant`` "cuda" resolves against PyPI alone (torch's CUDA wheels); "cpu" uses this host's
    pip configuration, which must offer ``torch==<version>+cpu`` (e.g. via
    ``PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu``). Versions are pinned to the
    project venv's (``pip freeze``), so the image runs what the tests ran.
    """
    if variant not in LOCK_FILES:
        raise ImageBuildError(f"unknown lock variant {variant!r}; use one of {sorted(LOCK_FILES)}")
    if sys.version_info[:2] != (3, 11):
        raise ImageBuildError("locks are made for the image's Python 3.11: run this with a Python 3.11 venv")
    torch_pin = f"torch=={torch_version}" + ("+cpu" if variant == "cpu" else "")
    constraints = _freeze_constraints(project_root, torch_pin)
    say(f"resolving the {variant} lock (pip dry run, no downloads of wheels)")
    entries = _resolve_report(project_root, [".", torch_pin], constraints, isolated=variant == "cuda")
    header = [
        f"moeprune image requirements ({variant}): generated by `invoke docker.lock`, do not edit.",
        "Python 3.11, linux x86_64. Versions pinned to the project venv; install with",
        "`pip install --require-hashes --no-deps -r <this file>`.",
    ]
    target = project_root / "docker" / LOCK_FILES[variant]
    target.write_text(_lock_text(entries, header, skip=["moeprune"]))
    bootstrap_pins = [line for line in constraints if line.split("==")[0].lower() in BOOTSTRAP_PACKAGES]
    pip_version = _run([sys.executable, "-m", "pip", "--version"], "pip --version").split()[1]
    wanted = {f"pip=={pip_version}"} | {p for p in bootstrap_pins if not p.lower().startswith("pip==")}
    setuptools = next((e for e in entries if e["metadata"]["name"].lower() == "setuptools"), None)
    if setuptools is not None:
        wanted = {p for p in wanted if not p.lower().startswith("setuptools==")}
        wanted.add(f"setuptools=={setuptools['metadata']['version']}")
    if not any(p.lower().startswith("wheel==") for p in wanted):
        wanted.add("wheel")
    boot_entries = _resolve_report(project_root, sorted(wanted), [], isolated=True)
    (project_root / "docker" / BOOTSTRAP_LOCK).write_text(_lock_text(boot_entries, [
        "Build tools installed before the main lock (pip, setuptools, wheel): generated by",
        "`invoke docker.lock`, do not edit. setuptools must equal the main lock's version.",
    ]))
    say(f"wrote {target} and docker/{BOOTSTRAP_LOCK}")
    return target


# --- wheelhouse (CPU mode) -----------------------------------------------------------------
def ensure_wheelhouse(lock_paths: list[Path], say: Say = print) -> Path:
    """``wheelhouse/<key>/``: every file the locks name, downloaded here (key: the locks' hashes).

    Uses this host's pip configuration (PyPI and any local mirrors); the files are verified
    against the lock hashes by pip (``--require-hashes``) both here and in the image.
    """
    key = sha256_json([sha256_file(path) for path in lock_paths])[:KEY_CHARS]
    final = docker_cache_dir() / "wheelhouse" / key
    if (final / ".complete").is_file():
        return final
    say(f"downloading the wheelhouse for {', '.join(p.name for p in lock_paths)} -> {final}")
    with atomic_dir(final) as tmp:
        for lock in lock_paths:
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
                  "--dest", str(tmp), "-r", str(lock)], f"pip download for {lock.name}")
        (tmp / ".complete").write_text(key + "\n")
    return final


# --- build context -------------------------------------------------------------------------
def _copy_tree(source: Path, target: Path) -> None:
    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if n in SKIPPED_NAMES or n.endswith(SKIPPED_SUFFIXES)]

    if source.is_dir():
        shutil.copytree(source, target, ignore=ignore)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def stage_context(project_root: Path, mode: str, sdist: Path, wheelhouse: Path | None) -> tuple[Path, str]:
    """Fill ``context/<mode>`` with what the Dockerfile copies; return (dir, content key).

    The key hashes the project files, the sdist and the wheelhouse key, so it changes exactly
    when the image's inputs change.
    """
    context = docker_cache_dir() / "context" / mode
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    for name in PROJECT_ENTRIES:
        if (project_root / name).exists():
            _copy_tree(project_root / name, context / name)
        elif name in PROJECT_DIRS:
            (context / name).mkdir()  # the Dockerfile copies it: an empty one is fine
        elif name in DATA_DIRS:
            raise ImageBuildError(f"{project_root / name} is missing: the image reads it (see README, Repository layout)")
    if not (context / "README.md").exists():
        # pyproject.toml names README.md as the long description: the install needs one.
        (context / "README.md").write_text("moeprune\n")
    for name in DOCKER_ENTRIES:
        source = project_root / "docker" / name
        if not source.is_file():
            raise ImageBuildError(f"{source} is missing: it is part of the image build (see docker/README.md)")
        _copy_tree(source, context / "docker" / name)
    project_key = sha256_tree(context)
    (context / "sources").mkdir()
    shutil.copy2(sdist, context / "sources" / sdist.name)
    (context / "wheelhouse").mkdir()
    (context / "wheelhouse" / ".keep").write_text("")
    if wheelhouse is not None:
        for wheel in sorted(wheelhouse.iterdir()):
            if wheel.name.startswith("."):
                continue
            try:
                os.link(wheel, context / "wheelhouse" / wheel.name)  # same disk: no copy
            except OSError:
                shutil.copy2(wheel, context / "wheelhouse" / wheel.name)
    key = sha256_json({
        "project": project_key,
        "sdist": sha256_file(sdist),
        "wheelhouse": wheelhouse.name if wheelhouse is not None else None,
    })
    return context, key


# --- image build ---------------------------------------------------------------------------
@dataclass(frozen=True)
class BuiltImage:
    """A built (or reused) image: its tag and what the manifest records about it."""

    tag: str
    record: dict[str, Any]
    reused: bool
    seconds: float


def _stream_build(client: Any, context: Path, tag: str, buildargs: dict[str, str], labels: dict[str, str], say: Say) -> None:
    log_tail: list[str] = []
    stream = client.api.build(
        path=str(context), dockerfile="docker/Dockerfile", tag=tag, buildargs=buildargs,
        labels=labels, rm=True, forcerm=True, pull=False, decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
            tail = "\n".join(log_tail[-30:])
            raise ImageBuildError(f"docker build of {tag} failed: {detail.strip()}\n--- last lines ---\n{tail}")
        text = chunk.get("stream")
        if text:
            for line in text.rstrip("\n").splitlines():
                log_tail.append(line)
                say(line)
        del log_tail[:-200]


def build_image(
    project_root: Path,
    cpu: bool,
    llamacpp: LlamaCppSection,
    tag: str | None = None,
    jobs: int | None = None,
    say: Say = print,
) -> BuiltImage:
    """Build (or reuse) the image; CPU mode makes its own base and wheelhouse first.

    Raises DockerUnavailableError without an engine and ImageBuildError when a step fails.
    """
    if llamacpp.source != "pypi-sdist":
        raise ImageBuildError(
            "the image builds llama.cpp from the pinned llama-cpp-python sdist: set "
            "[llamacpp] source = 'pypi-sdist' in the recipe"
        )
    started = time.monotonic()
    client = connect()
    mode = "cpu" if cpu else "cuda"
    tag = tag or (CPU_TAG if cpu else CUDA_TAG)
    sdist = fetch_sdist(llamacpp.sdist_version, llamacpp.sdist_sha256)
    buildargs = {
        "LLAMACPP_SDIST": sdist.name,
        "LLAMACPP_SDIST_VERSION": llamacpp.sdist_version,
        "LLAMACPP_SDIST_SHA256": llamacpp.sdist_sha256,
        "LLAMACPP_CUDA_ARCHITECTURES": llamacpp.cuda_architectures,
        "LLAMACPP_JOBS": str(jobs or llamacpp.jobs or default_jobs()),
    }
    wheelhouse = None
    docker_dir = project_root / "docker"
    if cpu:
        base = ensure_debian_base(client, say=say)
        locks = [docker_dir / BOOTSTRAP_LOCK, docker_dir / LOCK_FILES["cpu"]]
        wheelhouse = ensure_wheelhouse(locks, say=say)
        buildargs |= {
            "BASE_IMAGE": base,
            "REQUIREMENTS_LOCK": LOCK_FILES["cpu"],
            "PIP_NO_INDEX": "1",
            "LLAMACPP_CUDA": "off",
        }
        base_id = client.images.get(base).id
    else:
        base_id = None  # pinned by digest in the Dockerfile itself
    context, context_key = stage_context(project_root, mode, sdist, wheelhouse)
    key = sha256_json({"context": context_key, "buildargs": buildargs, "base_id": base_id})
    key_tag = f"{IMAGE_REPOSITORY}:ctx-{key[:KEY_CHARS]}"
    labels = {IMAGE_KEY_LABEL: key, "moeprune.mode": mode}
    from docker.errors import ImageNotFound

    try:
        image = client.images.get(key_tag)
        reused = True
        say(f"image {key_tag} is up to date (same context and build args)")
    except ImageNotFound:
        say(f"building {tag} ({mode}) from {context}")
        _stream_build(client, context, key_tag, buildargs, labels, say)
        image = client.images.get(key_tag)
        reused = False
    image.tag(*tag.split(":", 1))
    image = client.images.get(tag)
    seconds = time.monotonic() - started
    return BuiltImage(tag=tag, record=image_record(image, tag), reused=reused, seconds=round(seconds, 1))
