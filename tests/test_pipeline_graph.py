"""The stage graph: caching, invalidation, resumption, atomic lock entries (toy stages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moeprune.errors import MoepruneError
from moeprune.layout import RunLayout
from moeprune.pipeline.graph import Context, Pipeline, Stage
from moeprune.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


class Boom(Exception):
    pass


def toy_pipeline(calls: list[str], fail_in: set[str] | None = None) -> Pipeline:
    """a: writes a.txt from the threshold; b: copies a.txt upper-cased; c: counts b's bytes."""
    fail_in = fail_in if fail_in is not None else set()

    def act(name, fn):
        def action(ctx: Context):
            calls.append(name)
            if name in fail_in:
                # write a partial temporary output first, as a killed stage would
                (ctx.layout.root / f".{name}.txt.tmp-123").write_text("partial")
                raise Boom(name)
            return fn(ctx)

        return action

    def a(ctx):
        (ctx.layout.root / "a.txt").write_text(f"threshold={ctx.recipe.dropmap.retention_threshold}")
        return {"value": 1}

    def b(ctx):
        (ctx.layout.root / "b.txt").write_text((ctx.layout.root / "a.txt").read_text().upper())
        return {}

    def c(ctx):
        (ctx.layout.root / "c.json").write_text(json.dumps(len((ctx.layout.root / "b.txt").read_bytes())))
        return {}

    root = lambda ctx: ctx.layout.root  # noqa: E731
    return Pipeline([
        Stage("a", "first", act("a", a), deps=lambda ctx: [ctx.layout.root.parent / "input.txt"],
              outs=lambda ctx: [root(ctx) / "a.txt"],
              params=lambda r: {"threshold": r.dropmap.retention_threshold}),
        Stage("b", "second", act("b", b), deps=lambda ctx: [root(ctx) / "a.txt"],
              outs=lambda ctx: [root(ctx) / "b.txt"], params=lambda r: {}),
        Stage("c", "third", act("c", c), deps=lambda ctx: [root(ctx) / "b.txt"],
              outs=lambda ctx: [root(ctx) / "c.json"], params=lambda r: {"name": r.name}),
    ])


@pytest.fixture
def ctx(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "demo.toml", check_inputs=False)
    (tmp_path / "input.txt").write_text("calibration")
    return Context(recipe=recipe, layout=RunLayout(tmp_path / "run"))


def with_threshold(ctx: Context, value: float) -> Context:
    dropmap = ctx.recipe.dropmap.model_copy(update={"retention_threshold": value})
    return Context(recipe=ctx.recipe.model_copy(update={"dropmap": dropmap}), layout=ctx.layout)


def statuses(results):
    return {r.name: r.status for r in results}


def test_second_run_skips_every_stage(ctx):
    calls: list[str] = []
    first = toy_pipeline(calls).run(ctx)
    assert statuses(first) == {"a": "ran", "b": "ran", "c": "ran"}
    second = toy_pipeline(calls).run(ctx)
    assert statuses(second) == {"a": "skipped", "b": "skipped", "c": "skipped"}
    assert calls == ["a", "b", "c"]
    assert second[0].headline == {"value": 1}


def test_changed_parameter_reruns_that_stage_and_downstream_only(ctx):
    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    calls.clear()
    results = toy_pipeline(calls).run(with_threshold(ctx, 0.5))
    assert calls == ["a", "b", "c"]
    assert "setting threshold changed" in results[0].reason
    assert results[1].reason.startswith("input a.txt changed")


def test_downstream_parameter_change_leaves_upstream_alone(ctx):
    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    calls.clear()
    renamed = Context(recipe=ctx.recipe.model_copy(update={"name": "other"}), layout=ctx.layout)
    toy_pipeline(calls).run(renamed)
    assert calls == ["c"]


