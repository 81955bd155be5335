"""The recipe: strict loading, clear errors, schema in sync with the typed model."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from moeprune.errors import RecipeError
from moeprune.recipe import Recipe, load_recipe, recipe_json_schema

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.toml"
REFERENCE = ROOT / "recipes" / "gemma-4-26b-a4b-109e.toml"


def _absolute(data: dict) -> None:
    """Rewrite the demo recipe's relative paths as absolute ones, so a copy works anywhere."""
    recipes = ROOT / "recipes"
    data["model"]["base"] = str((recipes / data["model"]["base"]).resolve())
    data["calibration"]["prompts"] = str((recipes / data["calibration"]["prompts"]).resolve())
    data["eval"]["include_path"] = str((recipes / data["eval"]["include_path"]).resolve())
    data["kld"]["text"] = str((recipes / data["kld"]["text"]).resolve())


def _dump_toml(data: dict, prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{key} = {json.dumps(value)}" for key, value in scalars.items()]
    for key, value in tables.items():
        lines.append(_dump_toml(value, f"{prefix}.{key}" if prefix else key))
    return "\n".join(lines) + "\n"


@pytest.fixture
def variant(tmp_path):
    """Write the demo recipe with one edit into tmp_path; return the file."""

    def make(edit) -> Path:
        data = tomllib.loads(DEMO.read_text())
        _absolute(data)
        edit(data)
        target = tmp_path / "variant.toml"
        target.write_text(_dump_toml(data))
        return target

    return make


def test_both_recipes_parse():
    demo = load_recipe(DEMO, check_inputs=False)
    reference = load_recipe(REFERENCE, check_inputs=False)
    assert demo.name == "demo"
    assert reference.model.base == "google/gemma-4-26B-A4B-it"


def test_reference_recipe_has_the_card_settings():
    r = load_recipe(REFERENCE, check_inputs=False)
    assert r.calibration.prompts_per_domain * len(r.calibration.domains) == 40
    assert sorted(r.calibration.domains) == ["code", "creative", "logic", "math", "science"]
    assert r.calibration.max_new_tokens == 128 and r.calibration.enable_thinking
    assert r.dropmap.strategy == "uniform-min-retention" and r.dropmap.retention_threshold == 0.99
    assert r.quantize.eval_type == "Q4_K_M"
    assert (r.serve.ctx_size, r.serve.reasoning_format, r.serve.reasoning_budget) == (32768, "deepseek", 8192)
    assert r.serve.n_gpu_layers == 99
    assert (r.eval.max_gen_toks, r.eval.temperature) == (16384, 0.0)
    assert r.eval.tasks == ["gpqa_diamond_cot_zeroshot"]
    assert 4.5e9 <= r.prune.max_shard_bytes <= 5.5e9
    assert r.model.revision is not None


def test_relative_paths_resolve_against_the_recipe_file():
    r = load_recipe(DEMO, check_inputs=False)
    assert r.prompts_path == (ROOT / "calibration" / "demo.jsonl").resolve()


def test_unknown_field_is_named(variant):
    path = variant(lambda d: d["dropmap"].update(treshold=0.9))
    with pytest.raises(RecipeError, match=r"unknown field 'dropmap.treshold'"):
        load_recipe(path, check_inputs=False)


def test_wrong_type_names_field_and_value(variant):
    path = variant(lambda d: d["calibration"].update(max_new_tokens="many"))
    with pytest.raises(RecipeError, match=r"calibration.max_new_tokens' = \"many\""):
        load_recipe(path, check_inputs=False)


def test_threshold_out_of_range_says_what_is_allowed(variant):
    path = variant(lambda d: d["dropmap"].update(retention_threshold=1.5))
    with pytest.raises(RecipeError, match=r"retention_threshold' = 1.5: must be in \(0, 1\]"):
        load_recipe(path, check_inputs=False)


def test_missing_prompts_file_is_named(variant):
    path = variant(lambda d: d["calibration"].update(prompts=str(ROOT / "calibration/nope.jsonl")))
    with pytest.raises(RecipeError, match=r"calibration.prompts.*nope.jsonl.*not found"):
        load_recipe(path)


def test_keep_count_below_top_k_is_refused(variant):
    def edit(d):
        d["dropmap"] = {"strategy": "uniform-count", "keep_count": 1}

    from moeprune.preflight import PreflightError, require_preflight

    recipe = load_recipe(variant(edit))
    with pytest.raises(PreflightError, match=r"dropmap.keep_count' = 1: below the model's top-k"):
        require_preflight(recipe, ["dropmap"])


@pytest.mark.parametrize(("dropmap", "needle"), [
    ({"strategy": "uniform-count", "keep_count": 17}, "dropmap.keep_count' = 17: above the model's 16 experts"),
    ({"strategy": "uniform-min-retention", "retention_threshold": 0.9, "protect_top_k": 20},
     "dropmap.protect_top_k' = 20: above the model's 16 experts"),
    ({"strategy": "uniform-count", "keep_count": 8, "protect": [[0, 3], [1, 16]]},
     r"dropmap.protect' = \[1, 16\]: expert 16 is outside \[0, 16\)"),
])
def test_counts_above_the_experts_are_refused_before_the_profile(variant, dropmap, needle):
    from moeprune.preflight import PreflightError, require_preflight

    recipe = load_recipe(variant(lambda d: d.update(dropmap=dropmap)))
    with pytest.raises(PreflightError, match=needle):
        require_preflight(recipe, ["profile", "dropmap"])


def test_strategy_needs_its_parameter(variant):
    path = variant(lambda d: d.update(dropmap={"strategy": "uniform-count"}))
    with pytest.raises(RecipeError, match="needs keep_count"):
        load_recipe(path, check_inputs=False)


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.toml")


def test_invalid_toml_is_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(RecipeError, match="bad.toml: not valid TOML"):
        load_recipe(bad)


def test_committed_schema_matches_the_model():
    committed = json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    assert committed == recipe_json_schema(), "run `invoke schema` and commit schemas/recipe.schema.json"


def test_recipes_validate_against_the_schema():
    import jsonschema

    schema = recipe_json_schema()
    for path in (DEMO, REFERENCE):
        jsonschema.validate(tomllib.loads(path.read_text()), schema)


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            if name == "source_path":
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, Recipe.__mro__[1]):
                walk(annotation)
            elif name not in {"model", "calibration", "profile", "dropmap", "prune", "llamacpp",
                              "quantize", "serve", "eval", "card", "publish", "runner"}:
                assert field.description, f"{model.__name__}.{name} has no description"

    walk(Recipe)


