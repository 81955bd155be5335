"""Router recalibration by ``objective = "model-kl"`` (issue 24, acceptance 1's objective): the
recipe input, the relaxed top-k, and the stage through ``invoke`` (deterministic, experts and
non-router tensors untouched, verify-prune's rerun reproducing the bytes).

The slow tests share one ``invoke reproduce --until recalibrate`` of the demo at 8 of 16 experts
with a small model-kl fit (one epoch on a few thousand tokens): what they check does not depend on
the fit's size; ``bench/recalibration.py`` measures the full one.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from invoke_cli import ROOT, invoke, invoke_ok

from moeprune.recalibrate import RECORD_NAME

sys.path.insert(0, str(ROOT / "bench"))
import recalibration as bench  # noqa: E402

DEMO_MODEL = ROOT / "src" / "moeprune" / "demo" / "model"


def model_kl_recipe(directory: Path, text: str | None, extra: str = "epochs = 1\nvalidate_every_steps = 2\n") -> Path:
    recipe = bench.DEMO_RECIPE.read_text(encoding="utf-8").replace('"../', f'"{ROOT}/').replace(
        'name = "demo"', 'name = "recalkl"', 1)
    section = '[recalibrate]\nenabled = true\nobjective = "model-kl"\nlearning_rate = 1e-3\n'
    section += f'text = "{text}"\n' if text is not None else ""
    recipe = re.sub(r"\[dropmap\]\n(?:.+\n)+", '[dropmap]\nstrategy = "uniform-count"\ncriterion = "contribution-sum"\n'
                    f"keep_count = 8\n\n{section}{extra}", recipe, count=1)
    path = directory / "recalkl.toml"
    path.write_text(recipe, encoding="utf-8")
    return path


def _write_text(path: Path) -> Path:
    from transformers import AutoTokenizer

    documents = bench.recalibration_documents(AutoTokenizer.from_pretrained(DEMO_MODEL), 48, 16)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_kl_run(tmp_path_factory) -> tuple[Path, Path, dict[str, str]]:
    work = tmp_path_factory.mktemp("recalkl")
    recipe = model_kl_recipe(work, str(_write_text(work / "text.jsonl")))
    env = {"MOEPRUNE_RUNS_DIR": str(work / "runs")}
    invoke_ok("reproduce", "--recipe", str(recipe), "--until", "recalibrate", "--no-live", env=env, timeout=3600)
    return recipe, work / "runs" / "recalkl", env


@pytest.mark.slow
def test_model_kl_refits_only_router_tensors_and_records_the_text(model_kl_run):
    from moeprune.hashing import sha256_file

    recipe, run, _env = model_kl_run
    record = json.loads((run / "recalibrated" / RECORD_NAME).read_text(encoding="utf-8"))
    settings = record["settings"]
    assert settings["objective"] == "model-kl" and settings["epochs"] == 1
    assert settings["text_sha256"] == sha256_file(Path(settings["text"]))
    fitted = record["model_fit"]
    assert fitted["changed"] and fitted["holdout_kl_after"] < fitted["holdout_kl_before"]
    assert [layer["layer"] for layer in record["layers"]] == [0, 1, 2, 3]
    for layer in record["layers"]:
        assert sorted(layer["tensors"]) == [f"model.language_model.layers.{layer['layer']}.router.per_expert_scale",
                                            f"model.language_model.layers.{layer['layer']}.router.proj.weight"]
    result = invoke_ok("verify-prune", "--recipe", str(recipe), env=_env, timeout=1800)
    assert "router tensors matching the record: 8" in result.stdout
    assert "rerun from the base, 8 router tensors compared" in result.stdout
    assert "result: OK" in result.stdout


@pytest.mark.slow
def test_model_kl_is_deterministic(model_kl_run):
    recipe, run, env = model_kl_run
    first = {p.name: p.read_bytes() for p in sorted((run / "recalibrated").iterdir())}
    invoke_ok("stage", "recalibrate", "--recipe", str(recipe), env=env, timeout=1800)
    assert {p.name: p.read_bytes() for p in sorted((run / "recalibrated").iterdir())} == first


@pytest.mark.slow
def test_verify_prune_reruns_the_model_kl_fit(model_kl_run, tmp_path):
    """A router tensor changed with its hash updated in the record passes the hash check; the rerun
    of the model-kl fit from the base catches it, naming the tensor."""
    from test_recalibrate import forge_router_tensor

    recipe, run, env = model_kl_run
    copy = tmp_path / "recalibrated"
    shutil.copytree(run / "recalibrated", copy)
    tensor = "model.language_model.layers.2.router.proj.weight"
    forge_router_tensor(copy, tensor, 2)
    result = invoke("verify-prune", "--recipe", str(recipe), "--pruned", str(copy), env=env, timeout=1800)
    assert result.returncode != 0
    assert f"tensor '{tensor}' differs from what the recalibration recomputes" in result.stdout


@pytest.mark.slow
def test_compare_criteria_fits_by_the_recipes_objective(model_kl_run, tmp_path):
    """compare-criteria's recovery table runs the recipe's objective, not the default one: its
    contribution-sum row at 8 of 16 holds the very router bytes the model-kl stage wrote for the
    same drop map (sha256 per tensor), and the page names the fit and the text."""
    from moeprune.hashing import sha256_file

    recipe, run, env = model_kl_run
    docs = tmp_path / "docs"
    invoke_ok("compare-criteria", "--recipe", str(recipe), "--docs-dir", str(docs), "--no-accuracy", "--limit", "4",
              env=env, timeout=3600)
    result = json.loads((docs / "criteria.json").read_text(encoding="utf-8"))
    source = result["source"]["recalibrate"]
    stage = json.loads((run / "recalibrated" / RECORD_NAME).read_text(encoding="utf-8"))
    text = stage["settings"]["text"]
    assert source["fit"] == "moeprune.recalibrate.stage.fit_routers_model_kl"
    assert source["settings"]["objective"] == "model-kl" and source["text_sha256"] == sha256_file(Path(text))
    row = next(r for r in result["rows"] if r["criterion"] == "contribution-sum" and r["keep_count"] == 8)
    assert row["recalibrated"]["tensors"] == {name: digest for layer in stage["layers"]
                                              for name, digest in layer["tensors"].items()}
    assert row["recalibrated"]["kld"] != row["kld"]
    assert "(`moeprune.recalibrate.stage.fit_routers_model_kl`" in (docs / "criteria.md").read_text(encoding="utf-8")


# --- fast: recipe, pure parts ----------------------------------------------------------------------


def test_model_kl_without_text_is_one_line_naming_the_field(tmp_path):
    result = invoke("check", "--recipe", str(model_kl_recipe(tmp_path, None)), in_process=True)
    assert result.returncode != 0
    assert "recalibrate.text" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_model_kl_with_a_missing_text_names_the_field_and_file(tmp_path):
    result = invoke("check", "--recipe", str(model_kl_recipe(tmp_path, "nowhere.jsonl")), in_process=True)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "field 'recalibrate.text'" in out and "nowhere.jsonl" in out and "Traceback" not in out


def test_a_bad_document_row_is_named(tmp_path):
    from moeprune.recalibrate.model_fit import ModelFitError, read_documents

    path = tmp_path / "text.jsonl"
    path.write_text('{"text": "ok"}\n\n{"txt": "no"}\n', encoding="utf-8")
    with pytest.raises(ModelFitError, match=r"text\.jsonl:3: not a recalibration document"):
        read_documents(path)


def test_the_bench_scores_on_questions_and_text_no_fit_or_eval_used():
    """bench/recalibration.py's second accuracy set and second scoring text hold no eval question
    and nothing of the texts the run used (here: the held-out file and a recalibration text)."""
    from transformers import AutoTokenizer

    from moeprune.demo.calibration import heldout_keys

    documents = bench.recalibration_documents(AutoTokenizer.from_pretrained(DEMO_MODEL), 200, 40)
    used = [bench.HELDOUT.read_text(encoding="utf-8"), *documents]
    taken = bench.question_keys(used)
    assert len(taken) > 200  # the regex finds the questions in both the plain and the chat format
    questions = bench.fresh_questions(400, used)
    keys = [q.key for q in questions]
    assert len(set(keys)) == 400 and not set(keys) & heldout_keys(0)
    assert not {(q.question, q.key[1]) for q in questions} & taken
    text = bench.fresh_text(used)
    assert bench.question_keys([text]) and not bench.question_keys([text]) & taken
    held_blocks = set(bench.HELDOUT.read_text(encoding="utf-8").strip().split("\n\n"))
    assert not held_blocks & set(text.strip().split("\n\n"))


def test_windows_start_with_bos_and_cover_every_token():
    from moeprune.recalibrate.model_fit import windows

    rows = windows([[2, 10, 11, 12, 13, 14], [20]], context_tokens=3, bos_id=2)
    assert rows == [[2, 10, 11], [2, 12, 13], [2, 14], [2, 20]]
    assert windows([[5]], context_tokens=4, bos_id=None) == []


def test_the_relaxed_top_k_becomes_the_hard_top_k_as_tau_falls():
    """At a small temperature the relaxed router's weights are the hard top-k's (zero elsewhere);
    at a large one the experts the hard top-k leaves out get weight (and so a gradient)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moeprune.patching import Patches
    from moeprune.recalibrate.model_fit import RelaxedTopK

    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    router = next(m for m in model.modules() if type(m).__name__ == "Gemma4TextRouter")
    hidden = torch.randn(32, router.hidden_size, generator=torch.Generator().manual_seed(0))
    _, hard_weights, hard_index = router(hidden)
    with Patches() as patches:
        relaxed = RelaxedTopK([router], hard_index.shape[1], patches)
        relaxed.active = True
        relaxed.tau = 1e-6
        _, weights, index = router(hidden)
        dense = torch.zeros_like(weights).scatter(1, hard_index, hard_weights)
        assert index.shape[1] == weights.shape[1] == dense.shape[1]
        assert torch.allclose(weights, dense, atol=1e-5)
        relaxed.tau = 1.0
        _, soft, _ = router(hidden)
        assert bool((soft[dense == 0] > 0).all())
    assert "forward" not in vars(router)
    assert torch.equal(router(hidden)[1], hard_weights)


