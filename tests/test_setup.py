"""Setup and packaging: the llama.cpp build's progress and job count, bootstrap.sh, the wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from moeprune.llamacpp import build as build_mod
from moeprune.recipe import LlamaCppSection

ROOT = Path(__file__).resolve().parents[1]


# --- llama.cpp build ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[12/345] Building CXX object ggml/src/ggml.c.o\n", (12, 345)),
        ("[ 42%] Building CXX object src/llama.cpp.o\n", (42, 100)),
        ("[100%] Linking CXX executable bin/llama-server\n", (100, 100)),
        ("-- Configuring done\n", None),
    ],
)
def test_step_counter_is_read_from_ninja_and_make(line, expected):
    assert build_mod.step_progress(line) == expected


def test_build_reports_the_step_counter_as_it_goes(tmp_path: Path):
    script = "for i in $(seq 1 40); do echo \"[$i/40] Building CXX object o$i.o\"; done"
    said: list[str] = []
    build_mod._run_logged(["sh", "-c", script], tmp_path / "build.log", dict(os.environ), "build", say=said.append)
    assert said[0].startswith("llama.cpp build: [1/40] 2%")  # the first step shows at once
    assert said[-1].startswith("llama.cpp build: [40/40] 100%")
    assert 15 <= len(said) <= 21  # about every 5 percent, not every step
    logged = [line for line in (tmp_path / "build.log").read_text().splitlines() if line.startswith("[")]
    assert len(logged) == 40  # the log keeps every line


def test_failed_build_step_quotes_the_log(tmp_path: Path):
    with pytest.raises(build_mod.LlamaCppBuildError, match=r"(?s)build failed \(exit 3\).*\nboom"):
        build_mod._run_logged(["sh", "-c", "echo boom; exit 3"], tmp_path / "b.log", dict(os.environ), "build",
                              say=lambda _: None)


def test_a_build_started_by_any_caller_reports_on_stderr_by_default():
    import inspect

    assert inspect.signature(build_mod.ensure_llamacpp).parameters["say"].default is build_mod.say_stderr


def test_jobs_default_to_the_cpu_count():
    assert build_mod.default_jobs() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("flag", "field", "expected"), [(None, None, "cpus"), (None, 3, 3), (5, 3, 5)])
def test_jobs_come_from_the_flag_then_the_recipe_then_the_cpus(monkeypatch, tmp_path, flag, field, expected):
    """ensure_llamacpp(jobs=flag) with llamacpp.jobs = field: the job count the build gets."""
    monkeypatch.setenv("MOEPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build_mod, "resolve_build", lambda section, env: (object(), {}, {}, "k" * 20))
    seen: dict[str, int] = {}

    def fake_build(source, flags, tools, key, jobs, env, say):
        seen["jobs"] = jobs
        return "built"

    monkeypatch.setattr(build_mod, "_build", fake_build)
    assert build_mod.ensure_llamacpp(LlamaCppSection(jobs=field), jobs=flag) == "built"
    assert seen["jobs"] == (build_mod.default_jobs() if expected == "cpus" else expected)


def test_jobs_are_not_part_of_the_recorded_settings():
    """The job count changes how long a build takes, not what it makes: no rerun, no new key."""
    assert "jobs" not in LlamaCppSection(jobs=7).model_dump(mode="json")


def test_bootstrap_runs_the_llamacpp_task_unconditionally():
    """The old `invoke --list | grep -q` test failed under pipefail and skipped the build."""
    lines = [line for line in (ROOT / "bootstrap.sh").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines
    assert not [line for line in lines if "grep" in line]
    assert ".venv/bin/invoke llamacpp" in lines


# --- packaging -------------------------------------------------------------------------------
def _project_copy(tmp_path: Path) -> Path:
    """The tracked files of the checkout (what a clone has), without build leftovers."""
    src = tmp_path / "project"
    src.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        path = ROOT / os.fsdecode(name)
        if path.is_file():
            target = src / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    return src


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    project = _project_copy(tmp)
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(out), str(project)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("moeprune-*.whl")
    return wheel


def top_level_data() -> dict[str, bytes]:
    """Every committed file of the top-level data directories (schemas/, model_card/), by path."""
    from moeprune.resources import DATA_DIRS

    listed = subprocess.run(["git", "ls-files", "-z", "--", *DATA_DIRS], cwd=ROOT, capture_output=True, check=True)
    files = {os.fsdecode(name): (ROOT / os.fsdecode(name)).read_bytes() for name in listed.stdout.split(b"\0") if name}
    assert {name.split("/", 1)[0] for name in files} == set(DATA_DIRS), sorted(files)
    return files


def packaged_data(wheel: Path) -> dict[str, bytes]:
    """The wheel's copies of the data directories (``moeprune/_data/<dir>/...``), by top-level path."""
    from moeprune.resources import PACKAGED_DATA

    prefix = f"moeprune/{PACKAGED_DATA}/"
    with zipfile.ZipFile(wheel) as archive:
        return {name.removeprefix(prefix): archive.read(name) for name in archive.namelist()
                if name.startswith(prefix) and not name.endswith("/")}