def test_concurrency_must_match_the_server_slots(variant):
    path = variant(lambda d: d["eval"].update(num_concurrent=4))
    with pytest.raises(RecipeError, match=r"eval.num_concurrent = 4 must equal serve.parallel = 1"):
        load_recipe(path, check_inputs=False)
    path = variant(lambda d: (d["eval"].update(num_concurrent=4), d["serve"].update(parallel=4)))
    assert load_recipe(path, check_inputs=False).serve.kv_unified


def test_split_kv_cache_is_held_to_the_one_slot_rule(variant):
    """The slot rule has one definition (preflight's: a prompt plus eval.max_gen_toks per slot), not
    a weaker second one at load time: the recipe loads, and the check names what is missing."""
    from moeprune.preflight import PROMPT_RESERVE_TOKENS, preflight

    path = variant(lambda d: (d["eval"].update(num_concurrent=32), d["serve"].update(parallel=32, kv_unified=False)))
    errors = preflight(load_recipe(path, check_inputs=False), ["eval"]).errors
    assert any(f"gives each slot 64 tokens, fewer than eval.max_gen_toks = 128 plus {PROMPT_RESERVE_TOKENS}" in e
               for e in errors), errors
    # Slots that hold the generation budget but not a prompt: the same rule refuses them.
    path = variant(lambda d: (d["eval"].update(num_concurrent=4), d["serve"].update(parallel=4, kv_unified=False)))
    errors = preflight(load_recipe(path, check_inputs=False), ["eval"]).errors
    assert any("gives each slot 512 tokens" in e for e in errors), errors


