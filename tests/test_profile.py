"""Two-phase expert-contribution profiling: exactness, batch invariance, errors, files, findings math."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sequences import DOMAINS, random_sequences
from tiny_gemma4 import tiny_gemma4_model

from moeprune.profile import findings
from moeprune.profile.generate import CalibrationError, SequenceError, load_calibration, read_sequences
from moeprune.profile.hooks import NoMoeLayersError, find_moe_layers, instrument_moe
from moeprune.profile.replay import replay_sequences
from moeprune.profile.stats import StatsFileError, build_stats, load_stats, save_stats
from moeprune.demo import MODEL_DIR as DEMO_MODEL_DIR

VOCAB_SIZE = 288


def tiny_model(enable_moe: bool = True, seed: int = 0, max_positions: int = 256):
    model = tiny_gemma4_model(seed, vocab_size=VOCAB_SIZE, enable_moe_block=enable_moe,
                              max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    # Random routers of an untrained model are nearly uniform; spread them so routing is decisive
    # and per-expert scales differ from 1 (both are part of the weight the model applies).
    with torch.no_grad():
        for layer in find_moe_layers(model) if enable_moe else []:
            layer.router.proj.weight.normal_(0.0, 1.0)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
    return model




@pytest.fixture(scope="module")
def model():
    """The committed demo model (a checkout without it is broken: this fails, it does not skip)."""
    import transformers

    return transformers.Gemma4ForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def top_k_of(model) -> int:
    return int(model.config.get_text_config().top_k_experts)


# --- exactness ------------------------------------------------------------------------------------


def _plain_run(model, input_ids, attention_mask):
    """Capture, per MoE layer, the experts' inputs and output and the router's outputs (no profiling)."""
    layers = find_moe_layers(model)
    seen: dict[int, dict] = {layer.layer_index: {} for layer in layers}
    handles = []
    for layer in layers:
        index = layer.layer_index

        def experts_hook(_m, args, output, index=index):
            seen[index]["experts_in"] = args[0].detach().clone()
            seen[index]["experts_out"] = output.detach().clone()

        def router_hook(_m, args, output, index=index):
            seen[index]["router_in"] = args[0].detach().clone()
            seen[index]["probs"], seen[index]["weights"], seen[index]["index"] = (t.detach().clone() for t in output)

        handles.append(layer.experts.register_forward_hook(experts_hook))
        handles.append(layer.router.register_forward_hook(router_hook))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, seen


def _padded_batch(model):
    generator = torch.Generator().manual_seed(7)
    vocab_size = model.config.get_text_config().vocab_size
    input_ids = torch.randint(3, min(vocab_size, 200), (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding on the second row
    input_ids[1, 8:] = 0
    return input_ids, attention_mask


@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_captured_outputs_sum_to_the_moe_block_output(model, implementation):
    """Per token, the captured weighted expert outputs add up to the experts output before post_feedforward_layernorm_2."""
    model.set_experts_implementation(implementation)
    input_ids, attention_mask = _padded_batch(model)
    plain_logits, plain = _plain_run(model, input_ids, attention_mask)
    with instrument_moe(model, num_domains=1, capture=True) as recorder, torch.no_grad():
        recorder.set_token_domains(attention_mask.reshape(-1) - 1)  # 0 for real tokens, -1 for padding
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-5)
    for layer_index, seen in plain.items():
        (capture,) = recorder.captures[layer_index]
        summed = torch.zeros_like(seen["experts_out"], dtype=torch.float64)
        summed.index_add_(0, capture.token_index, capture.weighted_output.to(torch.float64))
        torch.testing.assert_close(summed, seen["experts_out"].to(torch.float64), rtol=1e-5, atol=1e-6)
        # Exactly top-k routed pairs per token, each computed once.
        assert capture.token_index.numel() == seen["experts_out"].shape[0] * top_k_of(model)
    model.set_experts_implementation("grouped_mm")


def test_captured_norms_match_an_independent_float64_recomputation(model):
    input_ids, attention_mask = _padded_batch(model)
    _, plain = _plain_run(model, input_ids, attention_mask)
    with instrument_moe(model, num_domains=1, capture=True) as recorder, torch.no_grad():
        recorder.set_token_domains(attention_mask.reshape(-1) - 1)
        model(input_ids=input_ids, attention_mask=attention_mask)
    for layer in find_moe_layers(model):
        seen = plain[layer.layer_index]
        assert seen, layer.layer_index
        router = layer.router
        # Router, from its definition: RMS-normalised input, softmax over all experts, top-k,
        # renormalised, times per_expert_scale.
        x = seen["router_in"].to(torch.float64)
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + router.eps)
        scores = (normed * router.scale.double() * router.hidden_size**-0.5) @ router.proj.weight.double().T
        probs = torch.softmax(scores, dim=-1)
        top_k = top_k_of(model)
        top_probs, top_index = torch.topk(probs, k=top_k, dim=-1)
        weights = top_probs / top_probs.sum(-1, keepdim=True) * router.per_expert_scale.double()[top_index]
        assert torch.equal(top_index, seen["index"])
        torch.testing.assert_close(weights, seen["weights"].double(), rtol=1e-5, atol=1e-6)

        experts = layer.experts
        hidden = seen["experts_in"].to(torch.float64)
        expected = {}
        for token in range(hidden.shape[0]):
            for slot in range(top_k):
                e = int(top_index[token, slot])
                gate, up = (experts.gate_up_proj[e].double() @ hidden[token]).chunk(2)
                out = experts.down_proj[e].double() @ (experts.act_fn(gate) * up)
                expected[(token, e)] = float(torch.linalg.vector_norm(weights[token, slot] * out).detach())
        (capture,) = recorder.captures[layer.layer_index]
        got = {(int(t), int(e)): float(n) for t, e, n in zip(capture.token_index, capture.expert_index, capture.norm)}
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-5), key


def _independent_sequence_norm_sum(model, sequences, domains) -> np.ndarray:
    """The seed's statistic recomputed without the profiler: each sequence alone through the plain
    model, every routed expert's output from its weights in float64, one norm per (sequence, expert)."""
    layers = find_moe_layers(model)
    num_experts = layers[0].num_experts
    expected = np.zeros((len(domains), len(layers), num_experts))
    for record in sequences:
        input_ids = torch.tensor([record["input_ids"]])
        _, plain = _plain_run(model, input_ids, torch.ones_like(input_ids))
        for row, layer in enumerate(layers):
            seen, experts = plain[layer.layer_index], layer.experts
            hidden = seen["experts_in"].to(torch.float64)
            squares = np.zeros(num_experts)
            for token in range(hidden.shape[0]):
                for slot in range(seen["index"].shape[1]):
                    e = int(seen["index"][token, slot])
                    gate, up = (experts.gate_up_proj[e].double() @ hidden[token]).chunk(2)
                    out = experts.down_proj[e].double() @ (experts.act_fn(gate) * up)
                    squares[e] += float((seen["weights"][token, slot].double() * out).pow(2).sum().detach())
            expected[domains.index(record["domain"]), row] += np.sqrt(squares)
    return expected


