"""The model card: every number from artifacts, valid Hub metadata, plots, no network."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket

import pytest
from fakerun import NUM_LAYERS, TASK, make_fake_run

from moeprune.card.numbers import checkpoint_facts, fmt_bytes, fmt_count, fmt_pct, fmt_pp, fmt_signed_pct
from moeprune.card.render import card_context, card_data, run_card
from moeprune.errors import MoepruneError


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("card") / "work", with_manifest=False)


@pytest.fixture(scope="module")
def card_text(fake_run) -> str:
    return (fake_run.layout.card_dir / "README.md").read_text()


@pytest.fixture(scope="module")
def numbers(fake_run) -> dict:
    return json.loads((fake_run.layout.card_dir / "card_numbers.json").read_text())["numbers"]


def test_card_round_trips_through_modelcard_load(fake_run):
    from huggingface_hub import ModelCard

    card = ModelCard.load(fake_run.layout.card_dir / "README.md", ignore_metadata_errors=False)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["moe", "expert-pruning", "test"]
    assert "base_model" not in data  # a local base directory is no Hub id
    results = card.data.eval_results
    assert {r.metric_name for r in results} == {"exact_match (flexible-extract)", "exact_match (strict-match)"}
    assert all(r.dataset_type == TASK for r in results)
    assert card.data.model_name == "fake-pruned"


def test_hub_base_model_goes_into_metadata(fake_run):
    from moeprune.card.numbers import CardNumbers

    context = card_context(fake_run.recipe.settings(), "google/gemma-4-26B-A4B-it", {"moeprune": "0.1.0"})
    data = card_data(CardNumbers(), context).to_dict()
    assert data["base_model"] == "google/gemma-4-26B-A4B-it"
    assert "[google/gemma-4-26B-A4B-it](https://huggingface.co/google/gemma-4-26B-A4B-it)" == context["base_link"]


def test_every_number_appears_on_the_card_with_a_source(card_text, numbers):
    assert len(numbers) > 50
    for key, number in numbers.items():
        assert number["display"] in card_text, key
        assert number["source"], key


def test_numbers_are_computed_from_artifacts(fake_run, numbers):
    layout = fake_run.layout
    base = checkpoint_facts(fake_run.base_dir)
    pruned = checkpoint_facts(layout.pruned_dir)
    # the base count is derived from pruned headers + drop map, and equals the real base
    assert numbers["params.base"]["value"] == base.params
    assert numbers["params.pruned"]["value"] == pruned.params
    assert numbers["weights.base_bytes"]["value"] == base.tensor_bytes
    assert numbers["gguf.pruned_bytes"]["value"] == (layout.gguf_dir / "fake-Q4_K_M.gguf").stat().st_size
    assert numbers["gguf.base_bytes"]["value"] == (layout.gguf_dir / "base-Q4_K_M.gguf").stat().st_size
    drop_map = json.loads(layout.drop_map_path.read_text())
    for entry in drop_map["layers"]:
        assert numbers[f"retention.L{entry['layer']}"]["value"] == entry["retained_fraction"]
    results = json.loads(layout.results_path.read_text())
    score = results["models"]["pruned"]["tasks"][TASK]["scores"]["flexible-extract"]["exact_match"]
    assert numbers[f"eval.pruned.{TASK}.flexible-extract"]["display"] == f"{fmt_pct(score['value'])} ± {fmt_pct(score['stderr'])}"
    comparison = results["comparisons"][TASK]
    assert numbers[f"cmp.{TASK}.p"]["value"] == comparison["mcnemar"]["p_value"]
    config = json.loads((layout.pruned_dir / "config.json").read_text())["text_config"]
    assert numbers["experts.config"]["value"] == config["num_experts"] == numbers["experts.pruned"]["value"]


def test_sections_of_the_reference_card(card_text):
    for heading in ("## Pruning method", "### Key findings", "## Pruning decision", "### Setup", "### Configuration",
                    "### Results", "### Error analysis", "## Architecture", "## Files", "## How to use",
                    "## Reproduction"):
        assert heading in card_text
    assert "| Layer | Retained % | Layer | Retained % | Layer | Retained % |" in card_text
    rows = [l for l in card_text.splitlines() if l.startswith("| L0 ")]
    assert len(rows) == 1 and rows[0].count("|") == 7
    table_rows = [l for l in card_text.splitlines() if re.match(r"^\| L\d", l)]
    assert len(table_rows) == math.ceil(NUM_LAYERS / 3)
    assert "| **base correct** |" in card_text  # the paired comparison


def test_plots_are_pngs(fake_run):
    plots = fake_run.layout.card_dir / "plots"
    for name in ("retention.png", "concentration.png", "gini.png", "agreement.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name})" in (fake_run.layout.card_dir / "README.md").read_text()


def test_rendering_uses_no_network(fake_run, tmp_path, monkeypatch):
    run = tmp_path / "runs" / "fake"
    shutil.copytree(fake_run.layout.root, run)

    def refuse(*args, **kwargs):
        raise AssertionError("the card tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    from moeprune.layout import RunLayout

    layout = RunLayout(run)
    before = {p.relative_to(layout.card_dir): p.read_bytes() for p in layout.card_dir.rglob("*") if p.is_file()}
    run_card(fake_run.recipe, layout)
    after = {p.relative_to(layout.card_dir): p.read_bytes() for p in layout.card_dir.rglob("*") if p.is_file()}
    assert after == before  # deterministic: text, numbers and plots byte for byte


def test_missing_results_is_a_clear_error(fake_run, tmp_path):
    from moeprune.layout import RunLayout

    run = tmp_path / "runs" / "fake"
    shutil.copytree(fake_run.layout.root, run)
    (run / "eval" / "results.json").unlink()
    with pytest.raises(MoepruneError, match="invoke eval"):
        run_card(fake_run.recipe, RunLayout(run))


@pytest.mark.parametrize(
    ("value", "text"),
    [(22.4e9, "22.4B"), (26e9, "26.0B"), (551_364, "551K"), (1_234_567, "1.23M"), (512, "512")],
)
def test_fmt_count(value, text):
    assert fmt_count(value) == text


def test_formats():
    assert fmt_bytes(14_000_000_000) == "14.0 GB"
    assert fmt_bytes(2_205_456) == "2.21 MB"
    assert fmt_pct(0.7172) == "71.72%"
    assert fmt_pp(-0.0353) == "−3.53 pp"
    assert fmt_signed_pct(-0.14, 0) == "−14%"


def test_gguf_repo_card_lists_published_gguf_files(fake_run, numbers):
    from huggingface_hub import ModelCard

    path = fake_run.layout.card_dir / "gguf" / "README.md"
    card = ModelCard.load(path, ignore_metadata_errors=False)
    assert card.data.base_model == "me/fake-pruned"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert "gguf" in card.data.tags
    text = path.read_text()
    assert f"| `fake-Q4_K_M.gguf` | {numbers['gguf.file.fake-Q4_K_M.gguf']['display']} |" in text
    assert "base-Q4_K_M.gguf" not in text  # the base GGUF is not published


def test_card_states_bits_per_weight_and_fallbacks_read_from_each_gguf(fake_run, card_text, numbers):
    """Each published GGUF and both evaluated ones: bits per weight from the file's tensors, and the
    quantize record's fallbacks counted per (requested -> actual) type; on both cards."""
    from fakerun import FAKE_GGUF_FALLBACKS, FAKE_GGUF_TENSORS

    from moeprune.plan.ggml import tensor_bytes

    gguf_dir = fake_run.layout.gguf_dir
    for name in ("fake-Q4_K_M.gguf", "base-Q4_K_M.gguf"):
        rows = 10 if name.startswith("fake") else 12  # the stand-ins' rows (fakerun.write_gguf)
        numel = {t: ncols * (1 if qtype == "F32" else rows) for t, ncols, qtype in FAKE_GGUF_TENSORS}
        data_bytes = sum(tensor_bytes(qtype, numel[t], ncols) for t, ncols, qtype in FAKE_GGUF_TENSORS)
        assert numbers[f"gguf.bpw.{name}"]["value"] == pytest.approx(8 * data_bytes / sum(numel.values()), rel=1e-12)
        assert (gguf_dir / name).stat().st_size > data_bytes  # not the file size: metadata is not weights
        for tensor, requested in FAKE_GGUF_FALLBACKS.items():
            actual = next(qtype for t, _, qtype in FAKE_GGUF_TENSORS if t == tensor)
            assert numbers[f"gguf.fallback.{name}.{requested}->{actual}"]["value"] == 1
    base, pruned = (numbers[f"gguf.bpw.{p}-Q4_K_M.gguf"]["display"] for p in ("base", "fake"))
    assert f"| GGUF Q4_K_M bits per weight | {base} | {pruned} | — |" in card_text
    assert (f"- `fake-Q4_K_M.gguf`: {pruned} bits per weight (tensor bytes × 8 / weights, read from the file); "
            "tensors whose rows do not fit the type's blocks fell back: Q4_K → Q5_0 ×1, Q6_K → Q8_0 ×1") in card_text
    gguf_card = (fake_run.layout.card_dir / "gguf" / "README.md").read_text()
    assert f"| `fake-Q4_K_M.gguf` | {numbers['gguf.file.fake-Q4_K_M.gguf']['display']} | {pruned} | " \
           "Q4_K → Q5_0 ×1, Q6_K → Q8_0 ×1 |" in gguf_card
    converted = numbers["gguf.bpw.fake-Q8_0.gguf"]["display"]
    assert f"| `fake-Q8_0.gguf` | {numbers['gguf.file.fake-Q8_0.gguf']['display']} | {converted} | none |" in gguf_card


def test_card_refuses_a_quantize_record_that_disagrees_with_its_gguf(tmp_path):
    run = make_fake_run(tmp_path / "work", with_card=False, with_manifest=False)
    record_path = run.layout.gguf_dir / "fake-Q4_K_M.gguf.json"
    record = json.loads(record_path.read_text())
    record["fallbacks"]["tensors"][0]["actual_type"] = "q8_0"  # the file stores blk.0.ffn_down_exps as Q5_0
    record_path.write_text(json.dumps(record))
    with pytest.raises(MoepruneError, match=r"gguf/fake-Q4_K_M.gguf: .*ffn_down_exps.weight fell back to Q8_0, "
                                            r"the GGUF stores it as Q5_0"):
        run_card(run.recipe, run.layout)
