"""Build the llama.cpp tools into a content-addressed cache.

The cache directory is ``$MOEPRUNE_CACHE_DIR/llama.cpp/<key>`` where ``key`` hashes the source
pin, the CMake flags and the compilers' versions. A directory with that key is only ever
created by renaming a finished build into place, so if it exists it is complete; it is reused as
long as its binaries still match the sha256s in its ``build_record.json``.

Choices recorded in every build record:

- ``GGML_NATIVE=OFF``: the binaries do not depend on the CPU of the machine that built them
  (the cache may be shared or copied into a container). On x86-64 ggml then enables its
  AVX2/FMA/F16C/BMI2 baseline.
- ``BUILD_SHARED_LIBS=OFF``: the tools are static, so ``bin/`` is self-contained and survives
  the rename from the temporary build directory.
- No network at build time: ``LLAMA_OPENSSL=OFF`` and ``LLAMA_USE_PREBUILT_UI=OFF`` (the server's
  web UI would otherwise be downloaded from the Hub); tests, examples and the unified app off.
- ``GGML_RPC=ON``: llama-server and llama-perplexity accept ``--rpc host:port,...`` and
  ``ggml-rpc-server`` is built (``invoke rpc-worker``, serving across machines). RDMA is pinned
  off: otherwise the binaries would depend on whether libibverbs happens to be installed.
- The llama.cpp commit is passed explicitly (``LLAMA_BUILD_COMMIT``) so the build never asks git.

The number of compile jobs (``--jobs``, ``llamacpp.jobs``, default: the CPU count) and the
generator do not change the binaries, so they are recorded but are not part of the key. While
it builds, the compiler's step counter (``[123/456]``) is reported every few percent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.atomic import write_json
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file, sha256_json
from moeprune.llamacpp.source import SourceTree, cache_root, ensure_source
from moeprune.recipe import LlamaCppSection

BINARIES = ("llama-quantize", "llama-server", "llama-imatrix", "llama-perplexity", "llama-gguf-split",
            "ggml-rpc-server")
RECORD_NAME = "build_record.json"
RECORD_FORMAT_VERSION = 1
LOG_TAIL_LINES = 40
PROGRESS_EVERY_PERCENT = 5
# ninja prints "[12/345] Building CXX object ...", make "[ 12%] Building CXX object ...".
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")


def default_jobs() -> int:
    """Compile jobs when neither --jobs nor llamacpp.jobs says: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def say_stderr(message: str) -> None:
    """The default reporter of a build: one line on stderr (visible under a live view and in CI)."""
    import sys

    print(message, file=sys.stderr, flush=True)


class LlamaCppBuildError(MoepruneError):
    """The llama.cpp toolchain could not be provisioned or built."""


@dataclass(frozen=True)
class LlamaCppBuild:
    """A finished, verified llama.cpp build."""

    root: Path
    """llama.cpp source tree (convert_hf_to_gguf.py, gguf-py/)."""
    bin_dir: Path
    """Directory holding the built binaries (see BINARIES)."""
    key: str
    """Cache key: sha256 over source pin, CMake flags and compiler versions."""
    record: dict[str, Any]
    """Contents of build_record.json."""

    @property
    def cache_dir(self) -> Path:
        return self.bin_dir.parent

    @property
    def cuda(self) -> bool:
        """True when the binaries were built with CUDA (GGML_CUDA=ON): they can offload to a GPU."""
        return self.record.get("flags", {}).get("GGML_CUDA") == "ON"

    def binary(self, name: str) -> Path:
        """Path of one built tool, e.g. ``build.binary("llama-server")``."""
        path = self.bin_dir / name
        if not path.is_file():
            raise LlamaCppBuildError(f"{path}: not part of this build (built: {', '.join(BINARIES)})")
        return path


def builds_root() -> Path:
    return cache_root() / "llama.cpp"


# --- toolchain discovery -------------------------------------------------------------------
def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaCppBuildError(f"could not run {' '.join(command)}: {exc}") from None
    if result.returncode != 0:
        raise LlamaCppBuildError(
            f"{' '.join(command)} failed (exit {result.returncode}): {result.stderr.strip()[:500]}"
        )
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else ""


def _resolve_program(env_var: str, default: str, what: str, env: dict[str, str]) -> str:
    wanted = env.get(env_var) or default
    path = shutil.which(wanted, path=env.get("PATH"))
    if path is None:
        source = f"${env_var} = {wanted!r}" if env.get(env_var) else f"{wanted!r} on PATH"
        raise LlamaCppBuildError(
            f"no {what} found ({source}). Building llama.cpp needs a C/C++ compiler and CMake: "
            f"install them (e.g. `apt-get install build-essential cmake`) or point ${env_var} at one."
        )
    return str(Path(path).resolve())


