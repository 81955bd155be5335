"""The family adapters' pure parts and the typed drop map (no model, no file beyond tmp_path)."""

from __future__ import annotations

import json

import pytest

from moeprune.arch import ArchError, arch_for_config, arch_for_gguf, supported_model_types
from moeprune.arch.patterns import EXPERT_SCALE, EXPERTS, ROUTER_WEIGHT
from moeprune.dropmap.select import DropMapError
from moeprune.dropmap.types import DropMap
from moeprune.errors import MoepruneError

GEMMA = {"model_type": "gemma4", "text_config": {"model_type": "gemma4_text", "num_experts": 16, "top_k_experts": 2,
                                                 "num_hidden_layers": 3, "enable_moe_block": True}}


def test_the_adapter_is_chosen_from_model_type():
    assert arch_for_config(GEMMA).name == "gemma4"
    assert arch_for_config({"text_config": {"num_experts": 4}}).name == "gemma4"  # untyped, Gemma 4 nesting
    with pytest.raises(ArchError, match="model_type 'bert' is not a supported MoE family.*src/moeprune/arch"):
        arch_for_config({"model_type": "bert"}, "m/config.json")
    with pytest.raises(ArchError, match="no model_type"):
        arch_for_config({"num_experts": 4})
    assert "gemma4" in supported_model_types()
    assert arch_for_gguf("gemma4").name == "gemma4" and arch_for_gguf("bert") is None


def test_gemma4_config_keys_and_new_count():
    arch = arch_for_config(GEMMA)
    assert (arch.num_experts(GEMMA), arch.top_k(GEMMA), arch.moe_layers(GEMMA)) == (16, 2, [0, 1, 2])
    updated = arch.with_num_experts(GEMMA, 11)
    assert updated["text_config"]["num_experts"] == 11 and GEMMA["text_config"]["num_experts"] == 16
    dense = json.loads(json.dumps(GEMMA))
    dense["text_config"]["enable_moe_block"] = False
    assert "enable_moe_block is false" in arch.dense_reason(dense)
    with pytest.raises(ArchError, match="no integer text_config.num_experts"):
        arch.num_experts({"model_type": "gemma4", "text_config": {}})


def test_gemma4_tensor_roles_on_disk():
    arch = arch_for_config(GEMMA)
    prefix = "model.language_model.layers.3."
    assert arch.classify_tensor(prefix + "experts.gate_up_proj").role == EXPERTS
    assert arch.classify_tensor(prefix + "router.proj.weight").role == ROUTER_WEIGHT
    scale = arch.classify_tensor(prefix + "router.per_expert_scale")
    assert (scale.role, scale.layer, scale.axis) == (EXPERT_SCALE, 3, 0)
    assert arch.classify_tensor(prefix + "mlp.down_proj.weight") is None  # the dense MLP is copied
    assert arch.classify_tensor("model.vision_tower.encoder.layers.0.experts.x") is None
    with pytest.raises(ArchError, match="unsupported expert tensor"):
        arch.classify_tensor(prefix + "experts.down_proj_scale")


def _drop_map() -> dict:
    return {
        "format_version": 1,
        "base_model": {"id": "m", "revision": None, "sha256": None},
        "num_experts": 4, "top_k": 1, "num_experts_kept": 2,
        "strategy": {"name": "uniform-count", "criterion": "contribution-sum", "retention_threshold": None,
                     "keep_count": 2, "protect_top_k": 0, "seed": 0},
        "layers": [{"layer": 0, "keep": [0, 2], "drop": [1, 3], "retained_fraction": 0.9},
                   {"layer": 1, "keep": [1, 3], "drop": [0, 2], "retained_fraction": 0.8}],
        "hashes": {"profile_stats_sha256": "0" * 64, "recipe_sha256": None},
        "uniform": True,
    }


def test_drop_map_is_typed_validated_once_and_read_only(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps(_drop_map()))
    drop_map = DropMap.load(path)
    assert drop_map == _drop_map()  # reads as the JSON document
    assert (drop_map.num_experts, drop_map.top_k, drop_map.num_experts_kept, drop_map.uniform) == (4, 1, 2, True)
    assert drop_map.keep_by_layer == {0: [0, 2], 1: [1, 3]} and drop_map.drop_by_layer[1] == [0, 2]
    assert drop_map.moe_layers == [0, 1] and drop_map.kept_counts == [2] and drop_map.layers[1].keep == (1, 3)
    drop_map["layers"][0]["keep"].append(3)  # a copy: the validated map cannot be changed behind its back
    assert drop_map.keep_by_layer[0] == [0, 2]
    with pytest.raises(TypeError, match="DropMap.load"):
        DropMap(_drop_map(), "x")
    broken = _drop_map()
    broken["layers"][1]["drop"] = [0]
    with pytest.raises(DropMapError, match="neither kept nor dropped"):
        DropMap.from_dict(broken, source="broken.json")
    path.write_text("[1]")
    with pytest.raises(MoepruneError, match="must be a JSON object"):
        DropMap.load(path)


def test_gemma4_layer_build_embedding_masking_and_in_memory_prune():
    import torch
    from tiny_gemma4 import NUM_EXPERTS, NUM_LAYERS, TEXT_CONFIG, tiny_gemma4_model

    from moeprune.arch import arch_for_model

    model = tiny_gemma4_model()
    arch = arch_for_model(model)
    assert [m.layer_index for m in arch.moe_modules(model)] == list(range(NUM_LAYERS))
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(arch.embed_inputs(model, ids), model.get_input_embeddings()(ids))
    router = arch.moe_modules(model)[0].router
    hidden = torch.randn(3, TEXT_CONFIG["hidden_size"])
    probabilities, weights, index = router(hidden)
    logits = torch.log(probabilities)  # softmax is shift-invariant: log-probabilities route the same
    got_weights, got_index = arch.route(router, logits)
    assert torch.equal(got_index, index) and torch.allclose(got_weights, weights)
    with torch.no_grad():
        half = NUM_EXPERTS // 2  # even layers drop the first half of their experts, odd layers the second
        dropped = {layer: range(half) if layer % 2 == 0 else range(half, NUM_EXPERTS) for layer in range(NUM_LAYERS)}
        with arch.masked_routing(model, dropped):
            masked = model(input_ids=ids).logits
        arch.prune_in_memory(model, {layer: sorted(set(range(NUM_EXPERTS)) - set(drop)) for layer, drop in dropped.items()})
        pruned = model(input_ids=ids).logits
    assert arch.model_num_experts(model) == half
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
