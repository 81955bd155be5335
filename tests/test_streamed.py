"""Layer-streamed replay: the same statistics as the whole-model replay, one layer in memory at a time.

On one device both modes run the same transformers ops on the same inputs in the same order, so
the statistics are compared bit for bit (``np.array_equal``). One thing can still change the
arithmetic: ``from_pretrained`` leaves weights memory-mapped at their offsets in the shard, and
CPU matmul kernels take a different (equally exact, differently rounded) path for a weight that is
not 64-byte aligned, while streamed layers live in fresh, aligned allocations. So each model is
compared bit for bit against the whole-model replay with its weights in aligned memory (the same
arithmetic), and against the plain memory-mapped one within rounding (see :func:`assert_close`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sequences import DOMAINS, random_sequences

from moeprune.demo import MODEL_DIR as DEMO_MODEL_DIR
from moeprune.io.checkpoint import CheckpointError
from moeprune.io.materialize import materialize, meta_model
from moeprune.profile.replay import ReplayResult, replay_sequences
from moeprune.profile.streamed import StreamedReplayError, StreamInfo, family_adapter, replay_streamed


def statistic_fields() -> list[str]:
    """Every array statistic a replay returns (including ones added later, e.g. sequence_norm_sum)."""
    return [f.name for f in dataclasses.fields(ReplayResult) if f.type in ("np.ndarray", np.ndarray)]


def assert_bit_identical(whole: ReplayResult, streamed: ReplayResult) -> None:
    assert streamed.layers == whole.layers
    assert streamed.domains == whole.domains
    assert streamed.domain_num_tokens == whole.domain_num_tokens
    assert streamed.num_sequences == whole.num_sequences
    fields = statistic_fields()
    assert {"contribution_sum", "routed_count", "router_prob_sum"} <= set(fields)
    for name in fields:
        a, b = getattr(whole, name), getattr(streamed, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b), f"{name}: max abs difference {np.abs(a - b).max()}"
    assert whole.contribution_sum.sum() > 0


def assert_close(whole: ReplayResult, streamed: ReplayResult, tolerance: float = 1e-5) -> None:
    """Counts equal; every float statistic within ``tolerance`` of its layer's largest value.

    Measured: 1.6e-6 (real layout) and 3.5e-6 (per-layer inputs) on these random models, whose
    decisive random routers amplify rounding through the layers; that is how far the whole-model
    replay itself moves when only the alignment of its weights changes."""
    for name in statistic_fields():
        a, b = getattr(whole, name), getattr(streamed, name)
        if a.dtype.kind in "iu":
            assert np.array_equal(a, b), name
        else:
            scale = np.abs(a).max(axis=(0, 2), keepdims=True)
            assert np.all(np.abs(a - b) <= tolerance * scale), f"{name}: {np.max(np.abs(a - b) / scale)} relative"


def whole_replay(model_dir: Path, dtype: str, sequences, batch_size: int, aligned: bool = False) -> ReplayResult:
    """The whole-model replay; ``aligned`` copies every weight out of the memory-mapped shards."""
    from moeprune.profile.loading import load_model

    model = load_model(model_dir, dtype, "cpu")
    if aligned:
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
    return replay_sequences(model, sequences, DOMAINS, batch_size=batch_size)


def assert_equivalent(model_dir: Path, dtype: str, sequences, batch_size: int, **kwargs) -> ReplayResult:
    streamed = replay_streamed(model_dir, sequences, DOMAINS, dtype=dtype, batch_size=batch_size, **kwargs)
    assert_bit_identical(whole_replay(model_dir, dtype, sequences, batch_size, aligned=True), streamed)
    assert_close(whole_replay(model_dir, dtype, sequences, batch_size), streamed)
    return streamed


# Lengths: padding inside batches, one sequence longer than the demo's 128-token sliding window.
LENGTHS = [5, 17, 40, 33, 200, 9, 150, 64]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_equals_whole_on_the_demo(dtype):
    vocab = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["text_config"]["vocab_size"]
    sequences = random_sequences(LENGTHS, vocab)
    info = StreamInfo()
    streamed = assert_equivalent(DEMO_MODEL_DIR, dtype, sequences, 3, stream_info=info)
    # The demo's shards happen to keep every weight aligned: the plain replay matches bit for bit too.
    assert_bit_identical(whole_replay(DEMO_MODEL_DIR, dtype, sequences, 3), streamed)
    # One layer, not the model, was materialised at a time.
    layer_bytes = info.max_layer_nbytes
    assert 0 < layer_bytes < sum(p.stat().st_size for p in DEMO_MODEL_DIR.glob("*.safetensors")) / 2


def real_layout_config(per_layer_inputs: bool = False):
    """Gemma 4 26B-A4B's layout (multimodal with a vision tower, 128 experts, top-8, sliding and full
    attention layers with their own head sizes, attention_k_eq_v) at tiny sizes."""
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=48, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=16,
        hidden_size_per_layer_input=8 if per_layer_inputs else 0, vocab_size_per_layer_input=512,
        sliding_window=16, max_position_embeddings=512,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        final_logit_softcapping=30.0, bos_token_id=2, eos_token_id=1, pad_token_id=0,
    )
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
    )
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None)


def save_random_model(config, directory: Path, seed: int = 0) -> Path:
    import transformers

    from moeprune.profile.hooks import find_moe_layers

    torch.manual_seed(seed)
    model = transformers.Gemma4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in find_moe_layers(model):
            # Decisive, non-uniform routing and per-expert scales (both part of the applied weight).
            layer.router.proj.weight.normal_(0.0, 1.0)
            layer.router.per_expert_scale.uniform_(0.5, 1.5)
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.uniform_(0.5, 1.5)
    model.save_pretrained(directory, max_shard_size="2MB")
    assert len(list(directory.glob("*.safetensors"))) > 1
    return directory


@pytest.fixture(scope="module")
def real_layout_dir(tmp_path_factory) -> Path:
    return save_random_model(real_layout_config(), tmp_path_factory.mktemp("gemma4_real_layout"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_equals_whole_on_a_real_layout_gemma4(real_layout_dir, dtype):
    config = json.loads((real_layout_dir / "config.json").read_text())
    assert config["vision_config"] is not None and config["text_config"]["num_experts"] == 128
    sequences = random_sequences([3, 30, 12, 25, 7], 512)
    streamed = assert_equivalent(real_layout_dir, dtype, sequences, 2)
    assert int(streamed.routed_count.sum()) == 8 * sum(len(s["input_ids"]) for s in sequences) * 6


def test_streamed_equals_whole_with_per_layer_inputs(tmp_path):
    """Gemma 4's per-layer input embeddings (the E2B/E4B models) reach each streamed layer too."""
    directory = save_random_model(real_layout_config(per_layer_inputs=True), tmp_path / "ple", seed=3)
    assert_equivalent(directory, "float32", random_sequences([4, 19, 11], 512, seed=5), 2)