def gpu_present() -> bool:
    """True when an NVIDIA GPU is visible (nvidia-smi lists one)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and "GPU" in result.stdout


def use_cuda(section: LlamaCppSection, env: dict[str, str] | None = None) -> bool:
    """Resolve llamacpp.cuda: 'auto' builds CUDA only when nvcc AND a GPU are present."""
    env = dict(os.environ if env is None else env)
    has_nvcc = shutil.which("nvcc", path=env.get("PATH")) is not None
    if section.cuda == "off":
        return False
    if section.cuda == "on":
        if not has_nvcc:
            raise LlamaCppBuildError("llamacpp.cuda = 'on' but nvcc is not on PATH; install CUDA or set cuda = 'auto'")
        return True
    return has_nvcc and gpu_present()


def toolchain(cuda: bool, env: dict[str, str] | None = None) -> dict[str, str]:
    """Paths and versions of cmake, the C and C++ compilers (and nvcc with CUDA).

    Raises LlamaCppBuildError naming the missing program.
    """
    env = dict(os.environ if env is None else env)
    cmake = _resolve_program("CMAKE", "cmake", "CMake", env)
    cc = _resolve_program("CC", "cc", "C compiler", env)
    cxx = _resolve_program("CXX", "c++", "C++ compiler", env)
    info = {
        "cmake": cmake,
        "cmake_version": _first_line([cmake, "--version"]),
        "cc": cc,
        "cc_version": _first_line([cc, "--version"]),
        "cxx": cxx,
        "cxx_version": _first_line([cxx, "--version"]),
    }
    if cuda:
        nvcc = _resolve_program("CUDACXX", "nvcc", "CUDA compiler (nvcc)", env)
        info["nvcc"] = nvcc
        version_lines = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        info["nvcc_version"] = version_lines.strip().splitlines()[-1] if version_lines.strip() else ""
    return info


def cmake_flags(section: LlamaCppSection, cuda: bool, source: SourceTree) -> dict[str, str]:
    """The -D flags of the configure step (everything that changes the binaries)."""
    commit = source.record.get("llama_cpp_commit") or "unknown"
    flags = {
        "CMAKE_BUILD_TYPE": "Release",
        "BUILD_SHARED_LIBS": "OFF",
        "GGML_NATIVE": "OFF",
        "GGML_CCACHE": "OFF",
        "GGML_CUDA": "ON" if cuda else "OFF",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF",
        "LLAMA_BUILD_APP": "OFF",
        "LLAMA_BUILD_TOOLS": "ON",
        "LLAMA_BUILD_SERVER": "ON",
        "LLAMA_BUILD_UI": "OFF",
        "LLAMA_USE_PREBUILT_UI": "OFF",
        "LLAMA_OPENSSL": "OFF",
        "GGML_RPC": "ON",
        "GGML_RPC_RDMA": "OFF",
        "LLAMA_BUILD_COMMIT": commit[:12],
        "LLAMA_BUILD_NUMBER": "0",
    }
    if cuda:
        flags["CMAKE_CUDA_ARCHITECTURES"] = section.cuda_architectures
    return flags


def build_key(source_pin_sha256: str, flags: dict[str, str], tools: dict[str, str]) -> str:
    """Cache key: changes when the source pin, any flag or any compiler version changes."""
    versions = {name: value for name, value in tools.items() if name.endswith("_version")}
    material = {
        "format": RECORD_FORMAT_VERSION,
        "source_sha256": source_pin_sha256,
        "flags": flags,
        "toolchain": versions,
        "binaries": list(BINARIES),
    }
    return sha256_json(material)[:20]


# --- cache ------------------------------------------------------------------------------
@contextlib.contextmanager
def _key_lock(key: str) -> Iterator[None]:
    """Serialise builds of one key across processes (the second waits, then reuses)."""
    root = builds_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_cached(cache_dir: Path, source: SourceTree, key: str) -> LlamaCppBuild | None:
    """The cached build if it is complete and its binaries match the record, else None."""
    record_path = cache_dir / RECORD_NAME
    if not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    bin_dir = cache_dir / "bin"
    for name, expected in record.get("binaries", {}).items():
        path = bin_dir / name
        if not path.is_file() or sha256_file(path) != expected["sha256"]:
            return None
    if set(record.get("binaries", {})) != set(BINARIES):
        return None
    return LlamaCppBuild(root=source.root, bin_dir=bin_dir, key=key, record=record)


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def step_progress(line: str) -> tuple[int, int] | None:
    """(done, total) from a build tool's step counter line (ninja or make), else None."""
    match = _NINJA_STEP.match(line)
    if match:
        return int(match.group(1)), int(match.group(2))
    match = _MAKE_STEP.match(line)
    if match:
        return int(match.group(1)), 100
    return None


def _run_logged(command: list[str], log_path: Path, env: dict[str, str], step: str,
                say: Callable[[str], None] | None = None, started: float | None = None) -> None:
    """Run ``command`` with its output in ``log_path``; with ``say``, report its step counter."""
    reported = -PROGRESS_EVERY_PERCENT
    started = time.monotonic() if started is None else started
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                   text=True, errors="replace", bufsize=1)
        assert process.stdout is not None
        for line in process.stdout:
            log.write(line)
            progress = step_progress(line) if say is not None else None
            if progress is None:
                continue
            done, total = progress
            percent = 100 * done // max(total, 1)
            if percent >= reported + PROGRESS_EVERY_PERCENT or done == total:
                reported = percent
                assert say is not None
                say(f"llama.cpp {step}: [{done}/{total}] {percent}% ({time.monotonic() - started:.0f} s)")
        returncode = process.wait()
    if returncode != 0:
        raise LlamaCppBuildError(
            f"llama.cpp {step} failed (exit {returncode}); full log: {log_path}\n"
            f"--- last lines ---\n{_tail(log_path)}"
        )