def test_the_card_describes_a_model_kl_recalibration(tmp_path):
    """A model-kl record gets its own card section (held-out KL before and after, the relaxed top-k,
    the layers changed), not the per-layer MSE one it has no numbers for."""
    from types import SimpleNamespace

    from moeprune.card.numbers import CardNumbers, _recalibration_numbers
    from moeprune.card.render import TEMPLATE_PATH, _with_recalibration

    settings = {"learning_rate": 1e-3, "holdout_fraction": 0.1, "seed": 0, "max_steps": 200, "patience_steps": 20,
                "objective": "model-kl", "context_tokens": 128, "batch_sequences": 16, "epochs": 10,
                "relax_tau_start": 0.3, "relax_tau_end": 0.01, "validate_every_steps": 40, "text": "/x/text.jsonl",
                "text_sha256": "ab" * 32}
    record = {"settings": settings, "holdout_sequences": [],
              "model_fit": {"holdout_kl_before": 0.5, "holdout_kl_after": 0.4, "train_tokens": 1000,
                            "holdout_tokens": 100, "steps": 850, "best_step": 840, "changed": True},
              "layers": [{"layer": 0, "changed": True, "tensors": {}}, {"layer": 1, "changed": False, "tensors": {}}]}
    (tmp_path / RECORD_NAME).write_text(json.dumps(record), encoding="utf-8")
    card = CardNumbers()
    _recalibration_numbers(card, SimpleNamespace(source=SimpleNamespace(model_dir=tmp_path)))
    text = _with_recalibration("# Card\n\n## Evaluation\nscores\n", card, TEMPLATE_PATH)
    section = text.split("## Router recalibration", 1)[1].split("## Evaluation", 1)[0]
    assert "from 0.5000 to 0.4000 (\u221220.0%)" in section and "1 of 2 layers changed" in section
    assert "abababababab" in section and "Held-out MSE" not in section


