"""Every supported MoE family end to end on a tiny random model saved in its Hub layout.

For each family: the profile is exact against an independent recomputation; a drop map is made
from it; prune (through invoke's command line) and verify-prune pass bit for bit; the pruned model
reloads in transformers and its logits equal the base's with the dropped experts masked out of
routing; the pinned converter turns it into a GGUF whose expert count and expert tensors match,
and llama-server loads that GGUF and answers. The models are one shared session fixture
(``family_models`` in conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from families import FAMILIES, NUM_EXPERTS, TOP_K, Lazy, vocab_size
from invoke_cli import invoke_ok
from moeprune.arch import ArchError, arch_for_config, arch_for_dir
from moeprune.dropmap.io import build_drop_map, load_drop_map, write_drop_map
from moeprune.dropmap.select import Selection, select_experts
from moeprune.errors import MoepruneError
from moeprune.prune import prune_checkpoint, verify_prune
from moeprune.recipe import ServeSection

ROOT = Path(__file__).resolve().parents[1]
NAMES = sorted(FAMILIES)
SERVE = ServeSection(ctx_size=512, n_gpu_layers=0, reasoning_budget=-1, parallel=1, seed=0, threads=1,
                     startup_timeout_s=120)
LOGITS_TOL = 1e-4


def _load(model_dir: Path):
    import transformers

    arch = arch_for_dir(model_dir)
    return getattr(transformers, arch.transformers_causal_lm).from_pretrained(model_dir, dtype=torch.float32).eval()


def _sequences(vocab_size: int, lengths=(9, 14, 5, 11), seed: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"id": f"s{i}", "domain": "d", "input_ids": torch.randint(10, vocab_size, (n,), generator=generator).tolist()}
            for i, n in enumerate(lengths)]


def _independent_contributions(model, arch, sequences) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per layer and expert: sum of ||w * E_e(x)|| and routed count, from the unmodified model.

    The experts module's inputs (hidden states, chosen experts, their weights) are captured with a
    pre-hook during a plain forward; each routed pair's output is then recomputed by calling the
    module itself on that one token with that one expert and weight 1, and weighted in float64.
    """
    modules = arch.moe_modules(model)
    captured: dict[int, list] = {m.layer_index: [] for m in modules}
    handles = [
        m.experts.register_forward_pre_hook(lambda _mod, args, index=m.layer_index: captured[index].append(
            tuple(a.detach().clone() for a in args[:3])))
        for m in modules
    ]
    with torch.no_grad():
        for record in sequences:
            model.model(input_ids=torch.tensor([record["input_ids"]]), use_cache=False)
    for handle in handles:
        handle.remove()
    sums, counts = {}, {}
    with torch.no_grad():
        for m in modules:
            total = np.zeros(NUM_EXPERTS)
            count = np.zeros(NUM_EXPERTS, dtype=np.int64)
            for hidden, index, weight in captured[m.layer_index]:
                for token in range(hidden.shape[0]):
                    for slot in range(index.shape[1]):
                        expert = int(index[token, slot])
                        one = m.experts(hidden[token : token + 1], index[token : token + 1, slot : slot + 1],
                                        torch.ones((1, 1), dtype=weight.dtype))
                        total[expert] += float((one.double() * float(weight[token, slot])).norm())
                        count[expert] += 1
            sums[m.layer_index], counts[m.layer_index] = total, count
    return sums, counts


@pytest.fixture(scope="module")
def profiled(family_models):
    """name -> (contribution_sum [layers, experts], layers) measured by moeprune's replay."""
    from moeprune.profile.replay import replay_sequences

    def profile(name: str):
        model = _load(family_models[name])
        replay = replay_sequences(model, _sequences(vocab_size(family_models[name])), ["d"], batch_size=2)
        return replay.contribution_sum[0], replay.routed_count[0], replay.layers

    return Lazy(NAMES, profile)


