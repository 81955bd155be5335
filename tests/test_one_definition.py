"""One definition per list and rule: the schemas, help texts and checks derive from it, and a copy
that drifts (or a new copy) fails here."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterator
from pathlib import Path

from moeprune.dropmap.types import CRITERIA, MANUAL, STRATEGIES
from moeprune.eval.analysis import PRIMARY_FILTER

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*sorted((ROOT / "src" / "moeprune").rglob("*.py")), ROOT / "tasks.py"]
VOCABULARY = set(CRITERIA) | set(STRATEGIES)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose may name criteria; it is not a list the code uses)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _code_strings(path: Path) -> Iterator[tuple[ast.AST, ast.Constant]]:
    """(parent, string constant) of every non-docstring string literal in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree)
    for parent in ast.walk(tree):
        for child in ast.iter_child_nodes(parent):
            if isinstance(child, ast.Constant) and isinstance(child.value, str) and id(child) not in skip:
                yield parent, child


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


def test_drop_map_schema_enums_are_the_python_lists():
    """The hand-written drop-map schema names exactly the criteria and strategies the code knows."""
    schema = json.loads((ROOT / "schemas" / "drop_map.schema.json").read_text())
    strategy = schema["properties"]["strategy"]["properties"]
    assert tuple(strategy["criterion"]["enum"]) == CRITERIA
    assert tuple(strategy["name"]["enum"]) == (*STRATEGIES, MANUAL)


def test_recipe_schema_and_task_help_derive_from_the_python_lists():
    import tasks
    from moeprune.recipe import recipe_json_schema

    section = recipe_json_schema()["$defs"]["DropMapSection"]["properties"]
    assert tuple(section["criterion"]["enum"]) == CRITERIA
    assert tuple(section["strategy"]["enum"]) == STRATEGIES
    help_text = tasks.dropmap.help
    assert all(name in help_text["criterion"] for name in CRITERIA), help_text["criterion"]
    assert all(name in help_text["strategy"] for name in STRATEGIES), help_text["strategy"]


def test_no_module_restates_the_criteria_or_strategies():
    """A tuple, list, set or Literal of two or more names, or a message listing three, is a copy:
    it belongs in moeprune.dropmap.types and is imported from there."""
    copies = []
    for path in SOURCES:
        if path == ROOT / "src" / "moeprune" / "dropmap" / "types.py":
            continue
        for parent, string in _code_strings(path):
            in_collection = isinstance(parent, (ast.Tuple, ast.List, ast.Set)) and sum(
                isinstance(e, ast.Constant) and e.value in VOCABULARY for e in parent.elts) >= 2
            listed = sum(name in string.value for name in VOCABULARY) >= 3
            if in_collection or listed:
                copies.append(_where(path, string))
    assert copies == [], f"criteria/strategy lists restated outside moeprune.dropmap.types: {sorted(set(copies))}"


def test_the_primary_filter_is_named_once():
    copies = [_where(path, string) for path in SOURCES if path.name != "analysis.py"
              for _, string in _code_strings(path) if string.value == PRIMARY_FILTER]
    assert copies == [], f"{PRIMARY_FILTER!r} restated outside moeprune.eval.analysis: {copies}"


def test_the_card_restates_no_recipe_default():
    """The card reads recipe values (or the typed model's defaults), never a copy of a default."""
    from moeprune.card.numbers import recipe_setting
    from moeprune.recipe import ProfileSection

    assert recipe_setting({}, "profile", "top_overlap_k") == ProfileSection.model_fields["top_overlap_k"].default
    assert recipe_setting({"profile": {"top_overlap_k": 5}}, "profile", "top_overlap_k") == 5
    card_code = [ROOT / "src" / "moeprune" / "card" / name for name in ("numbers.py", "render.py")]
    defaults = {name: field.default for name, field in ProfileSection.model_fields.items()
                if isinstance(field.default, (int, float)) and not isinstance(field.default, bool)}
    restated = []
    for path in card_code:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):  # .get("top_overlap_k", 32) and the like
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value in defaults):
                restated.append(_where(path, node))
        restated += [_where(path, s) for _, s in _code_strings(path) if s.value in {"math", "creative"}]
    assert restated == []