@pytest.fixture(scope="module")
def demo_float64():
    """The demo model in float64 (eager experts: grouped_mm has no float64 kernel)."""
    import transformers

    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float64).eval()
    model.set_experts_implementation("eager")
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_sequence_norm_sum_equals_an_independent_per_sequence_recomputation(model, demo_float64, dtype, batch_size):
    """sum over sequences of sqrt(sum_t ||w_te E_e(x_t)||^2), to 1e-6 relative, whatever the batch.

    Profiled as the demo recipe loads the model (float32, grouped_mm) and in float64; the reference
    is always the float64 model, one sequence at a time, experts recomputed from their weights.
    """
    sequences = random_sequences([17, 33, 8, 25, 12, 40, 6, 21], VOCAB_SIZE)
    profiled = model if dtype == "float32" else demo_float64
    result = replay_sequences(profiled, sequences, DOMAINS, batch_size=batch_size)
    expected = _independent_sequence_norm_sum(demo_float64, sequences, DOMAINS)
    assert result.sequence_norm_sum.dtype == np.float64
    assert np.count_nonzero(expected) > 0
    np.testing.assert_allclose(result.sequence_norm_sum, expected, rtol=1e-6, atol=0)
    # It is not the per-token sum: with more than one token per sequence the two differ...
    assert not np.allclose(result.sequence_norm_sum, result.contribution_sum, rtol=1e-3)
    # ...and per expert never exceeds it (a norm of a sum of squares is at most the sum of norms).
    assert np.all(result.sequence_norm_sum <= result.contribution_sum * (1 + 1e-6))