def _build(
    source: SourceTree,
    flags: dict[str, str],
    tools: dict[str, str],
    key: str,
    jobs: int,
    env: dict[str, str],
    say: Callable[[str], None],
) -> LlamaCppBuild:
    root = builds_root()
    final = root / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    log_path = tmp / "build.log"
    build_dir = tmp / "cmake-build"
    started = time.monotonic()
    try:
        configure = [tools["cmake"], "-S", str(source.root), "-B", str(build_dir)]
        if shutil.which("ninja", path=env.get("PATH")):
            configure += ["-G", "Ninja"]  # generator does not change the binaries: not in the key
        configure += [f"-D{name}={value}" for name, value in flags.items()]
        configure += [f"-DCMAKE_C_COMPILER={tools['cc']}", f"-DCMAKE_CXX_COMPILER={tools['cxx']}"]
        if "nvcc" in tools:
            configure.append(f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}")
        say(f"configuring llama.cpp (key {key}); log: {log_path}")
        _run_logged(configure, log_path, env, "configure")
        say(f"building {', '.join(BINARIES)} with -j{jobs} (a cold build takes minutes to tens of minutes)")
        _run_logged(
            [tools["cmake"], "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
             "--target", *BINARIES],
            log_path, env, "build", say=say, started=started,
        )
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        for name in BINARIES:
            built = build_dir / "bin" / name
            if not built.is_file():
                raise LlamaCppBuildError(f"build finished but {built} is missing; log: {log_path}")
            shutil.copy2(built, bin_dir / name)
        build_seconds = time.monotonic() - started
        shutil.rmtree(build_dir)  # object files: gigabytes we never reuse (keys are exact)
        record = {
            "format_version": RECORD_FORMAT_VERSION,
            "key": key,
            # No local paths of the source: this record is quoted in published results.
            "source": {**source.record, "pin_sha256": source.pin_sha256},
            "flags": flags,
            "toolchain": tools,
            "jobs": jobs,
            "build_seconds": round(build_seconds, 1),
            "built_at_unix": int(time.time()),
            "binaries": {
                name: {"sha256": sha256_file(bin_dir / name), "size_bytes": (bin_dir / name).stat().st_size}
                for name in BINARIES
            },
        }
        write_json(tmp / RECORD_NAME, record)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, final)
    except BaseException as exc:
        # Keep the log of a failed build beside the cache for a post-mortem, drop the rest.
        failed_log = root / f"{key}.failed.log"
        if log_path.is_file():
            shutil.copy2(log_path, failed_log)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, LlamaCppBuildError):
            raise LlamaCppBuildError(str(exc).replace(str(log_path), str(failed_log))) from None
        raise
    return LlamaCppBuild(root=source.root, bin_dir=final / "bin", key=key, record=record)


def resolve_build(section: LlamaCppSection, env: dict[str, str] | None = None) -> tuple[SourceTree, dict[str, str], dict[str, str], str]:
    """Source tree, CMake flags, toolchain and cache key for a recipe section (builds nothing)."""
    env = dict(os.environ if env is None else env)
    source = ensure_source(section)
    cuda = use_cuda(section, env)
    tools = toolchain(cuda, env)
    flags = cmake_flags(section, cuda, source)
    return source, flags, tools, build_key(source.pin_sha256, flags, tools)


def ensure_llamacpp(
    section: LlamaCppSection,
    jobs: int | None = None,
    env: dict[str, str] | None = None,
    say: Callable[[str], None] = say_stderr,
) -> LlamaCppBuild:
    """Return the build pinned by ``section``, building it first if the cache lacks it.

    ``jobs``: compile jobs (default: ``section.jobs``, else :func:`default_jobs`). ``env``
    (default: os.environ) is the environment the toolchain is looked up and run in. ``say``
    reports a build's steps (default: stderr, so a build started by any stage is visible).
    Raises LlamaCppBuildError (a MoepruneError) for a missing compiler/CMake or a failed build.
    """
    jobs = jobs or section.jobs or default_jobs()
    env = dict(os.environ if env is None else env)
    source, flags, tools, key = resolve_build(section, env)
    cache_dir = builds_root() / key
    cached = _load_cached(cache_dir, source, key)
    if cached is not None:
        return cached
    with _key_lock(key):
        cached = _load_cached(cache_dir, source, key)  # another process may have finished it
        if cached is not None:
            return cached
        if cache_dir.exists():
            # Present but not matching its record (tampered or truncated): rebuild it.
            shutil.rmtree(cache_dir)
        say(f"llama.cpp {key} is not in the cache ({cache_dir}): building it once")
        return _build(source, flags, tools, key, jobs, env, say)
