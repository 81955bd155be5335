"""Router recalibration (issue 24, items 1-2): the recalibrate stage and what verify proves of it.

The slow tests share one `invoke reproduce --until recalibrate` of the demo at 8 of 16 experts
with `[recalibrate]` on (the ``recalibrated_run`` fixture, slow tier); the fast ones check the
recipe, the graph and the pure parts.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from invoke_cli import ROOT, invoke, invoke_ok

from moeprune.recalibrate import RECORD_NAME

DEMO = ROOT / "recipes" / "demo.toml"
KEEP = 8


def recalibration_recipe(directory: Path, name: str = "recal", max_steps: int = 40) -> Path:
    """The demo recipe (absolute paths) keeping 8 of 16 experts, with ``[recalibrate]`` enabled."""
    text = DEMO.read_text(encoding="utf-8").replace('"../', f'"{ROOT}/').replace('name = "demo"', f'name = "{name}"', 1)
    text = re.sub(r"\[dropmap\]\n(?:.+\n)+", f'[dropmap]\nstrategy = "uniform-count"\ncriterion = "contribution-sum"\n'
                  f"keep_count = {KEEP}\n\n[recalibrate]\nenabled = true\nmax_steps = {max_steps}\n", text, count=1)
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recalibrated_run(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    """(recipe, run directory, environment) of the demo reproduced up to the recalibrate stage."""
    work = tmp_path_factory.mktemp("recalibrate")
    recipe = recalibration_recipe(work)
    env = {"MOEPRUNE_RUNS_DIR": str(work / "runs")}
    invoke_ok("reproduce", "--recipe", str(recipe), "--until", "recalibrate", "--no-live", env=env, timeout=3600)
    return recipe, work / "runs" / "recal", env


def _digests(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def forge_router_tensor(recalibrated: Path, tensor: str, layer: int) -> None:
    """Change one byte of router ``tensor`` and write its new sha256 into the record, as a forger
    would: the hash check passes, only a rerun of the fit can tell."""
    from moeprune.hashing import sha256_bytes
    from moeprune.io.checkpoint import Checkpoint

    _flip_byte(recalibrated, tensor)
    with Checkpoint.open(recalibrated) as opened:
        digest = sha256_bytes(opened.read(opened[tensor]))
    record = json.loads((recalibrated / RECORD_NAME).read_text(encoding="utf-8"))
    next(entry for entry in record["layers"] if entry["layer"] == layer)["tensors"][tensor] = digest
    (recalibrated / RECORD_NAME).write_text(json.dumps(record), encoding="utf-8")


def _flip_byte(checkpoint: Path, tensor: str) -> None:
    """Flip one byte in the middle of ``tensor``'s data in its shard."""
    from moeprune.io.checkpoint import Checkpoint

    with Checkpoint.open(checkpoint) as opened:
        info = opened[tensor]
    offset = info.data_offset + info.nbytes // 2
    with open(info.shard, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0x01]))


def test_recalibrate_writes_the_pruned_checkpoint_with_refitted_router_tensors(recalibrated_run):
    _recipe, run, _env = recalibrated_run
    record = json.loads((run / "recalibrated" / RECORD_NAME).read_text(encoding="utf-8"))
    assert [layer["layer"] for layer in record["layers"]] == [0, 1, 2, 3]
    for layer in record["layers"]:
        assert sorted(layer["tensors"]) == [f"model.language_model.layers.{layer['layer']}.router.per_expert_scale",
                                            f"model.language_model.layers.{layer['layer']}.router.proj.weight"]
        assert layer["holdout_mse_after"] <= layer["holdout_mse_before"]
        assert layer["holdout_tokens"] > 0 and layer["train_tokens"] > 0
    assert any(layer["changed"] for layer in record["layers"]), record["layers"]
    pruned = _digests(run / "pruned")
    recalibrated = _digests(run / "recalibrated")
    assert set(recalibrated) - set(pruned) == {RECORD_NAME}
    assert all(recalibrated[name] == pruned[name] for name in pruned if not name.endswith(".safetensors"))


def test_recalibrate_is_deterministic(recalibrated_run):
    recipe, run, env = recalibrated_run
    first = _digests(run / "recalibrated")
    invoke_ok("stage", "recalibrate", "--recipe", str(recipe), env=env, timeout=1800)
    assert _digests(run / "recalibrated") == first


def test_verify_prune_proves_the_recalibrated_checkpoint(recalibrated_run):
    recipe, _run, env = recalibrated_run
    result = invoke_ok("verify-prune", "--recipe", str(recipe), env=env, timeout=1800)
    assert "router tensors matching the record: 8" in result.stdout
    assert "rerun from the base, 8 router tensors compared" in result.stdout
    assert "result: OK" in result.stdout


@pytest.mark.parametrize("tensor", ["model.language_model.layers.1.router.proj.weight",
                                    "model.language_model.layers.2.experts.gate_up_proj"])
def test_verify_prune_names_a_flipped_byte(recalibrated_run, tmp_path, tensor):
    recipe, run, env = recalibrated_run
    copy = tmp_path / "recalibrated"
    shutil.copytree(run / "recalibrated", copy)
    _flip_byte(copy, tensor)
    result = invoke("verify-prune", "--recipe", str(recipe), "--pruned", str(copy), env=env, timeout=1800)
    assert result.returncode != 0
    named = [line for line in result.stdout.splitlines() if f"tensor '{tensor}'" in line]
    assert len(named) == 1 and "differ" in named[0], result.stdout


