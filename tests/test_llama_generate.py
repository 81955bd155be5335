"""Phase 1 through llama-server: the pure parts, and a real run on the demo model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fakerun import demo_recipe_text
from moeprune.profile.llama_generate import (
    completion_request,
    context_size,
    cut_at_eos,
    round_trip_mismatch,
)
from moeprune.demo import MODEL_DIR as DEMO_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_completion_request_is_greedy_on_the_given_ids():
    body = completion_request([2, 5, 9], 7)
    assert body["prompt"] == [2, 5, 9] and body["n_predict"] == 7
    assert body["samplers"] == ["top_k"] and body["top_k"] == 1
    assert body["return_tokens"] is True and body["cache_prompt"] is False


def test_context_size_fits_the_longest_prompt_and_the_continuation():
    assert context_size([10, 300], 32) == 512
    assert context_size([10], 32) == 256
    assert context_size([255], 1) == 512


def test_cut_at_eos_keeps_the_eos_token():
    assert cut_at_eos([5, 6, 1, 7], {1}) == [5, 6, 1]
    assert cut_at_eos([5, 6], {1}) == [5, 6]


def test_round_trip_detects_a_non_canonical_tokenization():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    ids = tokenizer("The answer is 42.", add_special_tokens=False)["input_ids"]
    assert round_trip_mismatch(tokenizer, ids) is None
    # Split one multi-character token into its characters: same text, other ids.
    long_token = next(i for i, t in enumerate(ids) if len(tokenizer.decode([t])) > 1)
    pieces = [tokenizer.convert_tokens_to_ids(c) for c in tokenizer.convert_ids_to_tokens(ids[long_token])]
    if any(p == tokenizer.unk_token_id or p is None for p in pieces):
        pytest.fail("the demo vocabulary should hold single characters")
    split = ids[:long_token] + pieces + ids[long_token + 1 :]
    assert tokenizer.decode(split) == tokenizer.decode(ids)
    position, again = round_trip_mismatch(tokenizer, split)
    assert position == long_token and again == ids


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory, llama_build_shared) -> Path:
    """The demo base model converted to f16 GGUF with the pinned llama.cpp (built on first use)."""
    from moeprune.llamacpp.convert import convert_to_gguf

    out = tmp_path_factory.mktemp("gguf") / "demo-base-F16.gguf"
    convert_to_gguf(llama_build_shared, DEMO_MODEL_DIR, out, "f16", log_path=out.with_suffix(".log"))
    return out


def _recipe(tmp_path: Path, gguf: Path | None, generate: str, check_inputs: bool = True):
    from moeprune.recipe import load_recipe

    text = demo_recipe_text()
    extra = f'generate = "{generate}"\n' + (f'generate_gguf = "{gguf}"\n' if gguf else "")
    text = text.replace("[profile]\n", "[profile]\n" + extra)
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return load_recipe(path, check_inputs=check_inputs)


def test_phase1_through_llama_server_on_the_demo(tmp_path, demo_gguf):
    from transformers import AutoTokenizer

    from moeprune.layout import RunLayout
    from moeprune.profile.generate import read_sequences
    from moeprune.profile.stage import run_profile

    recipe = _recipe(tmp_path, demo_gguf, "llama-server")
    layout = RunLayout.for_recipe(recipe.name, runs_dir=tmp_path / "runs")
    summary = run_profile(recipe, layout, progress=False)

    generator = summary["phase1"]["generator"]
    assert generator["name"] == "llama-server" and generator["gguf"] == demo_gguf.name
    assert generator["n_gpu_layers"] == 0 and len(generator["gguf_sha256"]) == 64
    sequences = read_sequences(layout.sequences_path)
    num_prompts = sum(1 for line in (ROOT / "calibration" / "demo.jsonl").read_text().splitlines() if line.strip())
    assert len(sequences) == num_prompts and summary["phase1"]["generated"] == num_prompts
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    responses = 0
    for record in sequences:
        assert record["generator"] == generator
        ids = record["input_ids"]
        # Every generated id round-trips through the HF tokenizer on its own ...
        for token in ids[record["prompt_len"] :]:
            assert tokenizer(tokenizer.decode([token]), add_special_tokens=False)["input_ids"] == [token]
        # ... and the record says whether the whole sequence is the tokenizer's own tokenization.
        text = tokenizer.decode(ids, skip_special_tokens=False)
        canonical = tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        assert record["canonical"] is canonical, record["id"]
        if not canonical:
            assert any(record["id"] in w for w in summary["warnings"])
        responses += len(ids) - record["prompt_len"]
        assert len(ids) - record["prompt_len"] <= recipe.calibration.max_new_tokens
    assert responses > 0
    assert summary["num_response_tokens"] == responses

    # The card names the generator and the GGUF from profile.json.
    from types import SimpleNamespace

    from moeprune.card.numbers import CardNumbers, _phase1_facts

    card = CardNumbers()
    _phase1_facts(card, SimpleNamespace(stats_path=layout.profile_stats_path), recipe.settings()["profile"])
    assert card.facts["phase1_gguf"] == demo_gguf.name
    assert card.facts["phase1_gguf_sha256"] == generator["gguf_sha256"]
    template = (ROOT / "model_card" / "template.md").read_text()
    assert "generated by llama-server from the GGUF `{{ f.phase1_gguf }}`" in template

    # A rerun with the same GGUF reuses every sequence; another generator regenerates them.
    again = run_profile(recipe, layout, progress=False)
    assert again["phase1"]["reused"] == num_prompts and again["phase1"]["generated"] == 0
    rerun = run_profile(_recipe(tmp_path, None, "transformers"), layout, progress=False)
    assert rerun["phase1"]["generated"] == num_prompts
    assert rerun["phase1"]["generator"]["name"] == "transformers"
    assert json.loads(layout.sequences_path.read_text().splitlines()[0])["generator"]["name"] == "transformers"


def test_missing_gguf_is_named(tmp_path):
    from moeprune.errors import MoepruneError, RecipeError
    from moeprune.layout import RunLayout
    from moeprune.profile.stage import run_profile

    with pytest.raises(RecipeError, match=r"profile.generate_gguf.*nope\.gguf.*file not found"):
        _recipe(tmp_path, tmp_path / "nope.gguf", "llama-server")
    recipe = _recipe(tmp_path, tmp_path / "nope.gguf", "llama-server", check_inputs=False)
    with pytest.raises(MoepruneError, match=r"profile.generate_gguf = .*nope\.gguf"):
        run_profile(recipe, RunLayout.for_recipe(recipe.name, runs_dir=tmp_path / "runs"), progress=False)


def test_the_profile_stage_depends_on_the_generation_gguf(tmp_path):
    """A changed GGUF reruns the profile stage: its bytes are one of the stage's inputs."""
    from moeprune.layout import RunLayout
    from moeprune.pipeline.graph import Context
    from moeprune.pipeline.stages import _profile_deps

    gguf = tmp_path / "base.gguf"
    gguf.write_bytes(b"GGUF")
    with_gguf = Context(recipe=_recipe(tmp_path, gguf, "llama-server"), layout=RunLayout(tmp_path / "run"))
    assert gguf in _profile_deps(with_gguf)
    without = Context(recipe=_recipe(tmp_path, None, "transformers"), layout=RunLayout(tmp_path / "run"))
    assert not any(str(p).endswith(".gguf") for p in _profile_deps(without))