def test_sequence_norm_sum_does_not_depend_on_batch_composition():
    """Same sequences, different batch sizes and orders of padding: the same per-sequence sums."""
    model = tiny_model().to(torch.float64)
    sequences = random_sequences([4, 11, 7, 9, 2], VOCAB_SIZE)
    one = replay_sequences(model, sequences, DOMAINS, batch_size=1)
    for batch_size in (2, 3, 5):
        batched = replay_sequences(model, sequences, DOMAINS, batch_size=batch_size)
        np.testing.assert_allclose(batched.sequence_norm_sum, one.sequence_norm_sum, rtol=1e-9, atol=0)
    # One sequence per domain index: each domain holds only its own sequences' norms.
    per_domain_total = one.sequence_norm_sum.sum(axis=(1, 2))
    assert np.all(per_domain_total > 0)


def test_original_forward_is_restored(model):
    experts = find_moe_layers(model)[0].experts
    router = find_moe_layers(model)[0].router
    with instrument_moe(model, num_domains=1) as recorder:
        assert "forward" in experts.__dict__
        del recorder
    assert "forward" not in experts.__dict__
    assert not router._forward_hooks
    # Restored also when the profiled forward fails.
    with pytest.raises(RuntimeError, match="set_token_domains"), instrument_moe(model, num_domains=1):
        with torch.no_grad():
            model(input_ids=torch.tensor([[5, 6, 7]]))
    assert "forward" not in experts.__dict__


def test_padding_never_counts(model):
    sequences = random_sequences([5, 9, 3], VOCAB_SIZE)
    result = replay_sequences(model, sequences, DOMAINS, batch_size=3)
    num_tokens = sum(len(s["input_ids"]) for s in sequences)
    assert sum(result.domain_num_tokens.values()) == num_tokens
    # Every real token is routed to exactly top-k experts and its router probabilities sum to 1.
    num_layers = len(result.layers)
    assert result.routed_count.sum(axis=(0, 2)).tolist() == [num_tokens * top_k_of(model)] * num_layers
    np.testing.assert_allclose(result.router_prob_sum.sum(axis=(0, 2)), num_tokens, rtol=1e-6)
    assert result.contribution_sum.dtype == np.float64


def test_batched_with_padding_equals_one_at_a_time():
    """In float64 the statistics do not depend on batching at all: padding never leaks in."""
    model = tiny_model().to(torch.float64)
    sequences = random_sequences([4, 11, 7, 9, 2], VOCAB_SIZE)
    one = replay_sequences(model, sequences, DOMAINS, batch_size=1)
    batched = replay_sequences(model, sequences, DOMAINS, batch_size=3)
    np.testing.assert_array_equal(one.routed_count, batched.routed_count)
    np.testing.assert_allclose(batched.contribution_sum, one.contribution_sum, rtol=1e-6, atol=0)
    np.testing.assert_allclose(batched.router_prob_sum, one.router_prob_sum, rtol=1e-6, atol=0)
    assert one.domain_num_tokens == batched.domain_num_tokens


