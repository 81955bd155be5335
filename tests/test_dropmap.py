"""Drop map: selection properties, file format, report, stage, and in-memory pruning."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from invoke_cli import invoke
from tiny_gemma4 import tiny_gemma4_model

from moeprune.dropmap.io import build_drop_map, check_drop_map, load_drop_map, write_drop_map
from moeprune.dropmap.report import report_text
from moeprune.dropmap.select import (
    DropMapError,
    criterion_scores,
    domain_max_scores,
    keep_order,
    rank_experts,
    retained_fraction,
    retention_curve,
    select_experts,
)
from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.recipe import parse_recipe
from moeprune.schemas import SchemaError

ROOT = Path(__file__).resolve().parents[1]

# --- hypothesis inputs -----------------------------------------------------------------------


@st.composite
def contributions(draw, max_layers: int = 5, max_experts: int = 12):
    """A [layers, experts] non-negative contribution matrix with a positive total per layer."""
    layers = draw(st.integers(1, max_layers))
    experts = draw(st.integers(2, max_experts))
    values = draw(
        arrays(np.float64, (layers, experts), elements=st.floats(0, 1e3, allow_nan=False, allow_subnormal=False))
    )
    # Coarse values make exact ties common, which is what tie-breaking must survive.
    values = np.round(values, 0)
    values[:, 0] += 1.0  # every layer has some contribution
    return values


@st.composite
def selection_case(draw):
    contribution = draw(contributions())
    experts = contribution.shape[1]
    top_k = draw(st.integers(1, experts))
    protect = draw(st.integers(0, experts))
    scores = draw(
        arrays(np.float64, contribution.shape, elements=st.floats(0, 10, allow_nan=False, allow_subnormal=False))
    )
    return contribution, np.round(scores, 1), top_k, protect


THRESHOLDS = st.one_of(st.floats(0.01, 0.999), st.just(1.0), st.just(0.99), st.just(0.5))


def _select(strategy, contribution, scores, top_k, **kwargs):
    return select_experts(strategy, contribution, scores, top_k=top_k, criterion="contribution-sum", **kwargs)


# --- selection properties ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(case=selection_case(), threshold=THRESHOLDS, strategy=st.sampled_from(
    ["uniform-min-retention", "per-layer-retention"]))
def test_keep_and_drop_are_disjoint_and_complete(case, threshold, strategy):
    contribution, scores, top_k, protect = case
    selection = _select(strategy, contribution, scores, top_k, retention_threshold=threshold, protect_top_k=protect)
    for row in range(contribution.shape[0]):
        keep, drop = selection.keep_indices(row), selection.drop_indices(row)
        assert set(keep).isdisjoint(drop)
        assert sorted(keep + drop) == list(range(contribution.shape[1]))
        assert len(keep) >= max(top_k, protect)


@settings(max_examples=150, deadline=None)
@given(case=selection_case())
def test_retention_never_falls_as_more_experts_are_kept(case):
    contribution, scores, top_k, protect = case
    previous = np.zeros(contribution.shape[0])
    for count in range(max(top_k, protect), contribution.shape[1] + 1):
        selection = _select("uniform-count", contribution, scores, top_k, keep_count=count, protect_top_k=protect)
        assert np.all(selection.retained_fraction >= previous)
        previous = selection.retained_fraction
    assert np.all(previous == 1.0)  # keeping everything retains exactly all of it


@settings(max_examples=200, deadline=None)
@given(case=selection_case(), threshold=THRESHOLDS)
def test_uniform_min_retention_returns_the_minimal_count(case, threshold):
    contribution, scores, top_k, protect = case
    selection = _select("uniform-min-retention", contribution, scores, top_k,
                        retention_threshold=threshold, protect_top_k=protect)
    n = selection.keep_count
    assert np.all(selection.layer_keep_counts == n)
    passes = (lambda f: f >= 1.0) if threshold == 1.0 else (lambda f: f > threshold)
    assert np.all(passes(selection.retained_fraction))
    floor = max(top_k, protect)
    if n > floor:
        fewer = _select("uniform-count", contribution, scores, top_k, keep_count=n - 1, protect_top_k=protect)
        assert not np.all(passes(fewer.retained_fraction)), "N-1 would also pass: N is not minimal"
    else:
        assert n == floor


@settings(max_examples=100, deadline=None)
@given(case=selection_case(), threshold=THRESHOLDS)
def test_per_layer_counts_are_minimal_per_layer_and_bounded_by_uniform(case, threshold):
    contribution, scores, top_k, protect = case
    kwargs = {"retention_threshold": threshold, "protect_top_k": protect}
    per_layer = _select("per-layer-retention", contribution, scores, top_k, **kwargs)
    uniform = _select("uniform-min-retention", contribution, scores, top_k, **kwargs)
    assert per_layer.keep_count is None and not per_layer.uniform
    assert per_layer.layer_keep_counts.max() == uniform.keep_count
    curve = retention_curve(contribution, keep_order(contribution, scores, protect))
    for row, count in enumerate(per_layer.layer_keep_counts):
        if count > max(top_k, protect):
            below = curve[row, count - 1]
            assert (below < 1.0) if threshold == 1.0 else (below <= threshold)


@settings(max_examples=100, deadline=None)
@given(case=selection_case())
def test_protected_experts_are_always_kept(case):
    contribution, scores, top_k, protect = case
    count = max(top_k, protect)
    selection = _select("uniform-count", contribution, scores, top_k, keep_count=count, protect_top_k=protect)
    by_contribution = rank_experts(contribution)
    for row in range(contribution.shape[0]):
        assert set(by_contribution[row, :protect]) <= set(selection.keep_indices(row))


def test_ties_are_broken_by_lower_index():
    scores = np.array([[1.0, 3.0, 1.0, 3.0, 0.0]])
    assert rank_experts(scores).tolist() == [[1, 3, 0, 2, 4]]
    selection = _select("uniform-count", scores, scores, 1, keep_count=3)
    assert selection.keep_indices(0) == [0, 1, 3]


def test_reference_rule_on_a_known_layer():
    # Contributions 50, 30, 15, 4, 1 (total 100): 3 experts retain 95%, 4 retain 99%.
    contribution = np.array([[4.0, 50.0, 1.0, 30.0, 15.0]])
    at_95 = _select("uniform-min-retention", contribution, contribution, 1, retention_threshold=0.95)
    assert at_95.keep_count == 4  # 95% is not *more than* 95%
    assert at_95.keep_indices(0) == [0, 1, 3, 4]
    assert at_95.retained_fraction[0] == pytest.approx(0.99)
    at_94 = _select("uniform-min-retention", contribution, contribution, 1, retention_threshold=0.94)
    assert at_94.keep_count == 3 and at_94.drop_indices(0) == [0, 2]


def test_uniform_count_is_held_at_top_k_and_flagged():
    contribution = np.array([[100.0, 1.0, 1.0, 1.0]])
    selection = _select("uniform-min-retention", contribution, contribution, 2, retention_threshold=0.5)
    assert selection.keep_count == 2 and selection.limited_by_min_keep


# --- criteria ----------------------------------------------------------------------------------


def _totals():
    contribution = np.array([[10.0, 6.0, 1.0, 3.0], [2.0, 2.0, 8.0, 0.0]])
    counts = np.array([[10, 2, 1, 6], [4, 1, 4, 0]], dtype=np.int64)
    return {
        "contribution_sum": contribution,
        "routed_count": counts,
        "reap_mean": np.divide(contribution, counts, out=np.zeros_like(contribution), where=counts > 0),
    }


def test_criteria_rank_as_defined():
    totals = _totals()
    per_domain = {
        "math": {"contribution_sum": np.array([[9.0, 0.0, 0.0, 1.0], [1.0, 1.0, 8.0, 0.0]])},
        "code": {"contribution_sum": np.array([[1.0, 6.0, 1.0, 2.0], [1.0, 1.0, 0.0, 0.0]])},
    }
    assert rank_experts(criterion_scores("contribution-sum", totals))[0].tolist() == [0, 1, 3, 2]
    assert rank_experts(criterion_scores("reap-mean", totals))[0].tolist() == [1, 0, 2, 3]
    assert rank_experts(criterion_scores("frequency", totals))[0].tolist() == [0, 3, 1, 2]
    domain_max = criterion_scores("domain-max", totals, per_domain)
    # layer 0: math shares 0.9, 0, 0, 0.1; code shares 0.1, 0.6, 0.1, 0.2
    assert domain_max[0].tolist() == pytest.approx([0.9, 0.6, 0.1, 0.2])
    assert np.array_equal(domain_max, domain_max_scores({k: v["contribution_sum"] for k, v in per_domain.items()}))


def test_random_criterion_is_seeded():
    totals = _totals()
    a = criterion_scores("random", totals, seed=7)
    assert np.array_equal(a, criterion_scores("random", totals, seed=7))
    assert not np.array_equal(a, criterion_scores("random", totals, seed=8))


def test_retention_is_measured_on_contribution_whatever_ranks():
    totals = _totals()
    frequency = criterion_scores("frequency", totals)
    selection = select_experts("uniform-count", totals["contribution_sum"], frequency, top_k=1,
                               criterion="frequency", keep_count=2)
    # layer 0 keeps experts 0 and 3 by frequency: 13 of 20 contribution, 16 of 19 routed tokens
    assert selection.keep_indices(0) == [0, 3]
    assert selection.retained_fraction[0] == pytest.approx(13 / 20)
    assert selection.criterion_retained_fraction[0] == pytest.approx(16 / 19)


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.0, -0.5, 1.01, 2.0])
def test_threshold_outside_unit_interval_is_refused(threshold):
    contribution = np.ones((2, 4))
    with pytest.raises(DropMapError, match=r"outside \(0, 1\]"):
        _select("uniform-min-retention", contribution, contribution, 1, retention_threshold=threshold)


def test_keep_count_below_top_k_is_refused():
    contribution = np.ones((2, 8))
    with pytest.raises(DropMapError, match="below the model's top-k routing"):
        _select("uniform-count", contribution, contribution, 4, keep_count=3)


def test_unknown_criterion_and_strategy_are_named():
    with pytest.raises(DropMapError, match="unknown criterion 'loudness'"):
        criterion_scores("loudness", _totals())
    with pytest.raises(DropMapError, match="unknown strategy 'greedy'"):
        _select("greedy", np.ones((1, 2)), np.ones((1, 2)), 1)


def test_empty_layer_and_nan_are_refused():
    with pytest.raises(DropMapError, match="zero total contribution"):
        retention_curve(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[0, 1], [0, 1]]))
    with pytest.raises(DropMapError, match="NaN"):
        retained_fraction(np.array([[np.nan, 1.0]]), np.array([[True, False]]))


# --- the drop-map file -------------------------------------------------------------------------


def _drop_map(strategy="uniform-min-retention", **kwargs):
    rng = np.random.default_rng(3)
    contribution = rng.gamma(0.5, size=(4, 16))
    params = {"retention_threshold": 0.95} if strategy != "uniform-count" else {"keep_count": 10}
    params.update(kwargs)
    selection = _select(strategy, contribution, contribution, 2, **params)
    return build_drop_map(
        selection, layers=[0, 1, 2, 3], top_k=2, base_model={"id": "org/model", "revision": "abc"},
        profile_stats_sha256="a" * 64, recipe_sha256="b" * 64, profile_num_tokens=100,
    )


def _config(num_experts=16, top_k=2, layers=4):
    return {"text_config": {"num_experts": num_experts, "top_k_experts": top_k, "num_hidden_layers": layers,
                            "enable_moe_block": True}}


def test_drop_map_round_trips_through_the_schema(tmp_path):
    drop_map = _drop_map()
    path = tmp_path / "expert_drop_metadata.json"
    write_drop_map(path, drop_map)
    assert load_drop_map(path, model_config=_config()) == json.loads(json.dumps(drop_map))
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temporary file


@settings(max_examples=60, deadline=None)
@given(case=selection_case(), threshold=THRESHOLDS, strategy=st.sampled_from(
    ["uniform-min-retention", "per-layer-retention"]))
def test_every_selection_makes_a_schema_valid_drop_map(case, threshold, strategy):
    contribution, scores, top_k, protect = case
    selection = _select(strategy, contribution, scores, top_k, retention_threshold=threshold, protect_top_k=protect)
    layers = list(range(contribution.shape[0]))
    drop_map = build_drop_map(selection, layers=layers, top_k=top_k, base_model={"id": "m"},
                              profile_stats_sha256="a" * 64, recipe_sha256=None)
    config = _config(num_experts=contribution.shape[1], top_k=top_k, layers=len(layers))
    check_drop_map(json.loads(json.dumps(drop_map)), model_config=config)


def test_per_layer_drop_map_is_marked_non_uniform():
    drop_map = _drop_map("per-layer-retention")
    check_drop_map(drop_map)
    assert drop_map["uniform"] is False and drop_map["num_experts_kept"] is None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["layers"][0].update(keep=sorted(d["layers"][0]["keep"] + [d["layers"][0]["drop"][0]])), "both kept and dropped"),
        (lambda d: d["layers"][1].update(drop=d["layers"][1]["drop"][1:]), "neither kept nor dropped"),
        (lambda d: d["layers"][2]["drop"].append(99), "outside"),
        (lambda d: d.update(num_experts_kept=3), "uniform is true"),
        (lambda d: d["layers"][0].update(keep=[0], drop=list(range(1, 16))), "below the model's top-k"),
        (lambda d: d["layers"][3].update(retained_fraction=0.95), "no more than the threshold"),
    ],
)
def test_broken_drop_maps_are_refused(tmp_path, edit, message):
    drop_map = _drop_map()
    edit(drop_map)
    path = tmp_path / "map.json"
    path.write_text(json.dumps(drop_map))
    with pytest.raises(MoepruneError, match=message):
        load_drop_map(path)


def test_schema_rejects_unknown_and_missing_fields(tmp_path):
    drop_map = _drop_map()
    drop_map["strategy"]["name"] = "best-guess"
    del drop_map["hashes"]
    path = tmp_path / "map.json"
    path.write_text(json.dumps(drop_map))
    with pytest.raises(SchemaError, match="drop_map.schema.json") as info:
        load_drop_map(path)
    assert "strategy/name" in str(info.value) and "hashes" in str(info.value)


def test_drop_map_of_another_model_is_refused(tmp_path):
    path = tmp_path / "map.json"
    write_drop_map(path, _drop_map())
    with pytest.raises(DropMapError, match="another model"):
        load_drop_map(path, model_config=_config(num_experts=32))
    with pytest.raises(DropMapError, match="another model"):
        load_drop_map(path, model_config=_config(layers=6))


# --- report ------------------------------------------------------------------------------------


def test_report_prints_every_layer_the_chosen_n_and_the_worst_layer():
    drop_map = _drop_map()
    text = report_text(drop_map)
    n = drop_map["num_experts_kept"]
    assert f"chosen N = {n}" in text
    for entry in drop_map["layers"]:
        assert f"L{entry['layer']} " in text
        assert f"{100 * entry['retained_fraction']:.2f}%" in text
    worst = min(drop_map["layers"], key=lambda e: e["retained_fraction"])
    assert f"worst layer: L{worst['layer']} retains {100 * worst['retained_fraction']:.2f}%" in text


def test_report_for_many_layers_uses_three_column_pairs():
    rng = np.random.default_rng(0)
    contribution = rng.gamma(0.5, size=(30, 16))
    selection = _select("uniform-min-retention", contribution, contribution, 2, retention_threshold=0.9)
    drop_map = build_drop_map(selection, layers=list(range(30)), top_k=2, base_model={"id": "m"},
                              profile_stats_sha256="a" * 64, recipe_sha256=None)
    header = next(line for line in report_text(drop_map).splitlines() if "Layer" in line)
    assert header.count("Layer") == 3 and header.count("Retained %") == 3


def test_report_says_per_layer_is_not_uniform():
    text = report_text(_drop_map("per-layer-retention"))
    assert "NOT uniform" in text


# --- the stage ---------------------------------------------------------------------------------

DOMAINS = ["math", "code"]


def write_stats_fixture(path: Path, contribution: np.ndarray, layers: list[int], seed: int = 0,
                        with_sequence_norm: bool = True) -> None:
    """A profile statistics file in the format of moeprune.profile.stats, written with safetensors.numpy."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    shares = rng.dirichlet(np.ones(len(DOMAINS)), size=contribution.shape).transpose(2, 0, 1)
    groups = {"": contribution}
    groups.update({f"domain/{d}/": contribution * shares[i] for i, d in enumerate(DOMAINS)})
    for prefix, contrib in groups.items():
        counts = np.ceil(contrib).astype(np.int64)
        tensors[prefix + "contribution_sum"] = contrib
        tensors[prefix + "routed_count"] = counts
        tensors[prefix + "reap_mean"] = np.divide(contrib, counts, out=np.zeros_like(contrib), where=counts > 0)
        tensors[prefix + "router_prob_sum"] = contrib / 10
        if with_sequence_norm:
            tensors[prefix + "sequence_norm_sum"] = np.sqrt(contrib * (1 + np.arange(contrib.shape[1])))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={
        "layers": json.dumps(layers), "domains": json.dumps(DOMAINS), "model_sha256": "c" * 64, "num_tokens": "640",
    })


