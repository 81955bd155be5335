"""``[disk] delete_intermediates`` (issue 26): the unpublished converted base GGUF is deleted once
its last reader has finished and each KLD rival once scored; the records stay, the lock stands in
for the file, a stage that needs it again makes it again, and verify and audit tell "deleted,
record kept" from a file that is missing; the plan counts the savings."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path


from invoke_cli import invoke
from moeprune.plan.disk import Free, StagePlan, Write, first_shortfall, peak_bytes

ROOT = Path(__file__).resolve().parents[1]
ON = "\n[disk]\ndelete_intermediates = true\n"


def _invoke(args: list[str], runs: Path, in_process: bool = False) -> subprocess.CompletedProcess:
    """``invoke ARGS`` (tests/invoke_cli.py); ``in_process`` for the plans, which load no model.
    COLUMNS: verify's table wide enough that no detail is wrapped across lines."""
    return invoke(*args, env={"MOEPRUNE_RUNS_DIR": str(runs), "COLUMNS": "400"}, timeout=1800, in_process=in_process)


def _statuses(result: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(re.findall(r"^\[(\S+)\] (\w+)", result.stdout + result.stderr, re.M))


# --- the plan ------------------------------------------------------------------------------------
def test_frees_and_transient_outputs_lower_the_peak_not_the_total():
    fs = lambda path: "fs"  # noqa: E731
    stages = [StagePlan("convert", True, (Write("f16", Path("/r/base-F16.gguf"), 100),)),
              StagePlan("quantize", True, (Write("q4", Path("/r/base-Q4.gguf"), 30),)),
              StagePlan("kld", True, (Write("ref", Path("/r/ref.kld"), 10),
                                      Write("r1", Path("/r/kld/a.gguf"), 20, transient=True),
                                      Write("r2", Path("/r/kld/b.gguf"), 25, transient=True)),
                        frees=(Free("f16", Path("/r/base-F16.gguf"), 100),)),
              StagePlan("card", True, (Write("big", Path("/r/x"), 90),))]
    # kld's peak: 100 + 30 + 10 + the larger rival (25), not both; then the f16 and the rivals go.
    assert peak_bytes(stages) == 165
    assert first_shortfall(stages, {"fs": 165}, fs) is None
    found = first_shortfall(stages, {"fs": 164}, fs)
    assert (found.stage, found.short_bytes) == ("kld", 1)
    # After kld 30 + 10 are left (the f16 and the rivals freed): card may add 125, not 126.
    assert first_shortfall(stages[:3] + [StagePlan("card", True, (Write("big", Path("/r/x"), 126),))],
                           {"fs": 165}, fs).stage == "card"
    # A cached last reader still frees its file (the deletion follows it whether it ran or not).
    cached = [StagePlan("kld", False, frees=(Free("f16", Path("/r/base-F16.gguf"), 100),)),
              StagePlan("card", True, (Write("big", Path("/r/x"), 90),))]
    assert first_shortfall(cached, {"fs": 0}, fs) is None


def test_check_plans_the_deletions(tmp_path):
    from fakerun import demo_recipe_text

    recipe = tmp_path / "demo.toml"
    recipe.write_text(demo_recipe_text() + ON)
    result = _invoke(["check", "--recipe", str(recipe)], tmp_path / "runs", in_process=True)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    kld = next(line for line in out.splitlines() if line.startswith("  kld "))
    assert re.search(r"; then deletes base-F32\.gguf [\d.]+ MB", kld), kld
    assert "base-Q6_K.gguf once each is used" in kld, kld
    total = int(re.search(r"total written: <= [\d.]+ MB \((\d+) bytes", out).group(1))
    peak = int(re.search(r"peak on disk: <= [\d.]+ MB \((\d+) bytes at once", out).group(1))
    assert peak < total
    plain = _invoke(["check", "--recipe", str(ROOT / "recipes" / "demo.toml")], tmp_path / "runs", in_process=True)
    assert "peak on disk" not in plain.stdout and "deletes" not in plain.stdout  # off by default


def test_readme_shows_the_reference_plan_with_deletions(tmp_path):
    """The README's two lines are `invoke check`'s on the reference recipe with the option set."""
    recipe = tmp_path / "reference.toml"
    text = (ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml").read_text(encoding="utf-8")
    recipe.write_text(text.replace('"../', f'"{ROOT}/') + ON)
    result = _invoke(["check", "--recipe", str(recipe)], Path("/nonexistent-runs"), in_process=True)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("  total written:", "  peak on disk:"))]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- run-plan:reference-deleting -->\n```\n(.*?)\n```", readme, re.S)
    assert block and block.group(1).splitlines() == lines, lines
    total, peak = (int(re.search(r"\((\d+) bytes", line).group(1)) for line in lines)
    assert peak < total


