"""A recalibrated run publishes what it measured, and shows the cost side by side (issue 24, item 3).

With ``[recalibrate]`` on, the published safetensors are the recalibrated checkpoint the GGUFs were
converted from (with its ``recalibrate.json``), the card describes the recalibration from that
record, and the plain pruned model (the same checkpoint before recalibration) is converted,
evaluated and KLD-scored beside it at the same quant type, unpublished. verify checks the
published router tensors against the record, and with ``--base`` reruns the fit.

The slow tests share one `invoke reproduce` of the demo at 8 of 16 experts with recalibration on,
to the manifest (the ``recalibrated_full_run`` fixture); verify then runs on it and on a tampered
copy. The fast ones check the graph, the layout and the manifest's mapping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from invoke_cli import ROOT, invoke, invoke_ok
from test_recalibrate import DEMO, _flip_byte, recalibration_recipe

from moeprune.recalibrate import RECORD_NAME

BASE = ROOT / "src" / "moeprune" / "demo" / "model"
NAME = "recal"
WIDE = {"COLUMNS": "1000"}  # verify's table unwrapped: each finding on one line
ROUTER = "model.language_model.layers.1.router.proj.weight"


@pytest.fixture(scope="module")
def recalibrated_full_run(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(recipe, run directory, environment) of the demo at 8 of 16 experts, recalibrated, reproduced
    to the end (card and manifest included)."""
    work = tmp_path_factory.mktemp("recalibrated-card")
    recipe = recalibration_recipe(work, name=NAME)
    env = {"MOEPRUNE_RUNS_DIR": str(work / "runs")}
    invoke_ok("reproduce", "--recipe", str(recipe), "--no-live", env=env, timeout=3600)
    return recipe, work / "runs" / NAME, env


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_the_published_checkpoint_is_the_recalibrated_one(recalibrated_full_run):
    from moeprune.hashing import sha256_file

    _recipe, run, _env = recalibrated_full_run
    manifest = _json(run / "manifest.json")
    model_root = {e["path"]: e["sha256"] for e in manifest["files"] if e["repo"] == "model" and "/" not in e["path"]}
    recalibrated = {p.name: sha256_file(p) for p in (run / "recalibrated").iterdir()}
    assert RECORD_NAME in model_root
    assert {name: model_root[name] for name in recalibrated} == recalibrated
    plain_shards = {sha256_file(p) for p in (run / "pruned").glob("*.safetensors")}
    published_shards = {sha for name, sha in model_root.items() if name.endswith(".safetensors")}
    assert published_shards and plain_shards - published_shards, "some shard holds a refitted router tensor"
    # The GGUFs were converted from the published shards; the plain pruned GGUFs are measured, not published.
    converted = _json(run / "gguf" / f"{NAME}-F32.gguf.json")
    assert {k: v for k, v in converted["source_files"].items() if k.endswith(".safetensors")} == \
        {k: v for k, v in model_root.items() if k.endswith(".safetensors")}
    unpublished = {e["path"] for e in manifest["unpublished"]}
    assert {f"{NAME}-plain-F32.gguf", f"{NAME}-plain-Q4_K_M.gguf"} <= unpublished
    assert not any("plain" in e["path"] for e in manifest["files"] if e["repo"] == "gguf")
    assert {"eval/plain/run.json", "eval/kld/plain-Q4_K_M.txt"} <= {e["path"] for e in manifest["files"]}