def test_modified_or_missing_output_reruns(ctx):
    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    (ctx.layout.root / "c.json").write_text("tampered")
    calls.clear()
    results = toy_pipeline(calls).run(ctx)
    assert calls == ["c"] and results[2].reason == "an output was modified"
    (ctx.layout.root / "b.txt").unlink()
    calls.clear()
    toy_pipeline(calls).run(ctx)
    assert calls == ["b"]  # b's output is identical again, so c stays valid


def test_failure_keeps_finished_stages_and_resumes_there(ctx):
    calls: list[str] = []
    with pytest.raises(Boom):
        toy_pipeline(calls, fail_in={"b"}).run(ctx)
    lock = json.loads(ctx.layout.lock_path.read_text())
    assert set(lock["stages"]) == {"a"}
    calls.clear()
    results = toy_pipeline(calls).run(ctx)
    assert calls == ["b", "c"]
    assert statuses(results)["a"] == "skipped"
    assert not list(ctx.layout.root.glob(".b.txt.tmp-*")), "leftover temporaries are removed"


def test_force_from_and_until(ctx):
    calls: list[str] = []
    toy_pipeline(calls).run(ctx, until_stage="b")
    assert calls == ["a", "b"]
    calls.clear()
    toy_pipeline(calls).run(ctx, from_stage="b")
    assert calls == ["b", "c"]  # --from forces its stage; c had never run
    calls.clear()
    toy_pipeline(calls).run(ctx, force=True)
    assert calls == ["a", "b", "c"]


def test_from_needs_existing_upstream_outputs(ctx):
    with pytest.raises(MoepruneError, match="needs .*a.txt.*does not exist"):
        toy_pipeline([]).run(ctx, from_stage="b")


def test_unknown_stage_names_the_choices(ctx):
    with pytest.raises(MoepruneError, match="no such stage; stages are a, b, c"):
        toy_pipeline([]).run(ctx, from_stage="zzz")


def test_changed_input_file_reruns_everything_after_it(ctx):
    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    (ctx.layout.root.parent / "input.txt").write_text("other calibration")
    calls.clear()
    results = toy_pipeline(calls).run(ctx)
    assert calls == ["a"]  # a's output does not depend on the file's content: b, c stay valid
    assert "input.txt changed" in results[0].reason


def test_lock_records_deps_params_and_outs(ctx):
    toy_pipeline([]).run(ctx)
    lock = json.loads(ctx.layout.lock_path.read_text())
    entry = lock["stages"]["b"]
    assert set(entry) >= {"cmd", "deps", "params", "outs", "code", "tools"}
    assert list(entry["deps"]) == ["a.txt"] and list(entry["outs"]) == ["b.txt"]
    assert len(entry["outs"]["b.txt"]["sha256"]) == 64


def test_failed_rerun_keeps_previous_outputs_and_lock_entry(ctx):
    """Issue 15: outputs and lock entries are replaced only on success."""
    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    lock_before = ctx.layout.lock_path.read_bytes()
    b_before = (ctx.layout.root / "b.txt").read_bytes()
    with pytest.raises(Boom):
        toy_pipeline(calls, fail_in={"b"}).run(ctx, force=True, from_stage="b")
    assert (ctx.layout.root / "b.txt").read_bytes() == b_before
    assert ctx.layout.lock_path.read_bytes() == lock_before
    calls.clear()
    again = toy_pipeline(calls).run(ctx)
    assert statuses(again) == {"a": "skipped", "b": "skipped", "c": "skipped"} and calls == []


def test_lock_names_no_absolute_path_and_survives_a_move(ctx, tmp_path):
    import shutil

    calls: list[str] = []
    toy_pipeline(calls).run(ctx)
    text = ctx.layout.lock_path.read_text() + (ctx.layout.root / ".hashcache.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copytree(ctx.layout.root, moved / "run")
    shutil.copy2(tmp_path / "input.txt", moved / "input.txt")
    calls.clear()
    results = toy_pipeline(calls).run(Context(recipe=ctx.recipe, layout=RunLayout(moved / "run")))
    assert statuses(results) == {"a": "skipped", "b": "skipped", "c": "skipped"} and calls == []