def _recipe(tmp_path: Path, config: dict, **dropmap):
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    data = {
        "name": "unit",
        "model": {"base": str(model_dir), "name": "unit model"},
        "calibration": {"prompts": "p.jsonl", "domains": DOMAINS, "prompts_per_domain": 1, "max_new_tokens": 4},
        "dropmap": {"strategy": "uniform-min-retention", "retention_threshold": 0.95} | dropmap,
        "prune": {"max_shard_bytes": 4096},
        "serve": {"ctx_size": 256},
        "eval": {"tasks": ["demo_mcq"], "max_gen_toks": 8},
    }
    return parse_recipe(data, source_path=tmp_path / "recipe.toml")


def test_run_dropmap_writes_a_valid_map_and_prints_the_report(tmp_path):
    from rich.console import Console

    from moeprune.dropmap.stage import run_dropmap

    layout = RunLayout(tmp_path / "runs" / "unit")
    contribution = np.random.default_rng(1).gamma(0.5, size=(4, 16)) * 100
    write_stats_fixture(layout.profile_stats_path, contribution, [0, 1, 2, 3])
    console = Console(record=True, width=120)
    drop_map = run_dropmap(_recipe(tmp_path, _config()), layout, console=console)
    assert load_drop_map(layout.drop_map_path, model_config=_config()) == drop_map
    # The recipe lies beside the model: recorded relative to it, never as an absolute path.
    assert drop_map["base_model"] == {"id": "recipe/model", "revision": None, "sha256": "c" * 64}
    assert min(e["retained_fraction"] for e in drop_map["layers"]) > 0.95
    assert f"chosen N = {drop_map['num_experts_kept']}" in console.export_text()