def test_batched_float32_statistics_agree_to_float32_rounding(model):
    """In float32 only kernel rounding differs between batch shapes: layer totals agree within 1e-6."""
    sequences = random_sequences([4, 11, 7, 9, 2], VOCAB_SIZE)
    one = replay_sequences(model, sequences, DOMAINS, batch_size=1)
    batched = replay_sequences(model, sequences, DOMAINS, batch_size=3)
    np.testing.assert_array_equal(one.routed_count, batched.routed_count)
    np.testing.assert_allclose(batched.contribution_sum.sum(axis=2), one.contribution_sum.sum(axis=2), rtol=1e-6)
    np.testing.assert_allclose(batched.contribution_sum, one.contribution_sum, rtol=1e-5)


def test_accelerate_dispatched_model_gives_the_same_statistics():
    """Under accelerate hooks (device_map dispatch / offload) the instrumented forward is still the one called."""
    from accelerate import dispatch_model

    sequences = random_sequences([5, 8], VOCAB_SIZE)
    reference = replay_sequences(tiny_model(), sequences, DOMAINS, batch_size=2)
    # The hooks from_pretrained(device_map=...) installs: every module's forward is wrapped.
    offloaded = dispatch_model(tiny_model(), device_map={"": "cpu"}, force_hooks=True)
    experts = find_moe_layers(offloaded)[0].experts
    assert hasattr(experts, "_hf_hook")
    result = replay_sequences(offloaded, sequences, DOMAINS, batch_size=2)
    np.testing.assert_array_equal(result.routed_count, reference.routed_count)
    np.testing.assert_allclose(result.contribution_sum, reference.contribution_sum, rtol=1e-6)
    assert "_old_forward" in experts.__dict__  # accelerate's own attribute, restored after profiling
    assert experts._old_forward.__func__ is type(experts).forward


def test_bfloat16_model_accumulates_in_float64():
    model = tiny_model().to(torch.bfloat16)
    result = replay_sequences(model, random_sequences([6, 4], VOCAB_SIZE), DOMAINS, batch_size=2)
    assert result.contribution_sum.dtype == np.float64
    assert np.all(np.isfinite(result.contribution_sum)) and result.contribution_sum.sum() > 0


def test_model_without_moe_layers_is_refused():
    dense = tiny_model(enable_moe=False)
    with pytest.raises(NoMoeLayersError, match="no MoE layers"):
        replay_sequences(dense, random_sequences([3], VOCAB_SIZE), DOMAINS)


def test_sequence_longer_than_context_is_refused():
    short_context = tiny_model(max_positions=8)
    sequences = random_sequences([4, 12], VOCAB_SIZE)
    with pytest.raises(SequenceError, match=r"sequence 's1' has 12 tokens.*context of 8"):
        replay_sequences(short_context, sequences, DOMAINS)


# --- calibration file ----------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_line(i: int, domain: str = "math", prompt: str = "What is 2+2?") -> str:
    return json.dumps({"id": f"p{i}", "domain": domain, "prompt": prompt})


def test_calibration_file_is_read(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good_line(1), "", good_line(2, "creative", "A poem.")])
    prompts = load_calibration(path, DOMAINS, prompts_per_domain=1)
    assert [(p.id, p.domain, p.line) for p in prompts] == [("p1", "math", 1), ("p2", "creative", 3)]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ('{"id": "p3", "domain": "math", "prompt": ', r":3: not valid JSON"),
        ('{"id": "p3", "domain": "math"}', r":3: missing field 'prompt'"),
        ('{"id": "p3", "domain": "math", "prompt": 5}', r":3: field 'prompt' must be a string"),
        ('{"id": "p3", "domain": "math", "prompt": "  "}', r":3: prompt 'p3' is empty"),
        ('{"id": "p1", "domain": "math", "prompt": "x"}', r":3: duplicate id 'p1' \(first on line 1\)"),
        ('{"id": "p3", "domain": "poetry", "prompt": "x"}', r":3: domain 'poetry' is not one of"),
        ('["p3", "math", "x"]', r":3: expected an object"),
    ],
)
def test_malformed_calibration_line_is_named(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "c.jsonl", [good_line(1), good_line(2, "creative"), bad_line])
    with pytest.raises(CalibrationError, match=message):
        load_calibration(path, DOMAINS)