def test_a_streamed_layer_equals_the_loaded_layer(real_layout_dir):
    """Every parameter and buffer of a layer built from the shards, as from_pretrained loads it."""
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.profile.loading import load_model

    whole = load_model(real_layout_dir, "bfloat16", "cpu")
    model = meta_model(real_layout_dir, "bfloat16")
    arch = family_adapter(model)
    body, layers, unused = arch.replay_body_path(model), arch.decoder_layers_path(model), arch.streamed_unused_modules(model)
    assert layers == "model.language_model.layers"
    assert "model.vision_tower" in unused
    with Checkpoint.open(real_layout_dir) as checkpoint:
        built = materialize(model, f"{layers}.5", checkpoint, torch.device("cpu"))
        shell = materialize(model, body, checkpoint, torch.device("cpu"), skip=(layers, *unused))
    expected = dict(whole.model.language_model.layers[5].state_dict())
    got = dict(model.model.language_model.layers[5].state_dict())
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    # Non-persistent buffers (rotary tables, embedding scale) come from the model's own init.
    for name, buffer in whole.model.language_model.named_buffers():
        if name.startswith("layers."):
            continue
        mine = model.model.language_model.get_buffer(name)
        assert mine.dtype == buffer.dtype and torch.equal(mine, buffer), name
    assert next(model.model.vision_tower.parameters()).device.type == "meta"
    built.release()
    shell.release()
    assert next(model.model.language_model.layers[5].parameters()).device.type == "meta"


