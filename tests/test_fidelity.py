"""The seed-faithful reference recipe, the per-token recipe, and docs/fidelity.md agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from moeprune.eval.failure import EvalError
from moeprune.eval.records import seeds_of
from moeprune.eval.tasks import check_lm_eval_version
from moeprune.llamacpp.server import server_flags
from moeprune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SEED_RECIPE = ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml"
PER_TOKEN_RECIPE = ROOT / "recipes" / "gemma-4-26b-a4b-109e-per-token.toml"
FIDELITY = ROOT / "docs" / "fidelity.md"


def _get(recipe, dotted: str):
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def test_reference_recipe_holds_the_seeds_settings():
    r = load_recipe(SEED_RECIPE, check_inputs=False)
    assert (r.dropmap.criterion, r.dropmap.strategy, r.dropmap.retention_threshold) == (
        "sequence-norm-sum", "uniform-min-retention", 0.99)
    assert r.model.dtype == "float16" and r.calibration.batch_size == 1
    assert r.quantize.convert_outtype == "f16" and r.quantize.eval_type == "Q4_K_M"
    assert seeds_of(r) == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234,
                           "fewshot_random_seed": 1234}
    assert r.eval.lm_eval_version == "0.4.11"
    flags = server_flags(r.serve)
    assert flags[flags.index("--dry-multiplier") + 1] == "0.5"


def test_per_token_recipe_keeps_todays_method():
    r = load_recipe(PER_TOKEN_RECIPE, check_inputs=False)
    assert r.name != load_recipe(SEED_RECIPE, check_inputs=False).name
    assert r.dropmap.criterion == "contribution-sum" and r.model.dtype == "bfloat16"
    assert r.calibration.batch_size == 8 and r.quantize.convert_outtype == "bf16"
    assert set(seeds_of(r).values()) == {1234} and r.eval.lm_eval_version is None
    assert "--dry-multiplier" not in server_flags(r.serve)


def test_fidelity_doc_states_the_recipes_values():
    """Every `field = value` in docs/fidelity.md is the reference recipe's value."""
    recipe = load_recipe(SEED_RECIPE, check_inputs=False)
    pairs = re.findall(r"`([a-z_]+\.[a-z_]+) = ([^`]+)`", FIDELITY.read_text())
    assert len(pairs) >= 20
    for field, shown in pairs:
        assert _get(recipe, field) == tomllib.loads(f"v = {shown}")["v"], field


