"""The profile memory plan: pure estimates, and `invoke check` refusing a plan that cannot fit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from moeprune.profile.memory_plan import GIB, ModelFacts, model_facts, plan_memory
from fakerun import demo_recipe_text
from invoke_cli import invoke

ROOT = Path(__file__).resolve().parents[1]


def gemma4_26b_facts() -> ModelFacts:
    """Gemma-4-26B-A4B as the seed's card describes it (30 layers, hidden 2816, 128 experts of
    704, top-8, dense MLP 2112, vocabulary 262144), in bf16."""
    hidden, experts, moe, dense, layers = 2816, 128, 704, 2112, 30
    attention = hidden * (16 * 256) * 2 + hidden * (8 * 256) * 2
    layer = 2 * (experts * 3 * hidden * moe + 3 * hidden * dense + attention + experts * hidden)
    return ModelFacts(
        num_layers=layers, hidden_size=hidden, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
        intermediate_size=dense, moe_intermediate_size=moe, top_k=8, vocab_size=262144,
        layer_bytes=(layer,) * layers, shell_bytes=2 * 262144 * hidden, unused_bytes=2 * 550_000_000,
    )


def plan(replay: str, generate: str = "transformers", budget_gib: float = 24, **kwargs):
    return plan_memory(
        gemma4_26b_facts(), prompt_lengths=[120] * 40, max_new_tokens=512, batch_size=1, dtype="bfloat16",
        replay=replay, generate=generate, device="cuda:0", budget_bytes=int(budget_gib * GIB), **kwargs,
    )


def test_the_26b_model_does_not_fit_a_24gb_card_whole_but_fits_streamed():
    whole = plan("whole")
    assert not whole.ok
    assert whole.phases[-1].peak_bytes > 48 * GIB
    message = whole.failure()
    assert 'profile.replay = "streamed"' in message and 'profile.generate = "llama-server"' in message
    streamed_gen_gguf = plan("streamed", "llama-server", gguf_bytes=int(16 * GIB), n_gpu_layers=10,
                             host_budget_bytes=64 * GIB)
    assert streamed_gen_gguf.ok, streamed_gen_gguf.lines()
    replay = streamed_gen_gguf.phases[-1]
    assert replay.name == "phase 2 (streamed replay)"
    assert 1.5 * GIB < replay.peak_bytes < 3 * GIB
    # Offloading every layer of a 16 GiB GGUF plus its KV cache still fits 24 GB; a 30 GiB one does not.
    assert plan("streamed", "llama-server", gguf_bytes=int(16 * GIB), n_gpu_layers=99, host_budget_bytes=64 * GIB).ok
    too_big = plan("streamed", "llama-server", gguf_bytes=int(30 * GIB), n_gpu_layers=99, host_budget_bytes=64 * GIB)
    assert not too_big.ok and "generate_n_gpu_layers" in too_big.failure()


def test_facts_of_the_demo_come_from_its_headers():
    demo = ROOT / "src" / "moeprune" / "demo" / "model"
    facts = model_facts(demo, "float32")
    from moeprune.io.checkpoint import Checkpoint

    total = sum(4 * max(1, __import__("math").prod(t.shape)) for t in Checkpoint.open(demo).tensors())
    assert facts.num_layers == 4 and len(set(facts.layer_bytes)) >= 1
    assert sum(facts.layer_bytes) + facts.shell_bytes + facts.unused_bytes == total
    assert facts.shell_bytes >= 1536 * 256 * 4  # the embedding


def _invoke_check(tmp_path: Path, extra: str) -> subprocess.CompletedProcess:
    text = demo_recipe_text()
    text = text.replace('name = "demo"', 'name = "demo-memory-plan"').replace("[profile]\n", "[profile]\n" + extra)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    return invoke("check", "--recipe", str(recipe), in_process=True)  # the plan is tested, not the process start


def test_invoke_check_prints_the_plan_and_refuses_what_cannot_fit(tmp_path):
    ok = _invoke_check(tmp_path, "")
    assert ok.returncode == 0, ok.stderr
    assert "memory plan: phase 2 (whole-model replay) on cpu" in ok.stdout and "fits" in ok.stdout
    refused = _invoke_check(tmp_path, "memory_limit_bytes = 50_000_000\n")
    assert refused.returncode != 0
    output = refused.stdout + refused.stderr
    assert "DOES NOT FIT" in output and 'profile.replay = "streamed"' in output