def test_missing_layer_tensor_is_named(tmp_path, real_layout_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(real_layout_dir, broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.language_model.layers.2.router.proj.weight"
    shard = broken / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"no tensor 'model\.language_model\.layers\.2\.router\.proj\.weight'"):
        replay_streamed(broken, random_sequences([5], 512), DOMAINS, dtype="float32")


def test_unknown_domain_and_bad_device_are_refused(real_layout_dir):
    from moeprune.profile.generate import SequenceError

    sequences = random_sequences([5], 512)
    sequences[0]["domain"] = "poetry"
    with pytest.raises(SequenceError, match="domain 'poetry'"):
        replay_streamed(real_layout_dir, sequences, DOMAINS)
    with pytest.raises(StreamedReplayError, match="profile.device_map = 'balanced'"):
        replay_streamed(real_layout_dir, random_sequences([5], 512), DOMAINS, device_map="balanced")


def _demo_recipe(tmp_path: Path, replay: str):
    from moeprune.recipe import load_recipe

    root = Path(__file__).resolve().parents[1]
    text = (root / "recipes" / "demo.toml").read_text()
    text = text.replace('"../', f'"{root}/')  # every path the recipe names, relative to recipes/
    text = text.replace("max_new_tokens = 32", "max_new_tokens = 8").replace("[profile]\n", f'[profile]\nreplay = "{replay}"\n')
    path = tmp_path / f"recipe-{replay}.toml"
    path.write_text(text)
    return load_recipe(path)


def test_profile_stage_streamed_writes_the_same_statistics_file(tmp_path, monkeypatch):
    """`profile.replay = "streamed"` through the stage: the same stats.safetensors, byte for byte, and the
    whole model is never loaded when phase 1's sequences are reused."""
    import hashlib

    from moeprune.layout import RunLayout
    from moeprune.profile import stage

    layout = RunLayout.for_recipe("demo", runs_dir=tmp_path / "runs")
    whole = stage.run_profile(_demo_recipe(tmp_path, "whole"), layout, progress=False)
    whole_stats = hashlib.sha256(layout.profile_stats_path.read_bytes()).hexdigest()

    def no_whole_model(*args, **kwargs):
        raise AssertionError("streamed replay with reused sequences must not load the whole model")

    monkeypatch.setattr(stage, "load_model", no_whole_model)
    streamed = stage.run_profile(_demo_recipe(tmp_path, "streamed"), layout, progress=False)
    prompts = (Path(__file__).resolve().parents[1] / "calibration" / "demo.jsonl").read_text().splitlines()
    assert streamed["phase1"]["reused"] == len(prompts)
    assert hashlib.sha256(layout.profile_stats_path.read_bytes()).hexdigest() == whole_stats
    assert streamed["layers"] == whole["layers"] and streamed["findings"] == whole["findings"]
    assert streamed["moe"] == whole["moe"]
    assert streamed["settings"]["profile"]["replay"] == "streamed"


# --- every supported family, in its Hub on-disk layout (tests/families.py) --------------------------

FAMILY_NAMES = sorted(__import__("families").FAMILIES)
vocab_size = __import__("families").vocab_size


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "converter"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_a_streamed_layer_of_every_family_equals_the_loaded_layer(name, direct, family_models, monkeypatch):
    """Each family's last decoder layer (an MoE layer), assembled from its own on-disk tensors and
    no others, equals the layer from_pretrained loads, bit for bit: with per-expert parts read
    straight into their slices (``direct``), and with transformers' converter ops run on them."""
    from moeprune.io.loading_plan import TensorAssembly

    if not direct:
        monkeypatch.setattr(TensorAssembly, "placements", lambda self, shapes: None)
    from moeprune.arch import arch_for_dir
    from moeprune.io import materialize as materialize_module
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.profile.loading import load_model

    model_dir = family_models[name]
    whole = load_model(model_dir, "float32", "cpu")
    model = meta_model(model_dir, "float32")
    layers = family_adapter(model).decoder_layers_path(model)
    index = len(model.get_submodule(layers)) - 1
    read: list[str] = []
    original = materialize_module.read_tensor_into
    monkeypatch.setattr(materialize_module, "read_tensor_into", lambda c, info, t: (read.append(info.name), original(c, info, t)))
    with Checkpoint.open(model_dir) as checkpoint:
        built = materialize(model, f"{layers}.{index}", checkpoint, torch.device("cpu"))
        prefix = arch_for_dir(model_dir).layer_tensor_prefix(index)
        assert sorted(read) == sorted(n for n in checkpoint.names() if n.startswith(prefix))
    expected = dict(whole.get_submodule(layers)[index].state_dict())
    got = dict(model.get_submodule(layers)[index].state_dict())
    assert expected.keys() == got.keys()
    assert any(key.endswith("experts.gate_up_proj") for key in got)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    built.release()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_streamed_equals_whole_for_every_family(name, dtype, family_models):
    """Streamed replay of each family's tiny Hub-layout model (float32 on disk): every statistic
    bit-identical to the whole-model replay's, with aligned weights and, as measured on these
    single-shard checkpoints, with the plain memory-mapped ones too."""
    model_dir = family_models[name]
    # Padding within batches; one sequence longer than gpt-oss's 16-token sliding window.
    sequences = random_sequences([6, 21, 11, 3, 15], vocab_size(model_dir), seed=7)
    if not __import__("families").FAMILIES[name].streamed:
        with pytest.raises(StreamedReplayError, match="changes the hidden states between decoder layers.*use "
                                                      'profile.replay = "whole"'):
            replay_streamed(model_dir, sequences, DOMAINS, dtype=dtype, batch_size=2)
        return
    streamed = replay_streamed(model_dir, sequences, DOMAINS, dtype=dtype, batch_size=2)
    assert_bit_identical(whole_replay(model_dir, dtype, sequences, 2, aligned=True), streamed)
    assert_bit_identical(whole_replay(model_dir, dtype, sequences, 2), streamed)
    from moeprune.arch import inspect

    top_k = inspect(model_dir).top_k
    assert int(streamed.routed_count.sum()) == top_k * sum(len(s["input_ids"]) for s in sequences) * len(streamed.layers)


@pytest.mark.parametrize("removed, message", [
    (["model.layers.1.mlp.experts.3.up_proj.weight"], r"'model\.layers\.1\.mlp\.experts\.gate_up_proj' is assembled "
     r"from the same number of tensors .* the checkpoint has 8 x 'mlp\.experts\.\*\.gate_proj\.weight', "
     r"7 x 'mlp\.experts\.\*\.up_proj\.weight'"),
    ([f"model.layers.2.mlp.experts.{i}.up_proj.weight" for i in range(8)], r"has 8 x .*gate_proj.*, 0 x .*up_proj"),
    (["model.layers.2.mlp.experts.7.down_proj.weight"],
     r"'model\.layers\.2\.mlp\.experts\.down_proj' \[8, 32, 16\] is not covered by its 7 checkpoint tensors"),
])
def test_missing_expert_tensors_are_named(removed, message, family_models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(family_models["qwen3_moe"], broken)
    (shard,) = broken.glob("*.safetensors")
    tensors = load_file(shard)
    for name in removed:
        del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    config = json.loads((broken / "config.json").read_text())
    with pytest.raises(CheckpointError, match=message):
        replay_streamed(broken, random_sequences([5], config["vocab_size"]), DOMAINS, dtype="float32")