@pytest.mark.parametrize("name", NAMES)
def test_profile_is_exact_against_an_independent_recomputation(name, family_models, profiled):
    model = _load(family_models[name])
    arch = arch_for_dir(family_models[name])
    config = json.loads((family_models[name] / "config.json").read_text())
    contribution, routed, layers = profiled[name]
    assert layers == list(FAMILIES[name].moe_layers) == arch.moe_layers(config)
    sequences = _sequences(vocab_size(family_models[name]))
    sums, counts = _independent_contributions(model, arch, sequences)
    for row, layer in enumerate(layers):
        np.testing.assert_array_equal(routed[row], counts[layer])
        np.testing.assert_allclose(contribution[row], sums[layer], rtol=1e-5, atol=1e-9)
    assert routed.sum() == sum(len(s["input_ids"]) for s in sequences) * TOP_K * len(layers)


def _drop_map_for(name: str, model_dir: Path, contribution: np.ndarray, layers: list[int], path: Path) -> dict:
    """A uniform drop map from the profile; grouped families keep the same count in every routing group."""
    config = json.loads((model_dir / "config.json").read_text())
    keep_count = FAMILIES[name].keep
    groups = int(arch_for_config(config).text_config(config).get("n_group") or 1)
    if groups == 1:
        selection = select_experts("uniform-count", contribution, contribution, top_k=TOP_K, keep_count=keep_count)
    else:
        size, per_group = NUM_EXPERTS // groups, keep_count // groups
        mask = np.zeros_like(contribution, dtype=bool)
        for row in range(contribution.shape[0]):
            for group in range(groups):
                block = contribution[row, group * size : (group + 1) * size]
                mask[row, group * size + np.argsort(-block, kind="stable")[:per_group]] = True
        kept = (contribution * mask).sum(axis=1) / contribution.sum(axis=1)
        selection = Selection(strategy="uniform-count", criterion="contribution-sum", keep_mask=mask,
                              retained_fraction=kept, criterion_retained_fraction=kept, keep_count=keep_count,
                              retention_threshold=None, protect_top_k=0, seed=0, min_keep=TOP_K,
                              limited_by_min_keep=False)
    drop_map = build_drop_map(selection, layers=layers, top_k=TOP_K, base_model={"id": name},
                              profile_stats_sha256="0" * 64, recipe_sha256=None)
    write_drop_map(path, drop_map)
    load_drop_map(path, model_config=config)  # fits the model and its family's constraints
    return drop_map


@pytest.fixture(scope="module")
def pruned_families(family_models, profiled, tmp_path_factory):
    """name -> (pruned dir, drop map): made with `invoke prune`, checked with `invoke verify-prune`."""
    work = tmp_path_factory.mktemp("pruned-families")

    def prune(name: str):
        contribution, _, layers = profiled[name]
        drop_map_path = work / f"{name}.drop.json"
        drop_map = _drop_map_for(name, family_models[name], contribution, layers, drop_map_path)
        pruned = work / name
        invoke_ok("prune", "--base", str(family_models[name]), "--drop-map", str(drop_map_path), "--out", str(pruned),
                  in_process=True)
        return pruned, drop_map

    return Lazy(NAMES, prune)


@pytest.mark.parametrize("name", NAMES)
def test_prune_and_verify_prune_bit_exact(name, family_models, pruned_families):
    pruned, drop_map = pruned_families[name]
    report = verify_prune(family_models[name], pruned)
    assert report.ok, report.render()
    keep, layers = FAMILIES[name].keep, len(FAMILIES[name].moe_layers)
    assert report.num_experts == NUM_EXPERTS and report.num_experts_kept == keep
    assert report.expert_slices_checked >= keep * layers * 2  # every kept expert's tensors (or slices)
    assert report.router_rows_checked >= keep * layers
    config = json.loads((pruned / "config.json").read_text())
    arch = arch_for_config(config)
    assert arch.num_experts(config) == keep
    base_config = json.loads((family_models[name] / "config.json").read_text())
    assert arch.with_num_experts(base_config, keep) == config  # nothing else in the config changed
    if name == "deepseek_v3":  # the dense first layer and the shared experts are copied unchanged
        from moeprune.io.checkpoint import Checkpoint

        with Checkpoint.open(pruned) as checkpoint:
            names = checkpoint.names()
        assert "model.layers.0.mlp.gate_proj.weight" in names
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names
        assert f"model.layers.1.mlp.experts.{keep - 1}.up_proj.weight" in names
        assert f"model.layers.1.mlp.experts.{keep}.up_proj.weight" not in names
    verified = invoke_ok("verify-prune", "--base", str(family_models[name]), "--pruned", str(pruned), in_process=True)
    assert "result: OK" in verified.stdout