def test_sequence_norm_sum_criterion_ranks_and_thresholds_on_its_own_statistic(tmp_path):
    """The seed's rule: rank by sequence_norm_sum and keep the fewest experts retaining > threshold of it."""
    from moeprune.dropmap.stage import run_dropmap
    from moeprune.profile.stats import load_stats

    layout = RunLayout(tmp_path / "runs" / "unit")
    contribution = np.random.default_rng(1).gamma(0.5, size=(4, 16)) * 100
    write_stats_fixture(layout.profile_stats_path, contribution, [0, 1, 2, 3])
    drop_map = run_dropmap(_recipe(tmp_path, _config(), criterion="sequence-norm-sum"), layout)
    assert drop_map["strategy"]["criterion"] == "sequence-norm-sum"
    assert drop_map["summary"]["retention_measure"] == "sequence_norm_sum"
    sequence_norm = load_stats(layout.profile_stats_path).totals["sequence_norm_sum"]
    for row, entry in enumerate(drop_map["layers"]):
        assert entry["keep"] == sorted(rank_experts(sequence_norm)[row][: len(entry["keep"])].tolist())
        assert entry["retained_fraction"] == pytest.approx(sequence_norm[row, entry["keep"]].sum() / sequence_norm[row].sum())
        assert entry["retained_fraction"] > 0.95
    # The smallest such N: one expert fewer fails the threshold in some layer.
    n = drop_map["num_experts_kept"]
    order = rank_experts(sequence_norm)
    short = [sequence_norm[r, order[r, : n - 1]].sum() / sequence_norm[r].sum() for r in range(4)]
    assert min(short) <= 0.95
    per_token = run_dropmap(_recipe(tmp_path, _config()), layout)
    assert per_token["summary"]["retention_measure"] == "contribution_sum"
    assert [e["keep"] for e in per_token["layers"]] != [e["keep"] for e in drop_map["layers"]]