def test_calibration_domain_counts_are_checked(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [good_line(1), good_line(2)])
    with pytest.raises(CalibrationError, match=r"prompts_per_domain = 2.*0 'creative'"):
        load_calibration(path, DOMAINS, prompts_per_domain=2)


# --- statistics file -----------------------------------------------------------------------------


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(2, 3, 4))
    stats = build_stats(
        layers=[0, 2, 5], domains=DOMAINS, contribution_sum=rng.random((2, 3, 4)) * counts,
        routed_count=counts, router_prob_sum=rng.random((2, 3, 4)), sequence_norm_sum=rng.random((2, 3, 4)),
        domain_num_tokens={"math": 7, "creative": 5}, model_sha256="ab" * 32,
    )
    path = tmp_path / "stats.safetensors"
    save_stats(stats, path)
    first_bytes = path.read_bytes()
    save_stats(stats, path)
    assert path.read_bytes() == first_bytes  # deterministic file: its hash identifies the statistics
    loaded = load_stats(path)
    assert (loaded.layers, loaded.domains, loaded.model_sha256, loaded.num_tokens) == ([0, 2, 5], DOMAINS, "ab" * 32, 12)
    assert loaded.domain_num_tokens == {"math": 7, "creative": 5}
    for name, array in stats.totals.items():
        np.testing.assert_array_equal(loaded.totals[name], array)
        assert loaded.totals[name].dtype == (np.int64 if name == "routed_count" else np.float64)
    for domain in DOMAINS:
        for name, array in stats.per_domain[domain].items():
            np.testing.assert_array_equal(loaded.per_domain[domain][name], array)
    for name in ("contribution_sum", "sequence_norm_sum"):
        np.testing.assert_array_equal(loaded.totals[name], stats.per_domain["math"][name]
                                      + stats.per_domain["creative"][name])
    reap = loaded.totals["reap_mean"]
    total_counts = loaded.totals["routed_count"]
    assert np.all(reap[total_counts == 0] == 0)
    np.testing.assert_allclose(reap[total_counts > 0], (loaded.totals["contribution_sum"] / total_counts)[total_counts > 0])


