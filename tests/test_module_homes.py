"""Each job in its module: building a model from its checkpoint is :mod:`moeprune.io`'s, the profiler
only replays, and the adapter base (:mod:`moeprune.arch.base`) holds what a family overrides. A
function moved back (or a new copy written) fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "moeprune"

# Calls that read a checkpoint's bytes or drive transformers' loading machinery (its conversion
# mapping, model building and initialisation): io/materialize.py and io/loading_plan.py make them.
CHECKPOINT_READS = frozenset({
    "preadv", "pread", "safe_open", "load_file",
    "get_model_conversion_mapping", "rename_source_key", "build_glob_alternation", "_get_dtype_plan",
    "_from_config", "from_config", "_init_weights", "guard_torch_init_functions",
})
# The profiler reads one safetensors file of its own: the statistics it wrote (profile/stats.py).
OWN_FILES = {("profile/stats.py", "safe_open")}
# The generic loading functions and their one home.
LOADING_FUNCTIONS = ("read_tensor_into", "read_source", "materialize", "meta_model", "_keep_in_fp32", "_slots",
                     "_init_owner", "_Built")
LOADING_HOME = "io/materialize.py"
# What the adapter base may define at its top level: the adapter, what it returns, its error,
# and the routing kinds a family chooses from.
BASE_CLASSES = {"ArchError", "MoeArch", "MoeModules"}


def _called_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None


def checkpoint_reads(source: str, where: str) -> list[str]:
    """``where:line: name`` for each call in ``source`` that reads checkpoint bytes or builds a model."""
    return sorted(
        f"{where}:{node.lineno}: {_called_name(node)}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call) and _called_name(node) in CHECKPOINT_READS
        and (where, _called_name(node)) not in OWN_FILES
    )


def definitions(source: str) -> set[str]:
    """Names of the functions and classes ``source`` defines at its top level."""
    return {node.name for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


def _relative(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_the_profiler_reads_no_checkpoint_and_builds_no_model():
    found = [hit for path in sorted((PACKAGE / "profile").rglob("*.py"))
             for hit in checkpoint_reads(path.read_text(encoding="utf-8"), _relative(path))]
    assert found == [], "the profiler replays; checkpoint reading and model building live in moeprune.io:\n" + \
        "\n".join(found)


def test_the_loading_functions_have_one_home():
    homes = {name: [_relative(path) for path in sorted(PACKAGE.rglob("*.py"))
                    if name in definitions(path.read_text(encoding="utf-8"))]
             for name in LOADING_FUNCTIONS}
    assert homes == {name: [LOADING_HOME] for name in LOADING_FUNCTIONS}


def test_the_adapter_base_defines_only_the_adapter():
    source = (PACKAGE / "arch" / "base.py").read_text(encoding="utf-8")
    assert definitions(source) == BASE_CLASSES, "generic helpers belong in arch/patterns.py, arch/modules.py or io/"


@pytest.mark.parametrize("line, found", [
    ("n = os.preadv(fd, [view], offset)", ["preadv"]),
    ('with safe_open(str(shard), framework="pt") as f: pass', ["safe_open"]),
    ("mapping = get_model_conversion_mapping(model)", ["get_model_conversion_mapping"]),
    ("model = cls._from_config(config, dtype=dtype)", ["_from_config"]),
    ("owner._init_weights(module)", ["_init_weights"]),
    ("alternation, groups, _ = build_glob_alternation(list(plan))", ["build_glob_alternation"]),
])
def test_the_scan_finds_each_kind_of_read(line, found):
    assert checkpoint_reads(line, "profile/streamed.py") == [f"profile/streamed.py:1: {name}" for name in found]


def test_the_scan_leaves_other_code_alone():
    assert checkpoint_reads('with safe_open(str(path), framework="numpy") as h: pass', "profile/stats.py") == []
    assert checkpoint_reads("built = materialize(model, path, checkpoint, device)", "profile/streamed.py") == []
    assert definitions("def read_source(): pass\nclass _Built: pass\nx = 1") == {"read_source", "_Built"}