@pytest.mark.parametrize("name", NAMES)
def test_pruned_model_reloads_and_equals_the_masked_base(name, family_models, pruned_families):
    pruned_dir, drop_map = pruned_families[name]
    base, pruned = _load(family_models[name]), _load(pruned_dir)
    arch = arch_for_dir(pruned_dir)
    assert arch.model_num_experts(pruned) == FAMILIES[name].keep
    drop_by_layer = {entry["layer"]: entry["drop"] for entry in drop_map["layers"]}
    ids = torch.randint(10, base.config.get_text_config().vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
        full = base(input_ids=ids).logits
        with arch.masked_routing(base, drop_by_layer):
            masked = base(input_ids=ids).logits
        restored = base(input_ids=ids).logits
    torch.testing.assert_close(got, masked, rtol=LOGITS_TOL, atol=LOGITS_TOL)
    assert (got - full).abs().max().item() > 100 * LOGITS_TOL  # the comparison has teeth
    assert torch.equal(restored, full)  # the mask was removed


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].no_gguf is None])
def test_pruned_gguf_converts_and_llama_server_answers(name, pruned_families, llama_build_shared, tmp_path):
    from moeprune.llamacpp.convert import convert_to_gguf
    from moeprune.llamacpp.server import LlamaServer

    pruned_dir, _ = pruned_families[name]
    gguf = tmp_path / f"{name}-F16.gguf"
    record = convert_to_gguf(llama_build_shared, pruned_dir, gguf, "f16", log_path=tmp_path / "convert.log")
    arch = arch_for_dir(pruned_dir)
    checks = record["checks"]
    assert checks["architecture"] == arch.gguf_arch
    assert checks["expert_count"] == FAMILIES[name].keep
    assert checks["expert_tensors_checked"] >= len(FAMILIES[name].moe_layers) * 2
    with LlamaServer(llama_build_shared, gguf, SERVE, tmp_path / "server.log") as server:
        reply = server.chat([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] >= 1


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].no_gguf is not None])
def test_safetensors_only_families_fail_conversion_for_the_stated_reason(name, pruned_families, llama_build_shared,
                                                                         tmp_path):
    """A family whose README row says "safetensors only": the pinned converter refuses its pruned
    model with exactly the error the row's reason names (a conversion that starts working fails this)."""
    from moeprune.llamacpp.convert import convert_to_gguf

    error, _reason = FAMILIES[name].no_gguf
    with pytest.raises(MoepruneError, match=error):
        convert_to_gguf(llama_build_shared, pruned_families[name][0], tmp_path / f"{name}-F16.gguf", "f16",
                        log_path=tmp_path / "convert.log")
    assert not (tmp_path / f"{name}-F16.gguf").exists()


def test_grouped_routing_refuses_unbalanced_groups(family_models, profiled, tmp_path):
    name = "deepseek_v3"
    contribution, _, layers = profiled[name]
    config = json.loads((family_models[name] / "config.json").read_text())
    mask = np.zeros_like(contribution, dtype=bool)
    mask[:, :6] = True  # 4 experts of group 0, 2 of group 1
    kept = (contribution * mask).sum(axis=1) / contribution.sum(axis=1)
    selection = Selection(strategy="uniform-count", criterion="contribution-sum", keep_mask=mask, retained_fraction=kept,
                          criterion_retained_fraction=kept, keep_count=6, retention_threshold=None, protect_top_k=0,
                          seed=0, min_keep=TOP_K, limited_by_min_keep=False)
    path = tmp_path / "unbalanced.json"
    write_drop_map(path, build_drop_map(selection, layers=layers, top_k=TOP_K, base_model={"id": name},
                                        profile_stats_sha256="0" * 64, recipe_sha256=None))
    with pytest.raises(MoepruneError, match=r"layer 1 keeps \[4, 2\] experts in its 2 routing groups"):
        load_drop_map(path, model_config=config)
    with pytest.raises(MoepruneError, match="every group must keep the same number"):
        prune_checkpoint(family_models[name], path, tmp_path / "out", 10**8)
    assert not (tmp_path / "out").exists()