def test_verify_prune_reruns_the_recalibration(recalibrated_run, tmp_path):
    """A router tensor changed with its hash updated in the record passes the hash check; the rerun
    of the recalibration from the base catches it, naming the tensor."""
    recipe, run, env = recalibrated_run
    copy = tmp_path / "recalibrated"
    shutil.copytree(run / "recalibrated", copy)
    tensor = "model.language_model.layers.3.router.per_expert_scale"
    forge_router_tensor(copy, tensor, 3)
    result = invoke("verify-prune", "--recipe", str(recipe), "--pruned", str(copy), env=env, timeout=1800)
    assert result.returncode != 0
    assert f"tensor '{tensor}' differs from what the recalibration recomputes" in result.stdout


# --- fast: recipe, graph, pure parts --------------------------------------------------------------


def test_recalibration_is_off_by_default_and_absent_from_the_settings():
    from moeprune.recipe import load_recipe

    recipe = load_recipe(DEMO)
    assert recipe.recalibrate.enabled is False
    assert "recalibrate" not in recipe.settings()  # the demo's recorded settings and hashes are unchanged


def test_the_recalibrate_stage_follows_prune_and_writes_nothing_when_off(tmp_path):
    from moeprune.layout import RunLayout
    from moeprune.pipeline.stages import build_pipeline
    from moeprune.recalibrate.stage import run_recalibrate
    from moeprune.recipe import load_recipe

    names = build_pipeline().names
    assert names.index("prune") + 1 == names.index("recalibrate") < names.index("convert-pruned")
    layout = RunLayout(tmp_path / "run")
    assert run_recalibrate(load_recipe(DEMO), layout) is None
    assert not layout.root.exists()


def test_an_enabled_recipe_converts_the_recalibrated_checkpoint(tmp_path):
    from moeprune.pipeline.stages import _hf_dir
    from moeprune.recipe import load_recipe

    recipe = load_recipe(recalibration_recipe(tmp_path))
    assert recipe.settings()["recalibrate"]["enabled"] is True

    class Ctx:
        pass

    ctx = Ctx()
    ctx.recipe = recipe
    from moeprune.layout import RunLayout

    ctx.layout = RunLayout(tmp_path / "run")
    assert _hf_dir(ctx, "pruned") == ctx.layout.recalibrated_dir


def test_the_held_out_split_is_seeded_whole_sequences():
    from moeprune.recalibrate.stage import holdout_ids

    sequences = [{"id": f"s{i}"} for i in range(25)]
    first = holdout_ids(sequences, 0.2, 0)
    assert first == holdout_ids(sequences, 0.2, 0) and len(first) == 5
    assert holdout_ids(sequences, 0.2, 1) != first


def test_the_adapter_names_the_router_tensors_a_recalibration_may_change():
    from moeprune.arch import arch_for_dir

    arch = arch_for_dir(ROOT / "src" / "moeprune" / "demo" / "model")
    names = ["model.language_model.layers.0.router.proj.weight", "model.language_model.layers.0.router.per_expert_scale",
             "model.language_model.layers.0.router.scale", "model.language_model.layers.0.experts.gate_up_proj",
             "model.language_model.layers.1.router.proj.weight"]
    assert arch.recalibrated_tensors(names, 0) == ["model.language_model.layers.0.router.per_expert_scale",
                                                   "model.language_model.layers.0.router.proj.weight"]


class _Quadratic:
    """Train loss (w - train_at)^2, held-out loss (w - held_at)^2."""

    def __init__(self, parameter, train_at: float, held_at: float) -> None:
        self.parameter, self.at = parameter, {"train": train_at, "holdout": held_at}

    def loss(self, part: str, backward: bool) -> float:
        value = ((self.parameter - self.at[part]) ** 2).sum()
        if backward:
            value.backward()
        return float(value.detach())


def test_the_fit_stops_early_on_the_held_out_loss():
    import torch

    from moeprune.recalibrate.fit import FitSettings, fit_layer

    w = torch.nn.Parameter(torch.tensor([1.0]), requires_grad=False)
    result = fit_layer({"w": w}, _Quadratic(w, train_at=3.0, held_at=2.0), FitSettings(2000, 0.05, 10),
                       {"w": torch.bfloat16})
    assert result.changed and result.steps < 2000 and result.best_step < result.steps
    assert abs(float(result.values["w"]) - 2.0) < 0.05 and result.values["w"].dtype == torch.bfloat16
    assert result.holdout_mse_after < result.holdout_mse_before


def test_a_fit_without_held_out_gain_keeps_the_pruned_router():
    import torch

    from moeprune.recalibrate.fit import FitSettings, fit_layer

    w = torch.nn.Parameter(torch.tensor([2.0]), requires_grad=False)
    result = fit_layer({"w": w}, _Quadratic(w, train_at=3.0, held_at=2.0), FitSettings(50, 0.05, 5),
                       {"w": torch.bfloat16})
    assert not result.changed and result.best_step == 0
    assert float(result.values["w"]) == 2.0 and float(w) == 2.0
    assert result.holdout_mse_after == result.holdout_mse_before
