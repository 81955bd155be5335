"""A stage's code fingerprint is computed from what its action imports, transitively (issue 22)."""

from __future__ import annotations

import functools
import importlib
import sys
import textwrap

import pytest

from moeprune.pipeline.code import ImportGraph, action_roots, package_graph
from moeprune.pipeline.graph import _why_rerun
from moeprune.pipeline.stages import build_pipeline

FILES = {
    "__init__.py": "",
    "a.py": "def f():\n    from .b import g  # function-local, relative\n    return g\n",
    "b.py": "from fakepkg.sub import c  # a submodule named in a from-import\ng = c\n",
    "sub/__init__.py": "from . import d\n",
    "sub/c.py": "def h():\n    from ..e2 import z\n    return z\n",
    "sub/d.py": "import json\n",
    "e2.py": "z = 1\n",
    "unreached.py": "import fakepkg.a\n",
    "stages.py": textwrap.dedent(
        """
        from fakepkg import e2 as module_global
        LIMIT = 3

        def helper():
            return module_global.z

        def never_called():
            from fakepkg import unreached
            return unreached

        def make(which):
            def action(ctx):
                from .a import f
                return f, helper(), which, LIMIT
            return action
        """
    ),
}


@pytest.fixture
def fakepkg(tmp_path, monkeypatch):
    for name, text in FILES.items():
        path = tmp_path / "fakepkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path / "fakepkg"
    for name in [m for m in sys.modules if m == "fakepkg" or m.startswith("fakepkg.")]:
        del sys.modules[name]


def test_closure_follows_relative_local_and_submodule_imports(fakepkg):
    graph = ImportGraph.of_package(fakepkg, "fakepkg")
    assert graph.closure(["fakepkg.a"]) == {
        "fakepkg", "fakepkg.a", "fakepkg.b", "fakepkg.sub", "fakepkg.sub.c", "fakepkg.sub.d", "fakepkg.e2",
    }
    # the parent packages' __init__ run first; a sibling the package does not import is not reached
    assert graph.closure(["fakepkg.sub.d"]) == {"fakepkg", "fakepkg.sub", "fakepkg.sub.d"}
    assert graph.closure(["fakepkg.no_such_module"]) == {"fakepkg"}


def test_action_roots_come_from_the_action_and_the_functions_it_calls(fakepkg):
    stages = importlib.import_module("fakepkg.stages")
    roots = action_roots(stages.make("base"), package="fakepkg")
    graph = ImportGraph.of_package(fakepkg, "fakepkg")
    fingerprint = roots.fingerprint(graph)
    assert {"fakepkg/stages.py:make.<locals>.action", "fakepkg/stages.py:helper",
            "fakepkg/stages.py:LIMIT"} <= set(fingerprint)
    assert {"fakepkg/a.py", "fakepkg/b.py", "fakepkg/sub/c.py", "fakepkg/sub/d.py", "fakepkg/e2.py",
            "fakepkg/__init__.py"} <= set(fingerprint)
    # what the action never runs is not part of it: the uncalled function, its import, the module file
    assert not {"fakepkg/stages.py:never_called", "fakepkg/unreached.py", "fakepkg/stages.py"} & set(fingerprint)

    partial = action_roots(functools.partial(stages.make("base"), None), package="fakepkg")
    assert partial.fingerprint(graph) == fingerprint

    (fakepkg / "sub" / "d.py").write_text(FILES["sub/d.py"] + "# a comment\n")
    edited = roots.fingerprint(ImportGraph.of_package(fakepkg, "fakepkg"))
    assert [k for k in fingerprint if fingerprint[k] != edited[k]] == ["fakepkg/sub/d.py"]


def test_every_stage_of_the_pipeline_has_its_own_computed_code():
    graph = package_graph()
    codes = {stage.name: stage.code.fingerprint(graph) for stage in build_pipeline().stages}
    for name in ("profile", "dropmap", "prune"):
        assert "moeprune/arch/gemma4.py" in codes[name], name
    assert "moeprune/profile/stage.py" in codes["profile"]
    assert "moeprune/dropmap/stage.py" in codes["dropmap"]
    assert "moeprune/prune/surgery.py" in codes["prune"]
    assert "moeprune/card/render.py" in codes["card"] and "moeprune/card/render.py" not in codes["profile"]
    assert "moeprune/pipeline/stages.py:_profile" in codes["profile"]
    assert "moeprune/pipeline/stages.py:_profile" not in codes["dropmap"]
    for name, code in codes.items():  # the modules that decide whether a stage runs are not its code
        assert not {"moeprune/pipeline/graph.py", "moeprune/pipeline/view.py", "moeprune/pipeline/lock.py"} & set(code), name
        assert all(not key.startswith("/") for key in code), name


def test_rerun_reason_names_the_changed_module():
    old = {"cmd": "x", "deps": {}, "params": {}, "tools": {}, "outs": {},
           "code": {"moeprune/arch/gemma4.py": "1", "moeprune/recipe.py": "2"}}
    new = {**old, "code": {"moeprune/arch/gemma4.py": "3", "moeprune/recipe.py": "2"}}
    assert _why_rerun(old, new, {}, force=False) == "code changed: moeprune/arch/gemma4.py"
    assert _why_rerun({**old, "code": "a-digest-of-an-older-lock"}, new, {}, force=False) == "code changed"
    assert _why_rerun(old, old, {}, force=False) is None