def test_last_reader_is_the_last_stage_that_declares_the_file():
    """moeprune.deleted.last_reader agrees with the pipeline's declared inputs, KLD on and off."""
    from moeprune.deleted import last_reader
    from moeprune.layout import RunLayout
    from moeprune.pipeline.graph import Context
    from moeprune.pipeline.stages import build_pipeline
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    for kld_on in (True, False):
        variant = recipe.model_copy(update={"kld": recipe.kld.model_copy(update={"enabled": kld_on})})
        ctx = Context(variant, RunLayout(Path("/nonexistent/runs/demo")))
        converted = ctx.layout.gguf_path("base", variant.quantize.convert_outtype)
        readers = [s.name for s in build_pipeline().stages if converted in [Path(p) for p in s.deps(ctx)]]
        assert readers and readers[-1] == last_reader(variant), (kld_on, readers)


def test_nothing_published_is_an_intermediate(tmp_path):
    from moeprune.deleted import intermediates
    from moeprune.layout import RunLayout
    from moeprune.manifest import is_published_gguf
    from moeprune.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / "demo.toml")
    layout = RunLayout(tmp_path / "demo")
    assert intermediates(recipe, layout) == []  # off by default
    on = recipe.model_copy(update={"disk": recipe.disk.model_copy(update={"delete_intermediates": True})})
    found = intermediates(on, layout)
    assert found == [layout.gguf_path("base", "f32")]
    assert not any(is_published_gguf(layout, p.name) for p in found)
    assert is_published_gguf(layout, layout.gguf_path("pruned", "f32").name)  # the pruned F32 stays


# --- a real run ----------------------------------------------------------------------------------
def test_deleted_intermediates_keep_their_records_and_come_back_when_needed(demo_run, tmp_path):
    from fakerun import demo_recipe_text

    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo")
    run = runs / "demo"
    converted, rivals = run / "gguf" / "base-F32.gguf", sorted((run / "kld").glob("base-*.gguf"))
    assert converted.is_file() and len(rivals) == 5
    before = {"size_bytes": converted.stat().st_size, "kld": (run / "eval" / "kld.json").read_bytes()}
    recipe = tmp_path / "demo.toml"
    recipe.write_text(demo_recipe_text() + ON)

    # kld rescored with the option on: each rival goes once scored, then the converted base GGUF.
    first = _invoke(["reproduce", "--no-live", "--recipe", str(recipe), "--from", "kld"], runs)
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    assert not converted.exists() and not list((run / "kld").glob("base-*.gguf"))
    assert sorted((run / "kld").glob("base-*.gguf.json"))  # the rivals' records stay
    assert (run / "eval" / "kld.json").read_bytes() == before["kld"]  # the same numbers and files
    record = json.loads((run / "deleted.json").read_text())["files"]["gguf/base-F32.gguf"]
    assert record["size_bytes"] == before["size_bytes"]
    assert (record["produced_by"], record["deleted_after"]) == ("convert-base", "kld")
    manifest = json.loads((run / "manifest.json").read_text())
    entry = next(e for e in manifest["unpublished"] if e["path"] == "base-F32.gguf")
    assert entry["sha256"] == record["sha256"] and entry["deleted"]["produced_by"] == "convert-base"
    assert "base-F32.gguf" not in {e["path"] for e in manifest["files"]}

    for command in (["verify", str(run)], ["audit", str(run)]):
        checked = _invoke(command, runs)
        assert checked.returncode == 0, (checked.stdout + checked.stderr)[-3000:]
        assert "gguf:base-F32.gguf: deleted, record kept" in checked.stdout, checked.stdout[-3000:]

    # Nothing reruns for a file deleted on purpose...
    again = _invoke(["reproduce", "--no-live", "--recipe", str(recipe)], runs)
    assert again.returncode == 0 and set(_statuses(again).values()) == {"skipped"}, _statuses(again)
    # ...but a stage that reads it makes it again first, and it goes once its last reader is done.
    rerun = _invoke(["reproduce", "--no-live", "--recipe", str(recipe), "--from", "quantize-base"], runs)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    statuses = _statuses(rerun)
    assert statuses["convert-base"] == "ran" and statuses["quantize-base"] == "ran", statuses
    planned = next(line for line in rerun.stderr.splitlines() if line.startswith("  convert-base "))
    assert re.search(r"disk [\d.]+ MB \(base-F32\.gguf", planned), planned  # the plan counts the remake
    assert statuses["kld"] == "skipped", statuses  # the same file came back: its reader stays cached
    assert not converted.exists() and "gguf/base-F32.gguf" in json.loads((run / "deleted.json").read_text())["files"]

    # A missing file without the mark still fails verify.
    manifest = json.loads((run / "manifest.json").read_text())
    for item in manifest["unpublished"]:
        item.pop("deleted", None)
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    unmarked = _invoke(["verify", str(run)], runs)
    assert unmarked.returncode != 0
    assert "gguf:base-F32.gguf: listed in the manifest but missing" in unmarked.stdout, unmarked.stdout[-3000:]