def test_schemas_and_the_card_template_live_at_the_top_level_only():
    """The design's layout: `ls schemas model_card` at the root, no second copy committed, and a
    checkout reads those very directories."""
    from moeprune.card.render import GGUF_TEMPLATE_PATH, TEMPLATE_PATH
    from moeprune.resources import data_dir
    from moeprune.schemas import SCHEMA_DIR

    files = top_level_data()
    assert {"schemas/recipe.schema.json", "schemas/manifest.schema.json", "model_card/template.md",
            "model_card/gguf_template.md"} <= set(files)
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    card_names = {Path(name).name for name in files if name.startswith("model_card/")}
    copies = [name for name in tracked if name not in files
              and (name.endswith(".schema.json") or (name.startswith("src/") and Path(name).name in card_names))]
    assert not copies, f"second copies of schemas/ or model_card/ files: {copies}"
    assert data_dir("schemas") == SCHEMA_DIR == ROOT / "schemas"
    assert data_dir("model_card") == TEMPLATE_PATH.parent == GGUF_TEMPLATE_PATH.parent == ROOT / "model_card"


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_top_level_bytes(built_wheel: Path, tmp_path: Path):
    """The wheel's copies, the sdist's top-level directories and a wheel built from that sdist all
    hold exactly the committed files, byte for byte."""
    expected = top_level_data()
    assert packaged_data(built_wheel) == expected
    project = _project_copy(tmp_path)
    out = tmp_path / "sdist"
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(out)!r}))"
    result = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (sdist,) = out.glob("moeprune-*.tar.gz")
    with tarfile.open(sdist) as archive:
        members = {member.name.split("/", 1)[1]: member for member in archive.getmembers()
                   if member.isfile() and "/" in member.name}
        in_sdist = {name: archive.extractfile(member).read() for name, member in members.items()
                    if name.split("/", 1)[0] in {"schemas", "model_card"}}
    assert in_sdist == expected
    wheels = tmp_path / "from-sdist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(wheels), str(sdist)], check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("moeprune-*.whl")
    assert packaged_data(wheel) == expected


@pytest.mark.slow
def test_installed_wheel_validates_and_renders_a_card(built_wheel: Path, tmp_path: Path):
    """A fresh venv with only the wheel of moeprune (dependencies from this environment, nothing
    downloaded) validates an artifact and renders a card, far from any source tree, from its own
    copies of schemas/ and model_card/, which equal the top-level files byte for byte. The venv
    sits inside an unrelated git repository, whose commit it must not record as its own code."""
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "unrelated"], check=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(built_wheel)],
                   check=True, capture_output=True, text=True)
    # The dependencies (torch, transformers, ...) from this environment, after the venv's own
    # site-packages: the wheel's moeprune comes first, and no editable finder is loaded from here.
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})  # fakerun only: moeprune itself is the wheel's
        from pathlib import Path
        import moeprune
        from moeprune.card.render import TEMPLATE_PATH
        from moeprune.schemas import SCHEMA_DIR, validate_file
        assert Path(moeprune.__file__).is_relative_to({str(site)!r}), moeprune.__file__
        from fakerun import make_fake_run
        run = make_fake_run(Path({str(tmp_path / 'run')!r}))
        validate_file("drop_map", run.layout.drop_map_path)
        validate_file("manifest", run.layout.manifest_path)
        card = (run.layout.card_dir / "README.md").read_text()
        assert "Fake MoE, expert-pruned" in card, card[:500]
        from moeprune.manifest import code_version
        assert code_version()["git_commit"] is None, code_version()
        print("rendered", len(card), "characters from", SCHEMA_DIR)
        print("data", SCHEMA_DIR, TEMPLATE_PATH.parent, sep="\\n")
        """)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([str(python), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"from {site}" in result.stdout
    schema_dir, card_dir = map(Path, result.stdout.split("data\n", 1)[1].split())
    installed = {f"{top}/{path.relative_to(directory).as_posix()}": path.read_bytes()
                 for top, directory in (("schemas", schema_dir), ("model_card", card_dir))
                 for path in directory.rglob("*") if path.is_file()}
    assert schema_dir.is_relative_to(site) and card_dir.is_relative_to(site)
    assert installed == top_level_data()


# --- the run layout ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("run", "name", "role"),
    [
        ("demo", "base-Q4_K_M.gguf", "base"),
        ("demo", "base-F32.gguf.json", "base"),
        ("demo", "base-BF16.imatrix.gguf", "base"),
        ("demo", "demo-Q4_K_M.gguf", "pruned"),
        ("demo", "demo-Q4_K_M.gguf.json", "pruned"),
        ("baseline-x", "baseline-x-Q4_K_M.gguf", "pruned"),  # the old prefix guess published it as base
        ("base-x", "base-x-Q4_K_M.gguf", "pruned"),
        ("original", "original-F16.gguf", "pruned"),  # the old guess: "orig*" was a base
        ("demo", "notes.txt", None),
    ],
)
def test_gguf_roles_come_from_the_layout_names(run, name, role):
    from moeprune.layout import RunLayout

    layout = RunLayout(Path("runs") / run)
    assert layout.gguf_role(name) == role
    if role is not None and not name.endswith((".json", ".imatrix.gguf")):
        assert layout.gguf_path(role, name.rsplit("-", 1)[1].removesuffix(".gguf")).name == name


def test_a_recipe_may_not_be_named_base():
    import tomllib

    from moeprune.errors import RecipeError
    from moeprune.recipe import parse_recipe

    data = tomllib.loads((ROOT / "recipes" / "demo.toml").read_text())
    with pytest.raises(RecipeError, match="field 'name' = \"base\": 'base' names the base model's GGUF files"):
        parse_recipe({**data, "name": "base"})


def test_manifest_publishes_a_baseline_named_run(tmp_path):
    from moeprune.layout import RunLayout
    from moeprune.manifest import artifact_files

    layout = RunLayout(tmp_path / "baseline-x")
    layout.gguf_dir.mkdir(parents=True)
    for name in ("baseline-x-Q4_K_M.gguf", "base-Q4_K_M.gguf"):
        (layout.gguf_dir / name).write_bytes(b"GGUF")
    published, unpublished = artifact_files(layout, {})
    assert [f.path_in_repo for f in published] == ["baseline-x-Q4_K_M.gguf"]
    assert [f.path_in_repo for f in unpublished] == ["base-Q4_K_M.gguf"]