def test_quantized_gpt_oss_experts_are_refused():
    arch = arch_for_config({"model_type": "gpt_oss"})
    with pytest.raises(ArchError, match="dequantize MXFP4"):
        arch.classify_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks")


EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.toml"))


def test_there_is_an_example_recipe_per_family():
    import tomllib

    from moeprune.arch import ADAPTERS

    families = {tomllib.loads(path.read_text())["card"]["tags"][2] for path in EXAMPLES}
    # Gemma 4 has the reference recipe; DeepSeek-V3 itself (671B, FP8 on the Hub) fits no single GPU
    # box: GLM-4.5-Air exercises the same router code. MiniMax-M2 (230B, FP8 on the Hub) and GLM-5
    # (glm_moe_dsa, 744B) fit no single GPU box either.
    expected = {adapter.name for adapter in ADAPTERS} - {"gemma4", "deepseek_v3", "minimax_m2", "glm_moe_dsa"}
    assert families == expected


@pytest.mark.parametrize("recipe", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_recipes_pass_invoke_check_offline(recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = invoke_ok("check", "--recipe", str(recipe), in_process=True)
    assert f"recipe '{recipe.stem}' is valid" in result.stdout


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "deepseek_v2", "gpt_oss", "mixtral"])
def test_card_of_a_family_is_phrased_for_it_and_verifies(name, llama_source_shared, tmp_path):
    """A complete (synthetic-eval) run on the family's model: the card uses its names, and verify passes."""
    from fakerun import make_fake_run
    from families import build_family_model, gpt2_vocab

    from moeprune.verify import verify

    vocab = gpt2_vocab(llama_source_shared.root)
    run = make_fake_run(tmp_path / "work", save_model=lambda out: build_family_model(name, out, vocab))
    arch = arch_for_dir(run.base_dir)
    card = (run.layout.card_dir / "README.md").read_text()
    assert arch.router_sentence in card and "proj.weight" not in card and "per_expert_scale" not in card
    config = json.loads((run.layout.pruned_dir / "config.json").read_text())
    assert f"`{arch.count_key(config)}: {arch.num_experts(config)}`" in card
    report = verify(str(run.layout.root), run.base_dir)
    assert report.ok, "\n".join(f"{c.name} {c.target}: {c.detail}" for c in report.failures)
    assert {"drop map vs weights", "card numbers", "card text", "kept experts bit-exact",
            "base size on the card"} <= {c.name for c in report.checks if c.ok}


@pytest.mark.parametrize("name", NAMES)
def test_one_decoder_layer_can_be_materialized_alone(name, family_models):
    """What a layer-streamed replay does: build the model on meta, give one decoder layer its values
    from the checkpoint (and nothing else), and embed the inputs as the text model does."""
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.io.materialize import materialize, meta_model

    model = _load(family_models[name])
    arch = arch_for_dir(family_models[name])
    index = FAMILIES[name].moe_layers[-1]
    prefix = arch.layer_tensor_prefix(index)
    from safetensors import safe_open

    with safe_open(str(next(family_models[name].glob("*.safetensors"))), "pt") as handle:
        on_disk = {key for key in handle.keys() if key.startswith(prefix)}
    assert on_disk and all(arch.classify_tensor(key) is None or arch.classify_tensor(key).layer == index
                           for key in on_disk)
    shell = meta_model(family_models[name], "float32")
    layers_path = arch.decoder_layers_path(shell)
    with Checkpoint.open(family_models[name]) as checkpoint:
        built = materialize(shell, f"{layers_path}.{index}", checkpoint, torch.device("cpu"))
    assert built.nbytes > 0
    alone = arch.decoder_layers(shell)[index].state_dict()
    loaded = arch.decoder_layers(model)[index].state_dict()
    assert alone.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(alone[key], value), key
    assert all(p.is_meta for p in arch.decoder_layers(shell)[index - 1].parameters())
    ids = torch.tensor([[11, 42, 7, 99]])
    torch.testing.assert_close(arch.embed_inputs(model, ids), model.get_input_embeddings()(ids))