def test_profile_without_sequence_norm_sum_loads_but_the_seed_criterion_asks_for_a_new_one(tmp_path):
    from moeprune.dropmap.stage import run_dropmap

    layout = RunLayout(tmp_path / "runs" / "unit")
    write_stats_fixture(layout.profile_stats_path, np.random.default_rng(1).gamma(0.5, size=(4, 16)) * 100,
                        [0, 1, 2, 3], with_sequence_norm=False)
    assert run_dropmap(_recipe(tmp_path, _config()), layout)["num_experts_kept"] >= 2
    with pytest.raises(DropMapError, match="sequence_norm_sum.*rerun `invoke profile`"):
        run_dropmap(_recipe(tmp_path, _config(), criterion="sequence-norm-sum"), layout)


def test_run_dropmap_refuses_a_profile_of_another_model(tmp_path):
    from moeprune.dropmap.stage import run_dropmap

    layout = RunLayout(tmp_path / "runs" / "unit")
    write_stats_fixture(layout.profile_stats_path, np.ones((4, 16)), [0, 1, 2, 3])
    with pytest.raises(DropMapError, match="16 experts per layer but the model .* has 32"):
        run_dropmap(_recipe(tmp_path, _config(num_experts=32)), layout)
    with pytest.raises(DropMapError, match="another model"):
        run_dropmap(_recipe(tmp_path, _config(layers=6)), layout)
    assert not layout.drop_map_path.exists()


