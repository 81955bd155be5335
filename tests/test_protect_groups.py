"""Protected experts (REAP's super-experts rule, or a listed set) and balanced routing groups.

The pure rules first (moeprune.dropmap.protect, moeprune.dropmap.groups through select_experts),
then the tiny DeepSeek-V3 (n_group = 2) of tests/families.py through invoke's command line:

- one of its experts is made "super" (its expert weights scaled so its maximum activation norm is
  the model's largest, its router correction bias lowered so few tokens reach it and its summed
  contribution is its layer's lowest): `invoke dropmap` drops it without protection and keeps it
  with ``protect = "super-experts"``; a drop map forged to drop it fails the re-derivation that
  `invoke verify` runs, naming the layer and the expert;
- ``uniform-min-retention`` on the unmodified model keeps the same number in both routing groups,
  the best of each group by the criterion, and the chain prune -> verify-prune -> GGUF ->
  llama-server passes.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from invoke_cli import invoke, invoke_ok
from moeprune.dropmap.groups import RoutingGroups
from moeprune.dropmap.io import check_drop_map, load_drop_map
from moeprune.dropmap.protect import listed_experts, super_experts
from moeprune.dropmap.rederive import rederive_drop_map
from moeprune.dropmap.select import DropMapError, rank_experts, select_experts
from moeprune.errors import MoepruneError
from moeprune.profile.stats import build_stats, load_stats, max_activation_norm, save_stats

ROOT = Path(__file__).resolve().parents[1]
NAME = "deepseek_v3"
SUPER_ROW, SUPER_EXPERT = 0, 2  # decoder layer 1 (the first MoE layer), routing group 0


# --- the rules, pure ---------------------------------------------------------------------------


def test_super_experts_rule_is_reaps():
    """Threshold max(99.5th percentile, max / 10), strict, over the first 75% of the MoE layers only."""
    values = np.full((4, 64), 1.0)
    values[3, 0] = 60.0  # the largest, in the last quarter of the layers: never protected
    values[0, 3] = 50.0  # a super expert
    values[1, 5] = 40.0  # third: below the percentile, which interpolates between 40 and 50
    values[2, 7] = 5.9  # below max / 10
    found = super_experts(values, layers=[2, 3, 4, 5])
    assert found.threshold == float(np.quantile(values, 0.995)) == pytest.approx(40.0 + 0.725 * 10.0)
    assert [tuple(p) for p in np.argwhere(found.mask)] == [(0, 3)]
    assert found.layer_record(0) == [{"expert": 3, "because": "super-expert", "max_activation_norm": 50.0}]
    assert found.layer_record(1) == []
    few = np.ones((4, 8))
    few[1, 1] = 5.0
    few[0, 0] = 0.4  # above every other but below max / 10 (0.5): the absolute floor decides
    found = super_experts(few)
    assert found.threshold == max(float(np.quantile(few, 0.995)), 0.5)
    assert [tuple(p) for p in np.argwhere(found.mask)] == [(1, 1)]
    few[:] = 1.0
    few[3, 6] = 50.0  # only in the last quarter (int(0.75 * 4) = 3 layers considered)
    assert not super_experts(few).mask.any()
    assert not super_experts(np.ones((4, 8))).mask.any()  # nothing stands out: nothing protected


def test_listed_experts_name_a_pair_that_does_not_exist():
    assert [tuple(p) for p in np.argwhere(listed_experts([[3, 1], [1, 7]], [1, 3], 8).mask)] == [(0, 7), (1, 1)]
    with pytest.raises(MoepruneError, match=r"field 'dropmap.protect' = \[0, 1\]: decoder layer 0 has no routed experts"):
        listed_experts([[0, 1]], [1, 3], 8)
    with pytest.raises(MoepruneError, match=r"field 'dropmap.protect' = \[1, 8\]: expert 8 is outside \[0, 8\)"):
        listed_experts([[1, 8]], [1, 3], 8)


@pytest.mark.parametrize("strategy, kwargs", [
    ("uniform-min-retention", {"retention_threshold": 0.5}),
    ("per-layer-retention", {"retention_threshold": 0.5}),
    ("uniform-count", {"keep_count": 4}),
])
def test_a_protected_expert_is_kept_by_every_strategy(strategy, kwargs):
    contribution = np.random.default_rng(0).gamma(2.0, size=(3, 8)) + 1
    contribution[1, 6] = 1e-6  # the criterion's last
    plain = select_experts(strategy, contribution, contribution, top_k=2, **kwargs)
    assert not plain.keep_mask[1, 6]
    protection = listed_experts([[11, 6]], [10, 11, 12], 8)
    kept = select_experts(strategy, contribution, contribution, top_k=2, protection=protection, **kwargs)
    assert kept.keep_mask[1, 6]
    if strategy == "uniform-count":  # the same count: the protected expert takes the place of the last kept
        assert kept.keep_mask.sum(axis=1).tolist() == plain.keep_mask.sum(axis=1).tolist()
    else:  # it retains next to nothing, so the threshold may need one expert more beside it
        assert kept.retained_fraction.min() > 0.5 and (kept.keep_mask.sum(axis=1) >= plain.keep_mask.sum(axis=1)).all()
    with pytest.raises(DropMapError, match="keep_count = 1 is below the 2 protected experts of layer 11"):
        select_experts("uniform-count", contribution, contribution, top_k=1, keep_count=1,
                       protection=listed_experts([[11, 6], [11, 0]], [10, 11, 12], 8))


def test_grouped_selection_keeps_the_best_of_each_group_in_equal_numbers():
    rng = np.random.default_rng(4)
    contribution = rng.gamma(0.7, size=(5, 16)) + 1e-3
    groups = RoutingGroups(n_group=4, topk_group=2, min_per_group=1)
    for strategy, kwargs in [("uniform-min-retention", {"retention_threshold": 0.9}),
                             ("per-layer-retention", {"retention_threshold": 0.8}),
                             ("uniform-count", {"keep_count": 8})]:
        selection = select_experts(strategy, contribution, contribution, top_k=2, groups=groups, **kwargs)
        per_group = selection.keep_mask.reshape(5, 4, 4).sum(axis=2)
        assert (per_group == per_group[:, :1]).all(), (strategy, per_group)
        for row in range(5):
            for group in range(4):
                block = contribution[row, group * 4:(group + 1) * 4]
                want = set((group * 4 + rank_experts(block[None])[0][: per_group[row, 0]]).tolist())
                assert set(np.flatnonzero(selection.keep_mask[row, group * 4:(group + 1) * 4]) + group * 4) == want
    # uniform-min-retention: the smallest multiple of n_group whose balanced keep sets all pass.
    chosen = select_experts("uniform-min-retention", contribution, contribution, top_k=2, groups=groups,
                            retention_threshold=0.9)
    assert chosen.keep_count % 4 == 0 and chosen.retained_fraction.min() > 0.9
    fewer = select_experts("uniform-count", contribution, contribution, top_k=2, groups=groups,
                           keep_count=chosen.keep_count - 4)
    assert fewer.retained_fraction.min() <= 0.9


def test_grouped_selection_refuses_only_what_no_balanced_choice_satisfies():
    contribution = np.random.default_rng(1).gamma(1.0, size=(2, 8)) + 0.1
    v3 = RoutingGroups(n_group=2, topk_group=1, min_per_group=2)
    with pytest.raises(DropMapError, match="dropmap.keep_count = 5 is not a multiple of n_group = 2"):
        select_experts("uniform-count", contribution, contribution, top_k=2, keep_count=5, groups=v3)
    # top-2 inside one group (topk_group 1) and two per group (a V3 group is scored by its two best): 4 at least.
    with pytest.raises(DropMapError, match="dropmap.keep_count = 2 is below 4: each of the 2 routing groups must keep 2"):
        select_experts("uniform-count", contribution, contribution, top_k=2, keep_count=2, groups=v3)
    low = select_experts("uniform-min-retention", contribution, contribution, top_k=2, groups=v3,
                         retention_threshold=0.01)
    assert low.keep_count == 4 and low.min_keep == 4 and low.limited_by_min_keep
    with pytest.raises(DropMapError, match="n_group = 3 does not divide the 8 routed experts"):
        select_experts("uniform-count", contribution, contribution, top_k=2, keep_count=6,
                       groups=RoutingGroups(3, 1, 1))
    with pytest.raises(DropMapError, match="topk_group = 1 x 2 experts per group < top-k 4"):
        select_experts("uniform-count", contribution, contribution, top_k=4, keep_count=8,
                       groups=RoutingGroups(4, 1, 1))


# --- the tiny DeepSeek-V3, through invoke --------------------------------------------------------


def _load(model_dir: Path):
    import transformers

    return transformers.DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _sequences(vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{"id": f"s{i}", "domain": "math", "input_ids": torch.randint(10, vocab_size, (n,), generator=generator).tolist()}
            for i, n in enumerate((40, 33, 25, 51))]


def _profile(model_dir: Path, runs: Path, name: str) -> np.ndarray:
    """The profile statistics and the profile summary's max activation norm of ``model_dir``, as the
    profile stage writes them (replay, build_stats, save_stats); returns the max norms."""
    from moeprune.profile.replay import replay_sequences

    model = _load(model_dir)
    replay = replay_sequences(model, _sequences(model.config.vocab_size), ["math"], batch_size=2)
    stats = build_stats(layers=replay.layers, domains=replay.domains, contribution_sum=replay.contribution_sum,
                        routed_count=replay.routed_count, router_prob_sum=replay.router_prob_sum,
                        sequence_norm_sum=replay.sequence_norm_sum, domain_num_tokens=replay.domain_num_tokens,
                        model_sha256="c" * 64)
    profile_dir = runs / name / "profile"
    profile_dir.mkdir(parents=True, exist_ok=True)
    save_stats(stats, profile_dir / "stats.safetensors")
    peaks = max_activation_norm(replay.max_activation_norm)
    (profile_dir / "profile.json").write_text(json.dumps({"max_activation_norm": peaks.tolist()}))
    return peaks


def _recipe(tmp_path: Path, name: str, model_dir: Path, dropmap: str) -> Path:
    (tmp_path / "p.jsonl").write_text('{"id": "m-1", "domain": "math", "prompt": "1+1"}\n')
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\n[model]\nbase = "{model_dir}"\nname = "m"\n'
        '[calibration]\nprompts = "p.jsonl"\ndomains = ["math"]\nprompts_per_domain = 1\nmax_new_tokens = 4\n'
        f'[dropmap]\n{dropmap}\n'
        '[prune]\nmax_shard_bytes = 100000000\n[serve]\nctx_size = 256\n[eval]\ntasks = ["x"]\nmax_gen_toks = 8\n')
    return path


def _dropmap(tmp_path: Path, runs: Path, recipe: Path) -> object:
    env = {"MOEPRUNE_RUNS_DIR": str(runs), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    return invoke("--search-root", str(ROOT), "dropmap", "--recipe", str(recipe), env=env, inherit_env=False,
                  cwd=tmp_path)


@pytest.fixture(scope="module")
def super_model(family_models, tmp_path_factory) -> Path:
    """The tiny DeepSeek-V3 with expert 2 of decoder layer 1 made a rarely routed super expert."""
    out = tmp_path_factory.mktemp("super") / NAME
    model = _load(family_models[NAME])
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate.e_score_correction_bias[SUPER_EXPERT] -= 0.35  # fewer tokens choose it
        for name in ("gate_up_proj", "down_proj"):
            getattr(mlp.experts, name)[SUPER_EXPERT] *= 2.0  # its output grows about 8-fold
    model.save_pretrained(out)
    return out


def test_a_super_expert_is_never_dropped(super_model, tmp_path):
    runs = tmp_path / "runs"
    peaks = _profile(super_model, runs, "plain")
    shutil.copytree(runs / "plain", runs / "protected")
    contribution = load_stats(runs / "plain" / "profile" / "stats.safetensors").totals["contribution_sum"]
    # The premise: the model's largest max norm, its layer's smallest contribution.
    assert np.unravel_index(np.argmax(peaks), peaks.shape) == (SUPER_ROW, SUPER_EXPERT)
    assert int(np.argmin(contribution[SUPER_ROW])) == SUPER_EXPERT

    rule = 'strategy = "uniform-count"\nkeep_count = 6'
    done = _dropmap(tmp_path, runs, _recipe(tmp_path, "plain", super_model, rule))
    assert done.returncode == 0, done.stderr
    plain = load_drop_map(runs / "plain" / "expert_drop_metadata.json")
    assert SUPER_EXPERT in plain["layers"][SUPER_ROW]["drop"]  # the rule alone drops it
    assert "protect" not in plain["strategy"] and "protected" not in plain["layers"][0]

    done = _dropmap(tmp_path, runs, _recipe(tmp_path, "protected", super_model, rule + '\nprotect = "super-experts"'))
    assert done.returncode == 0, done.stderr
    assert "protected super experts (max activation norm > " in done.stdout and f"L1:{SUPER_EXPERT}" in done.stdout
    path = runs / "protected" / "expert_drop_metadata.json"
    protected = load_drop_map(path, model_config=json.loads((super_model / "config.json").read_text()))
    assert SUPER_EXPERT in protected["layers"][SUPER_ROW]["keep"]
    assert protected["layers"][SUPER_ROW]["protected"] == [
        {"expert": SUPER_EXPERT, "because": "super-expert", "max_activation_norm": float(peaks[SUPER_ROW, SUPER_EXPERT])}]
    assert protected["layers"][1]["protected"] == []
    assert protected["strategy"]["protect"]["rule"] == "super-experts"
    assert protected["routing_groups"] == {"n_group": 2, "topk_group": 1, "min_per_group": 2}
    assert protected.layers[SUPER_ROW].protected == (SUPER_EXPERT,) and protected.routing_groups == 2

    # What `invoke verify` re-derives: the honest map passes; one forged to drop the super expert fails by name.
    stats = load_stats(runs / "protected" / "profile" / "stats.safetensors")
    honest = rederive_drop_map(protected.to_dict(), stats.layers, stats.totals, stats.per_domain, max_activation_norm=peaks)
    assert honest.problems == [] and "protect super-experts" in honest.how
    forged = protected.to_dict()
    layer = forged["layers"][SUPER_ROW]
    swap = layer["drop"][0]
    layer["keep"] = sorted(set(layer["keep"]) - {SUPER_EXPERT} | {swap})
    layer["drop"] = sorted(set(layer["drop"]) - {swap} | {SUPER_EXPERT})
    layer["protected"] = []
    found = rederive_drop_map(forged, stats.layers, stats.totals, stats.per_domain, max_activation_norm=peaks)
    assert any(f"layer 1: drops expert {SUPER_EXPERT}, which is protected (a super expert: max activation norm"
               in problem for problem in found.problems), found.problems
    layer["protected"] = protected["layers"][SUPER_ROW]["protected"]
    with pytest.raises(DropMapError, match=f"layer 1: drops expert {SUPER_EXPERT}, which it lists as protected"):
        check_drop_map(forged)
    # Without the statistic the protection cannot be re-derived, and says so.
    blind = rederive_drop_map(protected.to_dict(), stats.layers, stats.totals, stats.per_domain)
    assert any("needs the profile's max_activation_norm" in p for p in blind.problems)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_and_streamed_replay_agree_exactly_on_the_max_norm(super_model, dtype):
    from moeprune.profile.loading import load_model
    from moeprune.profile.replay import replay_sequences
    from moeprune.profile.streamed import replay_streamed

    sequences = _sequences(json.loads((super_model / "config.json").read_text())["vocab_size"])
    model = load_model(super_model, dtype, "cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()
    whole = replay_sequences(model, sequences, ["math"], batch_size=2).max_activation_norm
    streamed = replay_streamed(super_model, sequences, ["math"], dtype=dtype, batch_size=2).max_activation_norm
    assert whole.shape == (1, 2, 8) and np.all(whole > 0)
    assert np.array_equal(whole, streamed)


@pytest.mark.llamacpp
def test_uniform_min_retention_on_grouped_routing_is_balanced_and_the_chain_passes(family_models, llama_build_shared,
                                                                                 tmp_path):
    from moeprune.llamacpp.convert import convert_to_gguf
    from moeprune.llamacpp.server import LlamaServer
    from moeprune.recipe import ServeSection

    base = family_models[NAME]
    runs = tmp_path / "runs"
    _profile(base, runs, "grouped")
    done = _dropmap(tmp_path, runs, _recipe(tmp_path, "grouped", base,
                                            'strategy = "uniform-min-retention"\nretention_threshold = 0.8'))
    assert done.returncode == 0, done.stderr
    drop_map_path = runs / "grouped" / "expert_drop_metadata.json"
    drop_map = load_drop_map(drop_map_path, model_config=json.loads((base / "config.json").read_text()))
    kept = drop_map["num_experts_kept"]
    assert kept < 8 and kept % 2 == 0
    contribution = load_stats(runs / "grouped" / "profile" / "stats.safetensors").totals["contribution_sum"]
    for row, entry in enumerate(drop_map["layers"]):
        for group in range(2):
            inside = [e for e in entry["keep"] if e // 4 == group]
            assert len(inside) == kept // 2
            best = rank_experts(contribution[row:row + 1, group * 4:group * 4 + 4])[0][: kept // 2]
            assert sorted(inside) == sorted((group * 4 + best).tolist())
        assert entry["retained_fraction"] > 0.8

    pruned = tmp_path / "pruned"
    invoke_ok("prune", "--base", str(base), "--drop-map", str(drop_map_path), "--out", str(pruned), in_process=True)
    assert "result: OK" in invoke_ok("verify-prune", "--base", str(base), "--pruned", str(pruned),
                                     in_process=True).stdout
    config = json.loads((pruned / "config.json").read_text())
    assert (config["n_routed_experts"], config["n_group"], config["topk_group"]) == (kept, 2, 1)
    # The pruned model routes as the base does with the dropped experts masked out (transformers).
    from moeprune.arch import arch_for_dir

    base_model, pruned_model = _load(base), _load(pruned)
    ids = torch.randint(10, base_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, full = pruned_model(input_ids=ids).logits, base_model(input_ids=ids).logits
        with arch_for_dir(base).masked_routing(base_model, {e["layer"]: e["drop"] for e in drop_map["layers"]}):
            masked = base_model(input_ids=ids).logits
    torch.testing.assert_close(got, masked, rtol=1e-4, atol=1e-4)
    assert (got - full).abs().max().item() > 1e-2  # the comparison has teeth
    gguf = tmp_path / "grouped-F16.gguf"
    record = convert_to_gguf(llama_build_shared, pruned, gguf, "f16", log_path=tmp_path / "convert.log")
    assert record["checks"]["expert_count"] == kept
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    # llama.cpp routes groups of expert_count / expert_group_count: the pruned groups, as in transformers.
    assert [int(fields[f"deepseek2.{key}"].contents()) for key in ("expert_count", "expert_group_count",
                                                                  "expert_group_used_count")] == [kept, 2, 1]
    serve = ServeSection(ctx_size=512, n_gpu_layers=0, reasoning_budget=-1, parallel=1, seed=0, threads=1,
                         startup_timeout_s=120)
    with LlamaServer(llama_build_shared, gguf, serve, tmp_path / "server.log") as server:
        reply = server.chat([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
    assert reply["usage"]["completion_tokens"] >= 1


def test_verify_names_the_protected_expert_a_forged_drop_map_drops(tmp_path):
    """A complete run made with a listed protection verifies; its drop map forged to drop the protected
    expert (the pruned checkpoint, results, card and manifest remade to agree) fails `invoke verify`,
    naming the layer and the expert."""
    from fakerun import make_fake_run, regenerate_outputs, write_eval, write_gguf

    from moeprune.dropmap.stage import run_dropmap
    from moeprune.prune.surgery import prune_checkpoint
    from moeprune.recipe import load_recipe

    run = make_fake_run(tmp_path / "work")
    layout = run.layout
    first = json.loads(layout.drop_map_path.read_text())["layers"][0]
    layer, victim = first["layer"], first["drop"][-1]
    recipe_path = tmp_path / "work" / "fake.toml"
    text = recipe_path.read_text()
    recipe_path.write_text(text.replace("retention_threshold = 0.95", f"retention_threshold = 0.95\nprotect = [[{layer}, {victim}]]"))
    recipe = load_recipe(recipe_path, check_inputs=False)

    def remake(edit=None) -> None:
        if edit is None:
            run_dropmap(recipe, layout)
        else:
            data = json.loads(layout.drop_map_path.read_text())
            edit(data)
            layout.drop_map_path.write_text(json.dumps(data, indent=2))
        shutil.rmtree(layout.pruned_dir)
        prune_checkpoint(run.base_dir, layout.drop_map_path, layout.pruned_dir, recipe.prune.max_shard_bytes, fsync=False)
        write_gguf(layout, run.base_dir)
        write_eval(recipe, layout)
        manifest = json.loads(layout.manifest_path.read_text())
        layout.manifest_path.write_text(json.dumps({**manifest, "recipe": recipe.settings()}))
        regenerate_outputs(layout.root)

    remake()
    drop_map = json.loads(layout.drop_map_path.read_text())
    assert victim in drop_map["layers"][0]["keep"]
    assert drop_map["layers"][0]["protected"] == [{"expert": victim, "because": "listed"}]
    honest = invoke("verify", str(layout.root))
    assert honest.returncode == 0, honest.stdout[-3000:] + honest.stderr[-2000:]

    def forge(data):
        entry = data["layers"][0]
        swap = entry["drop"][0]
        entry["keep"] = sorted(set(entry["keep"]) - {victim} | {swap})
        entry["drop"] = sorted(set(entry["drop"]) - {swap} | {victim})
        entry["protected"] = []

    remake(forge)
    forged = invoke("verify", str(layout.root))
    assert forged.returncode == 1 and "verification failed" in forged.stdout
    from moeprune.verify import verify

    failed = {c.name: c.detail for c in verify(str(layout.root)).failures}
    assert f"layer {layer}: drops expert {victim}, which is protected (listed in dropmap.protect)" in failed.get(
        "drop map re-derived", ""), failed


def test_preflight_refuses_a_keep_count_no_balanced_choice_satisfies(family_models, tmp_path):
    from moeprune.preflight import PreflightError, require_preflight
    from moeprune.recipe import load_recipe

    recipe = load_recipe(_recipe(tmp_path, "odd", family_models[NAME], 'strategy = "uniform-count"\nkeep_count = 5'))
    with pytest.raises(PreflightError, match=r"dropmap.keep_count' = 5: not a multiple of the model's n_group = 2"):
        require_preflight(recipe, ["dropmap"])


def test_max_activation_norm_is_the_largest_unweighted_output_element(super_model):
    """Recomputed independently from every routed pair's captured weighted output divided by its
    routing weight (one sequence per forward: no padding)."""
    from moeprune.profile.replay import replay_sequences

    model = _load(super_model)
    replay = replay_sequences(model, _sequences(model.config.vocab_size), ["math"], batch_size=1, capture=True)
    got = max_activation_norm(replay.max_activation_norm)
    for row, layer in enumerate(replay.layers):
        want = np.zeros(8)
        for capture in replay.recorder.captures[layer]:
            unweighted = (capture.weighted_output / capture.weight.unsqueeze(-1)).abs().amax(dim=-1).double().numpy()
            np.maximum.at(want, capture.expert_index.numpy(), unweighted)
        np.testing.assert_allclose(got[row], want, rtol=1e-6)
    assert np.argmax(got[SUPER_ROW]) == SUPER_EXPERT