def test_the_card_shows_base_plain_and_recalibrated_side_by_side(recalibrated_full_run):
    _recipe, run, _env = recalibrated_full_run
    record = _json(run / "recalibrated" / RECORD_NAME)
    numbers = _json(run / "card" / "card_numbers.json")
    n = numbers["numbers"]
    readme = (run / "card" / "README.md").read_text(encoding="utf-8")
    results = _json(run / "eval" / "results.json")
    kld = _json(run / "eval" / "kld.json")

    assert sorted(results["models"]) == ["base", "plain", "pruned"]
    rows = {row["role"]: row for row in kld["rows"]}
    assert rows["plain-eval"]["quant_type"] == rows["pruned-eval"]["quant_type"] == "Q4_K_M"
    assert rows["plain-eval"]["gguf"]["sha256"] == results["models"]["plain"]["gguf"]["sha256"]
    assert rows["plain-eval"]["gguf"]["sha256"] != rows["pruned-eval"]["gguf"]["sha256"]

    # The recalibration section: its numbers come from recalibrate.json, never typed.
    assert "## Router recalibration" in readme
    assert readme.index("## Router recalibration") < readme.index("## Evaluation")
    for layer in record["layers"]:
        key = f"recal.layer.{layer['layer']}"
        assert n[f"{key}.before"]["value"] == layer["holdout_mse_before"]
        assert n[f"{key}.after"]["value"] == layer["holdout_mse_after"]
        assert (f"| {layer['layer']} | {n[key + '.before']['display']} | {n[key + '.after']['display']} | "
                f"{n[key + '.change']['display']} | {n[key + '.steps']['display']} |") in readme
    assert n["recal.max_steps"]["value"] == record["settings"]["max_steps"] == 40
    assert n["recal.holdout_sequences"]["value"] == len(record["holdout_sequences"])

    # Three columns: base, plain pruned, pruned + recalibrated, at the same quant type.
    assert "| | base | plain pruned | pruned + recalibrated (this model) |" in readme
    table = {row["name"]: row["cells"] for row in numbers["tables"]["side_by_side"]}
    assert table["Mean KLD (nats/token)"] == ["kld.base-Q4_K_M.kld", "kld.plain-Q4_K_M.kld", "kld.pruned-Q4_K_M.kld"]
    assert table["demo_mcq (flexible-extract)"] == [f"eval.{m}.demo_mcq.flexible-extract" for m in ("base", "plain", "pruned")]
    for name, keys in table.items():
        assert f"| {name} | " + " | ".join(n[key]["display"] for key in keys) + " |" in readme
    assert n["kld.plain-Q4_K_M.kld"]["value"] == rows["plain-eval"]["mean_kld"]["value"]
    ratio = rows["pruned-eval"]["mean_kld"]["value"] / rows["plain-eval"]["mean_kld"]["value"]
    assert n["recal.kld_ratio"]["value"] == pytest.approx(ratio)
    assert "**plain** on `demo_mcq`" in readme  # its scores and error analysis, like every evaluated model's
    assert any(row["name"] == "plain pruned Q4_K_M (before recalibration)" for row in numbers["tables"]["kld"])


def test_verify_passes_the_recalibrated_run_and_reruns_the_fit(recalibrated_full_run):
    _recipe, run, env = recalibrated_full_run
    result = invoke_ok("verify", str(run), "--base", str(BASE), env={**env, **WIDE}, timeout=1800)
    assert "recalibrated router as recorded" in result.stdout
    assert "rerun from the base, 8 router tensors compared" in result.stdout


def test_verify_names_the_shard_of_a_router_tensor_that_differs_from_the_record(recalibrated_full_run, tmp_path):
    """A router tensor changed after the fit, with the manifest rewritten to match: the record still
    names its sha256, and verify (no --base needed) names the shard and the tensor."""
    from moeprune.io.checkpoint import Checkpoint

    recipe, run, _env = recalibrated_full_run
    copy = tmp_path / "runs" / NAME
    shutil.copytree(run, copy, symlinks=True)
    _flip_byte(copy / "recalibrated", ROUTER)
    with Checkpoint.open(copy / "recalibrated") as opened:
        shard = opened[ROUTER].shard.name
    env = {"MOEPRUNE_RUNS_DIR": str(tmp_path / "runs")}
    invoke_ok("manifest", "--recipe", str(recipe), env=env, timeout=900)
    result = invoke("verify", str(copy), env={**env, **WIDE}, timeout=1800)
    assert result.returncode != 0
    assert f"{shard}: tensor '{ROUTER}' differs from the sha256 {RECORD_NAME} records for it" in result.stdout


def test_the_hub_gets_the_recalibrated_checkpoint_and_verify_reruns_the_fit_from_it(recalibrated_full_run, tmp_path,
                                                                                   monkeypatch):
    """Published to a local Hub and verified by repo id: the model repo holds the recalibrated
    shards and record, and verify --base refits the router from the published profile sequences."""
    import huggingface_hub.constants as constants
    from hub_server import FakeHub

    from moeprune.layout import RunLayout
    from moeprune.publish import publish
    from moeprune.recipe import load_recipe
    from moeprune.verify import verify

    recipe, run, _env = recalibrated_full_run
    token = "hf_testtoken_0123456789abcdefghij"
    hf = tmp_path / "hf"
    for name, value in (("HF_HOME", hf), ("HF_HUB_CACHE", hf / "hub"), ("HF_TOKEN_PATH", hf / "token")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, str(value))  # read at import time by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_TOKEN", token)
    copy = tmp_path / "runs" / NAME
    shutil.copytree(run, copy, symlinks=True)
    with FakeHub(token) as hub:
        publish(RunLayout(copy), load_recipe(recipe).settings(), "me/recal", "me/recal-GGUF", endpoint=hub.endpoint)
        model = hub.repos["me/recal"]
        files = model.commits[model.head]
        for path in (copy / "recalibrated").iterdir():
            assert files[path.name] == path.read_bytes(), path.name
        assert not any("plain" in name for name in hub.repos["me/recal-GGUF"].commits[hub.repos["me/recal-GGUF"].head])
        report = verify("me/recal", BASE, endpoint=hub.endpoint)
        assert report.ok, [(c.name, c.detail) for c in report.failures]
        base_check = next(c for c in report.checks if c.name == "kept experts bit-exact")
        assert "rerun from the base, 8 router tensors compared" in base_check.detail
        assert any(c.name == "recalibrated router as recorded" and c.ok for c in report.checks)