def test_dropmap_task_runs_from_the_command_line(tmp_path):
    """`invoke dropmap` with overrides, as a user runs it; bad overrides exit 1 with the message."""
    recipe_path = tmp_path / "recipe.toml"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(_config()))
    (tmp_path / "p.jsonl").write_text('{"id": "m-1", "domain": "math", "prompt": "1+1"}\n')
    recipe_path.write_text(
        'name = "cli"\n[model]\nbase = "model"\nname = "m"\n'
        '[calibration]\nprompts = "p.jsonl"\ndomains = ["math", "code"]\nprompts_per_domain = 1\nmax_new_tokens = 4\n'
        '[dropmap]\nstrategy = "uniform-min-retention"\nretention_threshold = 0.95\n'
        '[prune]\nmax_shard_bytes = 4096\n[serve]\nctx_size = 256\n[eval]\ntasks = ["x"]\nmax_gen_toks = 8\n'
    )
    runs = tmp_path / "runs"
    write_stats_fixture(runs / "cli" / "profile" / "stats.safetensors", np.random.default_rng(2).gamma(0.5, size=(4, 16)),
                        [0, 1, 2, 3])
    env = {"MOEPRUNE_RUNS_DIR": str(runs), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    dropmap = ("--search-root", str(ROOT), "dropmap", "--recipe", str(recipe_path))
    done = invoke(*dropmap, "--strategy", "uniform-count", "--keep-count", "6", "--criterion", "reap-mean",
                  env=env, inherit_env=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "chosen N = 6" in done.stdout
    drop_map = load_drop_map(runs / "cli" / "expert_drop_metadata.json")
    assert drop_map["strategy"]["criterion"] == "reap-mean" and drop_map["num_experts_kept"] == 6
    bad = invoke(*dropmap, "--threshold", "1.5", env=env, inherit_env=False, cwd=tmp_path)
    assert bad.returncode == 1 and "retention_threshold" in bad.stderr and "(0, 1]" in bad.stderr
    low = invoke(*dropmap, "--strategy", "uniform-count", "--keep-count", "1", env=env, inherit_env=False, cwd=tmp_path)
    assert low.returncode == 1 and "top-k" in low.stderr


# --- in-memory pruning (tiny random Gemma 4 MoE) -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    import torch

    model = tiny_gemma4_model(vocab_size=128)
    with torch.no_grad():  # distinct per-expert scales so a mis-sliced scale changes the output
        for module in model.modules():
            if hasattr(module, "per_expert_scale"):
                module.per_expert_scale.copy_(torch.linspace(0.5, 1.5, 16))
    return model


def test_in_memory_pruning_equals_masking_the_dropped_experts(tiny_model):
    import torch

    from moeprune.demo.criteria import moe_decoder_layers, prune_experts_in_memory

    rng = np.random.default_rng(0)
    keep = {layer: sorted(rng.choice(16, size=10, replace=False).tolist()) for layer in range(4)}
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    masked = copy.deepcopy(tiny_model)
    for index, layer in moe_decoder_layers(masked).items():
        dropped = torch.tensor(sorted(set(range(16)) - set(keep[index])))

        def mask_dropped(_module, _inputs, output, dropped=dropped):
            output = output.clone()
            output[..., dropped] = float("-inf")  # router can never pick a dropped expert
            return output

        layer.router.proj.register_forward_hook(mask_dropped)
    pruned = copy.deepcopy(tiny_model)
    prune_experts_in_memory(pruned, keep)

    with torch.no_grad():
        expected = masked(input_ids=ids).logits
        got = pruned(input_ids=ids).logits
        full = tiny_model(input_ids=ids).logits
    assert pruned.config.text_config.num_experts == 10
    assert all(layer.experts.gate_up_proj.shape[0] == 10 for layer in moe_decoder_layers(pruned).values())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, full, atol=1e-4)  # pruning did change the model


def test_compare_criteria_writes_table_and_plot(tiny_model, tmp_path):
    from moeprune.demo.criteria import HeldoutExample, compare_criteria, greedy_accuracy, write_criteria_docs

    class ByteTokenizer:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [min(b, 127) for b in text.encode()]}

        def decode(self, ids, skip_special_tokens=True):
            return bytes(int(i) for i in ids).decode(errors="replace")

    rng = np.random.default_rng(0)
    contribution = rng.gamma(0.5, size=(4, 16))
    counts = rng.integers(1, 40, size=(4, 16))
    totals = {"contribution_sum": contribution, "routed_count": counts, "reap_mean": contribution / counts,
              "sequence_norm_sum": np.sqrt(contribution)}
    per_domain = {d: {"contribution_sum": rng.gamma(0.5, size=(4, 16))} for d in DOMAINS}
    examples = [HeldoutExample("Q: 12 or 40? ", "The answer is (B).", "B"), HeldoutExample("Say hi: ", "hi there")]
    tokenizer = ByteTokenizer()
    result = compare_criteria(
        tiny_model, tokenizer, totals, per_domain, [0, 1, 2, 3], examples, random_seeds=(0, 1),
        accuracy_fn=lambda model: greedy_accuracy(model, tokenizer, examples, max_new_tokens=3),
        log=lambda _line: None,
    )
    keep_counts = sorted({row["keep_count"] for row in result["rows"]})
    assert keep_counts == [8, 10, 12]
    assert len(result["rows"]) == 3 * (5 + 2)  # five criteria + two random seeds per keep count
    assert tiny_model.config.text_config.num_experts == 16  # the original model is untouched
    assert all(row["answered"] == 1 for row in result["rows"])  # one example has an answer letter
    result["source"] = {"model": "tiny", "profile": "fixture", "heldout": "inline", "max_new_tokens": 3}
    paths = write_criteria_docs(result, tmp_path / "docs")
    markdown = paths["markdown"].read_text()
    assert "## Keep 12 of 16 experts (75%)" in markdown and "## Keep 8 of 16 experts (50%)" in markdown
    assert "## Keep 10 of 16 experts (62%)" in markdown
    assert "Criteria and recovery" not in markdown  # no recalibration measured, no recovery table
    assert result["baseline"]["kld"] == pytest.approx(0.0, abs=1e-12)  # the unpruned model against itself
    assert result["baseline"]["top1_agreement"] == 1.0
    for row in result["rows"]:
        assert row["kld"] > 0 and 0 <= row["top1_agreement"] <= 1 and row["tokens"] == row["target_tokens"]
        if row["criterion"] != "random":
            assert f"`{row['criterion']}` | {row['kld']:.4f} ± {row['kld_stderr']:.4f} |" in markdown
    assert "Lowest KL divergence at 12 experts" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["json"].read_text())["baseline"]["loss"] == pytest.approx(result["baseline"]["loss"])