def test_missing_or_corrupt_statistics_file(tmp_path):
    with pytest.raises(StatsFileError, match="not found"):
        load_stats(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(StatsFileError, match="not a readable safetensors"):
        load_stats(corrupt)


# --- findings math -------------------------------------------------------------------------------


def test_gini_of_hand_computed_rows():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 4.0], [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    # Row 3: sum_i (2i-5) x_(i) = -3*1 -1*2 +1*3 +3*4 = 10; G = 10 / (4*10) = 0.25.
    np.testing.assert_allclose(findings.gini(scores), [0.0, 0.75, 0.25, 0.0])


def test_top_k_share_bottom_share_and_coverage():
    scores = np.array([[4.0, 1.0, 3.0, 2.0], [10.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(findings.top_k_share(scores, 2), [0.7, 1.0])
    np.testing.assert_allclose(findings.bottom_n_share(scores, 2), [0.3, 0.0])
    # Row 0 sorted 4,3,2,1 -> cumulative .4 .7 .9 1.0: 70% needs 2, 71% needs 3, 100% needs 4.
    assert findings.experts_to_reach(scores, 0.7).tolist() == [2, 1]
    assert findings.experts_to_reach(scores, 0.71).tolist() == [3, 1]
    assert findings.experts_to_reach(scores, 1.0).tolist() == [4, 1]
    assert findings.pooled_top_k_share(scores, 1) == pytest.approx(14 / 20)


def test_top_k_overlap_between_domains():
    math = np.array([[5.0, 4.0, 3.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    creative = np.array([[0.0, 4.0, 3.0, 5.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    assert findings.top_k_overlap(math, creative, 3).tolist() == [2, 1]
    (pair,) = findings.domain_overlaps({"math": math, "creative": creative, "empty": np.zeros((2, 5))}, 3)
    assert pair == {"domains": ["creative", "math"], "k": 3, "mean": 1.5, "min": 1, "per_layer": [2, 1]}


def test_ties_pick_the_lower_expert_index():
    assert findings.top_k_indices(np.array([[1.0, 2.0, 2.0, 2.0]]), 2).tolist() == [[1, 2]]


def test_most_and_least_concentrated_layers():
    scores = np.array([[1.0, 1.0, 1.0, 1.0], [9.0, 1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0]])
    result = findings.compute_findings(
        scores, [3, 7, 11], {"math": scores}, overlap_k=2, share_k=1, coverage_fraction=0.5, num_extremes=2
    )
    assert [entry["layer"] for entry in result["most_concentrated_layers"]] == [7, 11]
    assert [entry["layer"] for entry in result["least_concentrated_layers"]] == [3, 11]
    assert result["most_concentrated_layers"][0]["top1_share"] == pytest.approx(0.9)
    assert result["experts_to_coverage_min"] == 1 and result["experts_to_coverage_max"] == 2
    assert result["domain_overlap"] == []


def test_findings_reject_negative_scores():
    with pytest.raises(ValueError, match="non-negative"):
        findings.gini(np.array([[1.0, -1.0]]))


# --- phase 1 and the whole stage -----------------------------------------------------------------

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% if enable_thinking %}<think>{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """A model directory with weights, config, tokenizer and chat template: the committed demo model."""
    return DEMO_MODEL_DIR


PROMPTS = [
    ("math-01", "math", "What is 12 * 7?"),
    ("math-02", "math", "Is 91 prime?"),
    ("creative-01", "creative", "Write a haiku about rain."),
    ("creative-02", "creative", "Name a color."),
]
def make_recipe(tmp_path: Path, model_dir: Path, prompts: list[tuple[str, str, str]] = PROMPTS):
    from moeprune.recipe import parse_recipe

    prompts_path = tmp_path / "prompts.jsonl"
    write_lines(prompts_path, [json.dumps({"id": i, "domain": d, "prompt": p}) for i, d, p in prompts])
    data = {
        "name": "profile-test",
        "model": {"base": str(model_dir), "dtype": "float32", "name": "test"},
        "calibration": {"prompts": str(prompts_path), "domains": DOMAINS, "prompts_per_domain": 2,
                        "max_new_tokens": 4, "enable_thinking": True, "batch_size": 3},
        "profile": {"device_map": "cpu", "top_overlap_k": 4, "top_share_k": 2, "coverage_fraction": 0.8},
        "dropmap": {"strategy": "uniform-min-retention", "retention_threshold": 0.95},
        "prune": {"max_shard_bytes": 4_000_000},
        "serve": {"ctx_size": 2048},
        "eval": {"tasks": ["demo_mcq"], "max_gen_toks": 16},
    }
    return parse_recipe(data, source_path=tmp_path / "recipe.toml")


def test_run_profile_writes_sequences_statistics_and_a_valid_summary(tmp_path, model_dir):
    from moeprune.layout import RunLayout
    from moeprune.profile import run_profile
    from moeprune.schemas import validate_file

    recipe = make_recipe(tmp_path, model_dir)
    layout = RunLayout(tmp_path / "runs" / recipe.name)
    summary = run_profile(recipe, layout, progress=False)

    assert validate_file("profile", layout.profile_summary_path) == json.loads(json.dumps(summary))
    sequences = read_sequences(layout.sequences_path)
    assert [(r["id"], r["domain"]) for r in sequences] == [(i, d) for i, d, _ in PROMPTS]
    for record in sequences:
        assert 0 < len(record["input_ids"]) - record["prompt_len"] <= 4
        assert record["prompt"] in record["text"]
    assert summary["phase1"] == {**summary["phase1"], "generated": 4, "reused": 0, "thinking_supported": True}

    stats = load_stats(layout.profile_stats_path)
    assert stats.num_tokens == sum(len(r["input_ids"]) for r in sequences) == summary["num_tokens"]
    assert stats.model_sha256 == summary["hashes"]["model_sha256"]
    assert stats.layers == summary["moe"]["layers"] == [entry["layer"] for entry in summary["layers"]]
    top_k = summary["moe"]["top_k"]
    np.testing.assert_array_equal(stats.totals["routed_count"].sum(axis=1), stats.num_tokens * top_k)
    for domain in DOMAINS:
        domain_tokens = sum(len(r["input_ids"]) for r in sequences if r["domain"] == domain)
        assert summary["domains"][domain] == {"num_sequences": 2, "num_tokens": domain_tokens}
        np.testing.assert_array_equal(stats.per_domain[domain]["routed_count"].sum(axis=1), domain_tokens * top_k)
    # Summary figures are computed from the saved statistics.
    first = summary["layers"][0]
    row = stats.totals["contribution_sum"][0]
    assert first["contribution_total"] == pytest.approx(row.sum())
    assert first["top1_share"] == pytest.approx(row.max() / row.sum())
    assert summary["findings"]["domain_overlap"][0]["domains"] == ["creative", "math"]


def test_rerun_reuses_unchanged_sequences(tmp_path, model_dir):
    from moeprune.layout import RunLayout
    from moeprune.profile import run_profile

    layout = RunLayout(tmp_path / "runs" / "profile-test")
    first = run_profile(make_recipe(tmp_path, model_dir), layout, progress=False)
    again = run_profile(make_recipe(tmp_path, model_dir), layout, progress=False)
    assert (again["phase1"]["generated"], again["phase1"]["reused"]) == (0, 4)
    assert again["hashes"]["sequences_sha256"] == first["hashes"]["sequences_sha256"]
    assert again["hashes"]["stats_sha256"] == first["hashes"]["stats_sha256"]

    changed = [*PROMPTS[:3], ("creative-02", "creative", "Name a fruit.")]
    third = run_profile(make_recipe(tmp_path, model_dir, changed), layout, progress=False)
    assert (third["phase1"]["generated"], third["phase1"]["reused"]) == (1, 3)
    assert third["hashes"]["prompts_sha256"] != first["hashes"]["prompts_sha256"]


def test_prompt_too_long_for_the_context_is_refused(tmp_path, model_dir):
    from moeprune.profile.generate import generate_sequences
    from moeprune.profile.loading import load_model, load_tokenizer

    path = write_lines(tmp_path / "c.jsonl", [good_line(1), good_line(2, prompt="word " * 40)])
    prompts = load_calibration(path)
    with pytest.raises(SequenceError, match=r"c.jsonl:2: prompt 'p2' has \d+ tokens.*context of 48 tokens"):
        generate_sequences(
            load_model(model_dir, "float32", "cpu"), load_tokenizer(model_dir), prompts,
            max_new_tokens=8, enable_thinking=True, batch_size=1, keys={"p1": "", "p2": ""},
            context_tokens=48, prompts_path=path,
        )


def test_thinking_switch_is_detected_in_the_chat_template():
    from types import SimpleNamespace

    from moeprune.profile.generate import template_supports_thinking

    assert template_supports_thinking(SimpleNamespace(chat_template=CHAT_TEMPLATE))
    assert not template_supports_thinking(SimpleNamespace(chat_template="{{ messages[0]['content'] }}"))
    assert not template_supports_thinking(SimpleNamespace(chat_template=None))


def test_stage_reports_a_malformed_calibration_line(tmp_path, model_dir):
    from moeprune.layout import RunLayout
    from moeprune.profile import run_profile

    recipe = make_recipe(tmp_path, model_dir)
    with open(recipe.prompts_path, "a", encoding="utf-8") as handle:
        handle.write('{"id": "x", "domain": "math", "prompt": ""}\n')
    with pytest.raises(CalibrationError, match=r"prompts.jsonl:5: prompt 'x' is empty"):
        run_profile(recipe, RunLayout(tmp_path / "runs" / "x"), progress=False)