def test_the_plan_counts_both_models_for_model_kl(tmp_path):
    """invoke check's plan gives model-kl's memory from the shapes: the base and the pruned model
    whole, at 4 bytes a parameter (the per-layer objective's line says one layer at a time)."""
    from moeprune.plan.disk import human
    from moeprune.plan.shapes import pruned_shapes, read_shapes

    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a b c"}\n', encoding="utf-8")
    base = read_shapes(DEMO_MODEL)
    config = base.config.get("text_config", base.config)
    pruned = pruned_shapes(base, config["num_experts"], {layer: 8 for layer in range(config["num_hidden_layers"])})
    expected = human((base.num_params + pruned.num_params) * 4)
    out = invoke_ok("check", "--recipe", str(model_kl_recipe(tmp_path, str(text))), in_process=True).stdout
    line = next(line for line in out.splitlines() if "objective 'model-kl'" in line)
    assert f"RAM ~{expected}" in line
    layer_mse = model_kl_recipe(tmp_path, str(text))
    layer_mse.write_text(layer_mse.read_text(encoding="utf-8").replace('"model-kl"', '"layer-mse"'), encoding="utf-8")
    out = invoke_ok("check", "--recipe", str(layer_mse), in_process=True).stdout
    assert "objective 'layer-mse', streamed replay" in out and "objective 'model-kl'" not in out