# --- fast: graph, layout, manifest mapping, preflight ------------------------------------------


def _context(recipe_path: Path, root: Path) -> SimpleNamespace:
    from moeprune.layout import RunLayout
    from moeprune.recipe import load_recipe

    return SimpleNamespace(recipe=load_recipe(recipe_path), layout=RunLayout(root), cache={}, tools={})


def test_the_plain_pruned_model_is_measured_only_with_recalibration(tmp_path):
    from moeprune.pipeline.stages import build_pipeline

    stages = {stage.name: stage for stage in build_pipeline().stages}
    off, on = _context(DEMO, tmp_path / "demo"), _context(recalibration_recipe(tmp_path), tmp_path / NAME)
    for name in ("convert-plain", "quantize-plain", "eval-plain"):
        assert stages[name].outs(off) == [] and stages[name].deps(off) == []
        assert stages[name].action(off) == {}
    assert stages["convert-plain"].deps(on) == [on.layout.pruned_dir]
    assert stages["convert-pruned"].deps(on) == [on.layout.recalibrated_dir]
    assert on.layout.gguf_path("plain", "Q4_K_M") in stages["quantize-plain"].outs(on)
    assert stages["eval-plain"].outs(on) == [on.layout.eval_model_dir("plain")]
    assert on.layout.eval_model_dir("plain") in stages["results"].deps(on)
    assert on.layout.eval_model_dir("plain") not in stages["results"].deps(off)


def test_the_layout_names_the_plain_gguf_apart_from_the_pruned_one(tmp_path):
    from moeprune.layout import RunLayout

    layout = RunLayout(tmp_path / "demo")
    assert layout.gguf_path("plain", "q4_k_m").name == "demo-plain-Q4_K_M.gguf"
    assert layout.gguf_role("demo-plain-Q4_K_M.gguf") == "plain"
    assert layout.gguf_role("demo-Q4_K_M.gguf") == "pruned"
    # a run named like another's plain files: its own pruned GGUFs stay pruned
    assert RunLayout(tmp_path / "demo-plain").gguf_role("demo-plain-Q4_K_M.gguf") == "pruned"


def test_the_manifest_maps_the_checkpoint_the_recipe_converted(tmp_path):
    from moeprune.layout import RunLayout
    from moeprune.manifest import artifact_files

    layout = RunLayout(tmp_path / "demo")
    for directory, content in ((layout.pruned_dir, b"plain"), (layout.recalibrated_dir, b"refitted")):
        directory.mkdir(parents=True)
        (directory / "model.safetensors").write_bytes(content)
    layout.gguf_dir.mkdir()
    for name in ("demo-Q4_K_M.gguf", "demo-plain-Q4_K_M.gguf", "base-Q4_K_M.gguf"):
        (layout.gguf_dir / name).write_bytes(b"GGUF")
    for settings, expected in (({}, layout.pruned_dir), ({"recalibrate": {"enabled": True}}, layout.recalibrated_dir)):
        published, unpublished = artifact_files(layout, settings)
        shards = [f.local_path for f in published if f.path_in_repo == "model.safetensors"]
        assert shards == [expected / "model.safetensors"]
        assert [f.path_in_repo for f in published if f.repo == "gguf"] == ["demo-Q4_K_M.gguf"]
        assert [f.path_in_repo for f in unpublished] == ["base-Q4_K_M.gguf", "demo-plain-Q4_K_M.gguf"]


def test_card_manifest_and_publish_accept_a_recalibrated_run(tmp_path):
    """They describe the recalibrated checkpoint now: nothing is refused for it."""
    from moeprune.preflight import preflight
    from moeprune.recipe import load_recipe

    recipe = load_recipe(recalibration_recipe(tmp_path))
    assert not preflight(recipe, ["card", "manifest", "publish", "convert-plain", "eval-plain"]).errors


def test_results_refuse_a_plain_evaluation_the_recipe_no_longer_measures(tmp_path):
    """eval/plain left by a recalibrated run would go into results.json and onto the card of a run
    that measured no plain model: refused in one line naming the directory."""
    from moeprune.errors import MoepruneError
    from moeprune.pipeline.stages import build_pipeline

    off = _context(DEMO, tmp_path / "demo")
    stale = off.layout.eval_model_dir("plain")
    stale.mkdir(parents=True)
    results = next(stage for stage in build_pipeline().stages if stage.name == "results")
    with pytest.raises(MoepruneError, match=f"^{stale}: the evaluation of the 'plain' model, which this recipe does "
                                            "not measure"):
        results.action(off)