def test_compare_criteria_measures_each_pruned_copy_again_with_the_recalibrated_router(tiny_model, tmp_path):
    """The recovery table: every row is measured a second time with what ``recalibrate_fn``
    returns for its kept experts (here: per-expert scales halved for the first kept expert)."""
    import torch

    from moeprune.demo.criteria import HeldoutExample, compare_criteria, recovery_markdown

    class ByteTokenizer:
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [min(b, 127) for b in text.encode()]}

    rng = np.random.default_rng(1)
    contribution = rng.gamma(0.5, size=(4, 16))
    totals = {"contribution_sum": contribution, "routed_count": rng.integers(1, 40, size=(4, 16)),
              "reap_mean": contribution, "sequence_norm_sum": np.sqrt(contribution)}
    per_domain = {d: {"contribution_sum": rng.gamma(0.5, size=(4, 16))} for d in DOMAINS}
    examples = [HeldoutExample("Q: 12 or 40? ", "The answer is (B)."), HeldoutExample("Say hi: ", "hi there friend")]
    calls = []
    original = tiny_model.model.language_model.layers[0].router.per_expert_scale.detach().clone()

    def recalibrate_fn(keep_by_layer):
        calls.append(keep_by_layer)
        values = {}
        for layer, keep in keep_by_layer.items():
            scale = tiny_model.model.language_model.layers[layer].router.per_expert_scale.detach()[keep].clone()
            scale[0] *= 0.5
            values[f"model.language_model.layers.{layer}.router.per_expert_scale"] = scale
        return values

    result = compare_criteria(tiny_model, ByteTokenizer(), totals, per_domain, [0, 1, 2, 3], examples,
                              keep_fractions=(0.5,), criteria=("contribution-sum", "frequency"),
                              recalibrate_fn=recalibrate_fn, log=lambda _line: None)
    assert len(calls) == len(result["rows"]) == 2
    assert all(sorted(keep) == keep and len(keep) == 8 for call in calls for keep in call.values())
    assert torch.equal(tiny_model.model.language_model.layers[0].router.per_expert_scale, original)
    assert tiny_model.config.text_config.num_experts == 16  # the original model is untouched
    for row in result["rows"]:
        after = row["recalibrated"]
        assert after["kld"] > 0 and after["kld"] != row["kld"] and after["target_tokens"] == row["target_tokens"]
    result["source"] = {"recalibrate": {"settings": {"max_steps": 1}, "sequences": "fixture"}}
    lines = "\n".join(recovery_markdown(result))
    assert "## Criteria and recovery" in lines
    for row in result["rows"]:
        after = row["recalibrated"]
        assert (f"| 8/16 | `{row['criterion']}` | {row['kld']:.4f} ± {row['kld_stderr']:.4f} | "
                f"{after['kld']:.4f} ± {after['kld_stderr']:.4f} | {after['kld'] / row['kld']:.3f} |") in lines