def test_every_setting_row_is_equal_or_explained():
    rows = [line for line in FIDELITY.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Setting") and not line.startswith("|---")]
    assert len(rows) >= 25
    for row in rows:
        status = row.strip("|").split("|")[-1].strip()
        assert status.startswith(("equal", "explained", "count equal")), row
        if status.startswith("explained"):
            assert len(status) > len("explained: ") + 20, row


def test_wrong_lm_eval_version_is_refused_before_any_server():
    import lm_eval

    r = load_recipe(SEED_RECIPE, check_inputs=False)
    if lm_eval.__version__ == "0.4.11":
        check_lm_eval_version(r)
        return
    with pytest.raises(EvalError, match=r"lm_eval_version = '0.4.11' but lm-eval .*`pip install 'lm-eval\[api\]==0.4.11'`"):
        check_lm_eval_version(r)
    # run_eval checks it first: no task index, no dataset, no server.
    from moeprune.eval.run import run_eval
    from moeprune.layout import RunLayout

    def no_server(*_args):
        raise AssertionError("a server was started")

    with pytest.raises(EvalError, match="lm_eval_version"):
        run_eval(r, RunLayout(Path("/nonexistent/run")), server_factory=no_server)


@pytest.mark.parametrize(("criterion", "statistic"), [("sequence-norm-sum", "sequence_norm_sum"),
                                                      ("contribution-sum", "contribution_sum")])
def test_card_and_gguf_card_say_which_statistic_the_run_used(tmp_path, criterion, statistic):
    import json

    from fakerun import make_fake_run

    run = make_fake_run(tmp_path / "work", with_manifest=False, criterion=criterion)
    drop_map = json.loads(run.layout.drop_map_path.read_text())
    assert drop_map["summary"]["retention_measure"] == statistic
    card = (run.layout.card_dir / "README.md").read_text()
    assert f"Statistic: `{statistic}`" in card and "float64" in card and "bf16 overflow" in card
    other = {"sequence_norm_sum": "contribution_sum", "contribution_sum": "sequence_norm_sum"}[statistic]
    assert f"Statistic: `{other}`" not in card
    gguf_cards = [p for p in run.layout.card_dir.rglob("README.md") if p.parent != run.layout.card_dir]
    assert gguf_cards and all(f"`{statistic}`" in p.read_text() for p in gguf_cards)


# --- choice order: a private datasets cache and a fingerprint per question ----------------------
SHUFFLING_UTILS = '''
import random


def process_docs(dataset):
    def shuffle(doc):
        choices = [doc["a"], doc["b"], doc["c"], doc["d"]]
        random.shuffle(choices)
        return {"choice1": choices[0], "choice2": choices[1], "choice3": choices[2], "choice4": choices[3]}

    return dataset.map(shuffle)
'''


def _shuffling_task(tmp_path: Path) -> Path:
    """A local task that shuffles its choices inside dataset.map, as lm-eval's gpqa does."""
    import json

    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    rows = [{"q": f"question {i}", "a": f"a{i}", "b": f"b{i}", "c": f"c{i}", "d": f"d{i}"} for i in range(12)]
    (task_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (task_dir / "utils.py").write_text(SHUFFLING_UTILS)
    (task_dir / "shuffled_mcq.yaml").write_text(
        "task: shuffled_mcq\ndataset_path: json\ndataset_kwargs:\n"
        f"  data_files:\n    train: {task_dir / 'data.jsonl'}\n"
        "output_type: generate_until\ntest_split: train\nprocess_docs: !function utils.process_docs\n"
        "doc_to_text: \"{{q}} (A) {{choice1}} (B) {{choice2}} (C) {{choice3}} (D) {{choice4}}\"\n"
        "doc_to_target: \"(A)\"\nmetric_list:\n  - metric: exact_match\n")
    return task_dir


def _orders(task_dir: Path, seed: int, cache: Path | None) -> list[tuple[str, ...]]:
    import random

    import datasets
    from lm_eval.tasks import TaskManager

    from moeprune.eval.tasks import load_tasks, private_datasets_cache

    random.seed(seed)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    if cache is None:
        with private_datasets_cache(task_dir.parent / f"private-{seed}") as directory:
            assert Path(datasets.config.HF_DATASETS_CACHE) == directory
            docs = load_tasks(manager, ["shuffled_mcq"])["shuffled_mcq"].eval_docs
            orders = [tuple(doc[f"choice{i}"] for i in range(1, 5)) for doc in docs]
        assert not directory.exists()
        return orders
    saved = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = cache
    try:
        docs = load_tasks(manager, ["shuffled_mcq"])["shuffled_mcq"].eval_docs
        return [tuple(doc[f"choice{i}"] for i in range(1, 5)) for doc in docs]
    finally:
        datasets.config.HF_DATASETS_CACHE = saved


def test_a_warm_shared_cache_keeps_an_old_order_and_a_private_one_does_not(tmp_path):
    import datasets

    task_dir = _shuffling_task(tmp_path)
    before = datasets.config.HF_DATASETS_CACHE
    shared = tmp_path / "shared-cache"
    first = _orders(task_dir, 0, shared)
    stale = _orders(task_dir, 1, shared)  # another seed, same warm cache
    assert stale == first  # the bug: the seed is ignored
    private_0, private_1 = _orders(task_dir, 0, None), _orders(task_dir, 1, None)
    assert private_0 == first and private_1 != private_0  # each eval shuffles with its own seed
    assert datasets.config.HF_DATASETS_CACHE == before


def test_choice_order_fingerprint_per_question():
    from moeprune.eval.results import choice_order

    def record(doc_id, choices, target="(A)"):
        doc = {"Question": f"q{doc_id}"} | {f"choice{i + 1}": c for i, c in enumerate(choices)}
        return {"doc_id": doc_id, "filter": "flexible-extract", "doc": doc, "target": target}

    log = [record(0, ["w", "x", "y", "z"]), record(1, ["p", "q", "r", "s"])]
    swapped = [record(0, ["x", "w", "y", "z"], "(B)"), record(1, ["p", "q", "r", "s"])]
    a, b = choice_order(log, "flexible-extract"), choice_order(swapped, "flexible-extract")
    assert a["source"] == "doc.choiceN" and set(a["per_question"]) == {"0", "1"}
    assert a["per_question"]["1"] == b["per_question"]["1"] and a["per_question"]["0"] != b["per_question"]["0"]
    assert a["sha256"] != b["sha256"] and a == choice_order(list(log), "flexible-extract")