def test_kld_needs_a_held_out_text(variant):
    path = variant(lambda d: d["kld"].pop("text"))
    with pytest.raises(RecipeError, match=r"kld.enabled needs kld.text"):
        load_recipe(path, check_inputs=False)
    path = variant(lambda d: d["kld"].update(text=str(ROOT / "nope.txt")))
    with pytest.raises(RecipeError, match=r"field 'kld.text'.*nope.txt.*file not found"):
        load_recipe(path)


def test_reference_recipe_stays_serial():
    recipe = load_recipe(REFERENCE, check_inputs=False)
    assert recipe.serve.parallel == 1 and recipe.eval.num_concurrent == 1


# --- paths are not parameters (issue 22, item 7) ------------------------------------------------
def test_settings_record_paths_relative_whether_written_relative_or_absolute(tmp_path: Path):
    data = tomllib.loads(DEMO.read_text())
    _absolute(data)
    elsewhere = tmp_path / "elsewhere" / "demo.toml"
    elsewhere.parent.mkdir()
    elsewhere.write_text(_dump_toml(data))
    relative, absolute = load_recipe(DEMO), load_recipe(elsewhere)
    assert absolute.model.base.startswith("/") and absolute.calibration.prompts.startswith("/")
    assert absolute.settings() == relative.settings()
    recorded = relative.settings()
    assert recorded["model"]["base"] == "checkout/src/moeprune/demo/model"
    assert recorded["calibration"]["prompts"] == "checkout/calibration/demo.jsonl"
    assert recorded["eval"]["include_path"] == "checkout/src/moeprune/demo/tasks"
    assert recorded["kld"]["text"] == "checkout/src/moeprune/demo/kld_heldout.txt"
    text = json.dumps(recorded)
    assert str(ROOT) not in text and str(tmp_path) not in text and str(Path.home()) not in text


def test_a_file_outside_the_checkout_is_recorded_beside_the_recipe_or_by_name(tmp_path: Path):
    from moeprune.base_model import is_hub_id

    data = tomllib.loads(DEMO.read_text())
    _absolute(data)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.jsonl").write_text((ROOT / "calibration" / "demo.jsonl").read_text())
    data["calibration"]["prompts"] = "data/mine.jsonl"
    data["kld"]["text"] = str(ROOT.parent / "nowhere" / "held.txt")
    path = tmp_path / "r.toml"
    path.write_text(_dump_toml(data))
    recorded = load_recipe(path, check_inputs=False).settings()
    assert recorded["calibration"]["prompts"] == "recipe/data/mine.jsonl"
    assert recorded["kld"]["text"] == "external/held.txt"
    assert not any(is_hub_id(recorded[s][k]) for s, k in (("calibration", "prompts"), ("kld", "text")))
    assert not is_hub_id(recorded["model"]["base"])


def test_a_hub_base_is_recorded_as_its_id():
    from moeprune.base_model import is_hub_id

    recorded = load_recipe(REFERENCE, check_inputs=False).settings()
    assert recorded["model"]["base"] == "google/gemma-4-26B-A4B-it" and is_hub_id(recorded["model"]["base"])


def test_every_stage_gets_the_same_parameters_from_relative_and_absolute_paths(tmp_path: Path):
    from moeprune.pipeline.stages import build_pipeline

    data = tomllib.loads(DEMO.read_text())
    _absolute(data)
    path = tmp_path / "demo.toml"
    path.write_text(_dump_toml(data))
    relative, absolute = load_recipe(DEMO), load_recipe(path)
    for stage in build_pipeline().stages:
        assert stage.params(absolute) == stage.params(relative), stage.name
        assert str(ROOT) not in json.dumps(stage.params(absolute)), stage.name