@pytest.mark.slow
def test_compare_criteria_task_on_a_random_demo_model(tmp_path):
    """`invoke compare-criteria` end to end: demo tokenizer and chat template, untrained weights."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    from moeprune.demo import data
    from moeprune.demo.build import make_config, write_heldout_dataset
    from moeprune.demo.tokenizer import chat_template_text, save_tokenizer, train_tokenizer

    model_dir = tmp_path / "model"
    tokenizer = train_tokenizer(data.tokenizer_corpus(0, num_mcq=200, num_general=200))
    save_tokenizer(tokenizer, model_dir, chat_template_text())
    torch.manual_seed(0)
    config = make_config(tokenizer.get_vocab())
    Gemma4ForConditionalGeneration(config).save_pretrained(model_dir)
    num_layers = config.text_config.num_hidden_layers
    write_heldout_dataset(tmp_path / "tasks" / "demo_mcq" / "demo_mcq.jsonl", data.heldout_mcqs(4, 0))
    demo = (ROOT / "recipes" / "demo.toml").read_text()
    recipe_path = tmp_path / "recipe.toml"
    recipe_path.write_text(demo.replace("../src/moeprune/demo/model", "model")
                           .replace("../src/moeprune/demo/tasks", "tasks"))
    runs = tmp_path / "runs"
    write_stats_fixture(runs / "demo" / "profile" / "stats.safetensors",
                        np.random.default_rng(4).gamma(0.5, size=(num_layers, 16)), list(range(num_layers)))
    env = {"MOEPRUNE_RUNS_DIR": str(runs), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)}
    done = invoke("--search-root", str(ROOT), "compare-criteria", "--recipe", str(recipe_path),
                  "--docs-dir", str(tmp_path / "docs"), "--no-accuracy", "--no-recalibrate", env=env, inherit_env=False,
                  cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "docs" / "criteria.json").read_text())
    assert result["examples"] == 4 and result["num_experts"] == 16
    assert {row["keep_count"] for row in result["rows"]} == {12, 10, 8}
    assert all("recalibrated" not in row for row in result["rows"])
    assert {row["criterion"] for row in result["rows"]} == {"contribution-sum", "sequence-norm-sum", "reap-mean",
                                                            "frequency", "domain-max", "random"}
    assert "Lowest held-out loss at 12 experts" in (tmp_path / "docs" / "criteria.md").read_text()


def test_agreement_with_base_is_kl_divergence_and_top1_share():
    from moeprune.demo.criteria import agreement_with_base

    base = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    other = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]))
    same = agreement_with_base(base, base)
    assert same["kld"] == 0.0 and same["top1_agreement"] == 1.0 and same["tokens"] == 3
    got = agreement_with_base(base, other)
    per_token = [sum(p * (np.log(p) - np.log(q)) for p, q in zip(pb, pq))
                 for pb, pq in zip(np.exp(base), np.exp(other))]
    assert got["kld"] == pytest.approx(np.mean(per_token))
    assert got["kld_stderr"] == pytest.approx(np.std(per_token, ddof=1) / np.sqrt(3))
    assert got["top1_agreement"] == pytest.approx(2 / 3)  # token 2's top choice moved from 0 to 1
    with pytest.raises(DropMapError, match="do not pair up"):
        agreement_with_base(base, other[:2])
