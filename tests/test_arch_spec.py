"""``arch.inspect`` is the one reader of a model's config keys: its answers on the committed demo
model, a rewritten config re-read, and a scan of the sources that fails on any other reader."""

from __future__ import annotations

import ast
import json
import re
import shutil
from functools import cache
from pathlib import Path

import pytest

from moeprune.arch import ArchError, ModelSpec, inspect, supported_model_types
from moeprune.demo import MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "moeprune"
# The model's own readers: the family adapters and spec (arch/), the checkpoint reader (io/).
OWNERS = ("arch/", "io/")
# A receiver spelled like a config (``text``, ``model.config``, ``cfg``): where a key that is also a
# moeprune name (``num_experts`` of a drop map, ``hidden_size`` of the memory plan) is a read.
CONFIG_LIKE = re.compile(r"config|cfg|text", re.IGNORECASE)
FILE_READS = {"load", "loads", "open", "read_bytes", "read_json", "read_json_object", "read_text"}


def _keys_of(config: dict, out: set[str]) -> set[str]:
    for key, value in config.items():
        out.add(key)
        if isinstance(value, dict) and key.endswith("_config"):
            _keys_of(value, out)
    return out


@cache
def config_keys() -> frozenset[str]:
    """Keys of the configs of every supported family, as transformers writes them: the model's own
    keys (transformers' generic bookkeeping and the token ids a tokenizer also holds left out),
    plus ``architectures``, ``model_type``, ``auto_map`` and transformers' ``get_text_config``."""
    import transformers

    generic = set(transformers.PretrainedConfig().to_dict())
    found: set[str] = set()
    for model_type in supported_model_types():
        _keys_of(transformers.AutoConfig.for_model(model_type).to_dict(), found)
    model_keys = {key for key in found - generic if key.isidentifier() and not re.search(r"_token_(id|index)$", key)}
    return frozenset(model_keys | {"architectures", "model_type", "auto_map", "get_text_config"})


@cache
def json_fields() -> frozenset[str]:
    """Field names of moeprune's own JSON files (its schemas' properties): ``drop_map["num_experts"]``."""
    names: set[str] = set()

    def properties(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "properties" and isinstance(value, dict):
                    names.update(value)
                properties(value)
        elif isinstance(node, list):
            for value in node:
                properties(value)

    for schema in (ROOT / "schemas").glob("*.json"):
        properties(json.loads(schema.read_text(encoding="utf-8")))
    return frozenset(names)


@cache
def attribute_names() -> frozenset[str]:
    """Attribute names moeprune defines (functions, annotated fields, assigned attributes):
    ``stats.num_experts``, ``facts.hidden_size``."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return frozenset(names)


def _is_read(key: object, receiver: ast.expr, own: frozenset[str]) -> bool:
    """``key`` of ``receiver`` is a config key, and not one of moeprune's own names (``own``) unless
    the receiver is spelled like a config."""
    if not isinstance(key, str) or key not in config_keys():
        return False
    return key not in own or bool(CONFIG_LIKE.search(ast.unparse(receiver)))


def _constant(node: ast.expr) -> object:
    return node.value if isinstance(node, ast.Constant) else None


def _reads_config_file(call: ast.Call) -> bool:
    """``json.loads((d / "config.json").read_text())``, ``open(d / "config.json")``: the file read
    directly (writing it, ``open(..., "w")``, is the pruner's job, not a read)."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in FILE_READS:
        return False
    if name == "open" and any("w" in str(_constant(arg)) for arg in call.args[1:2]):
        return False
    return any(_constant(node) == "config.json" for node in ast.walk(call))


def config_key_reads(source: str, where: str) -> list[str]:
    """Every place in ``source`` that reads a model config key or ``config.json`` itself."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        what = None
        if isinstance(node, ast.Subscript) and _is_read(_constant(node.slice), node.value, json_fields()):
            what = f"[{_constant(node.slice)!r}]"
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and _is_read(node.attr, node.value, attribute_names()):
            what = f".{node.attr}"
        elif isinstance(node, ast.Call):
            func, args = node.func, node.args
            if (isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault") and args
                    and _is_read(_constant(args[0]), func.value, json_fields())):
                what = f".{func.attr}({_constant(args[0])!r})"
            elif (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr", "setattr", "delattr")
                  and len(args) > 1 and _is_read(_constant(args[1]), args[0], attribute_names())):
                what = f"{func.id}(..., {_constant(args[1])!r})"
            elif _reads_config_file(node):
                what = "reads config.json"
        if what:
            found.add(f"{where}:{node.lineno}: {what}")
    return sorted(found)


def test_no_module_outside_arch_and_io_reads_config_keys():
    reads = []
    for path in sorted(SRC.rglob("*.py")):
        where = path.relative_to(SRC).as_posix()
        if not where.startswith(OWNERS):
            reads += config_key_reads(path.read_text(encoding="utf-8"), where)
    assert not reads, "ask arch.inspect(model_dir) (a ModelSpec) instead:\n" + "\n".join(reads)


@pytest.mark.parametrize(("line", "found"), [
    ('n = text["num_hidden_layers"]', ["['num_hidden_layers']"]),
    ('k = config.get("top_k_experts") or config.get("num_experts_per_tok")',
     [".get('num_experts_per_tok')", ".get('top_k_experts')"]),
    ('e = full.get("text_config", full)["num_experts"]', [".get('text_config')", "['num_experts']"]),
    ('e = cfg["num_experts"]', ["['num_experts']"]),
    ('n = getattr(model.config, "max_position_embeddings", None)', ["getattr(..., 'max_position_embeddings')"]),
    ("t = model.config.get_text_config()", [".get_text_config"]),
    ("n = text.num_hidden_layers", [".num_hidden_layers"]),
    ("h = model.config.hidden_size", [".hidden_size"]),
    ('c = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))', ["reads config.json"]),
    ('c = read_json_object(base_dir / "config.json", "model config")', ["reads config.json"]),
])
def test_the_scan_finds_each_kind_of_read(line, found):
    assert config_key_reads(line, "m.py") == sorted(f"m.py:1: {what}" for what in found)


@pytest.mark.parametrize("line", [
    'n = drop_map["num_experts"]',  # moeprune's own files share some names with configs
    'n = stats.num_experts + facts.hidden_size',
    'n = spec.num_experts + spec.text_int("hidden_size")',
    'moe = {"num_experts": 4, "top_k": 2}',
    'open(staging / "config.json", "w")',
    'x = read_config(base_dir / "config.json", "base model config.json")',
    'e = generation["eos_token_id"]',
])
def test_the_scan_leaves_other_code_alone(line):
    assert config_key_reads(line, "m.py") == []


def test_the_spec_of_the_demo_model():
    spec = inspect(MODEL_DIR)
    assert (spec.model_type, spec.adapter.name, spec.transformers_class) == (
        "gemma4", "gemma4", "Gemma4ForConditionalGeneration")
    assert (spec.num_experts, spec.num_experts_key, spec.num_experts_path) == (16, "num_experts", "text_config.num_experts")
    assert (spec.top_k, spec.top_k_key, spec.num_layers, spec.moe_layers) == (2, "top_k_experts", 4, (0, 1, 2, 3))
    assert spec.moe_shape() == (16, 2, [0, 1, 2, 3])
    assert spec.towers == ()  # text only: vision_config and audio_config are null
    assert spec.layer_prefix == spec.load_sizes().layer_prefix + "layers."
    text = json.loads((MODEL_DIR / "config.json").read_text(encoding="utf-8"))["text_config"]
    assert spec.text_config() == text and spec.text_int("hidden_size") == text["hidden_size"]
    spec.text_config()["num_experts"] = 3  # a copy: the spec cannot be changed behind its back
    assert spec.num_experts == 16


def test_checkpoint_facts_agree_with_the_safetensors_library():
    from safetensors import safe_open

    spec = inspect(MODEL_DIR)
    params = 0
    for shard in sorted(MODEL_DIR.glob("*.safetensors")):
        with safe_open(str(shard), framework="numpy") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                numel = 1
                for dim in handle.get_slice(name).get_shape():
                    numel *= dim
                params += numel
    facts = spec.checkpoint
    hidden, expert_width = spec.text_int("hidden_size"), spec.text_int("moe_intermediate_size")
    # gate, up and down projections, the router's row and the per-expert scale
    per_expert = 3 * hidden * expert_width + hidden + 1
    assert (facts.params, facts.dtype, facts.shards) == (params, "BF16", 2)
    assert facts.expert_params_per_layer == {layer: per_expert for layer in range(4)}
    assert facts.experts_per_layer == {layer: 16 for layer in range(4)}
    sizes = spec.load_sizes()
    assert sum(layer.float_numel for layer in sizes.layers) + sizes.shell.float_numel == params


def test_a_config_rewritten_in_place_is_read_again(tmp_path):
    """Same inode, same size, same clock tick: a stat-keyed cache would answer 16 experts."""
    model = tmp_path / "m"
    shutil.copytree(MODEL_DIR, model)
    assert inspect(model).num_experts == 16
    path = model / "config.json"
    text = path.read_text(encoding="utf-8")
    stat = path.stat()
    path.write_text(text.replace('"num_experts": 16', '"num_experts": 12'), encoding="utf-8")
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_ino == stat.st_ino
    assert inspect(model).num_experts == 12


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(ArchError, match=r"config\.json: model's config\.json not found; point at a Hugging Face model"):
        inspect(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    with pytest.raises(ArchError, match="model_type 'bert' is not a supported MoE family"):
        inspect(tmp_path)
    dense = ModelSpec.from_config({"model_type": "qwen3_moe", "num_hidden_layers": 2}, "x/config.json")
    with pytest.raises(ArchError, match="x/config.json: not a mixture-of-experts config"):
        dense.moe_shape()
    with pytest.raises(ArchError, match="a config without its model directory"):
        dense.load_sizes()
    no_layers = json.loads((MODEL_DIR / "config.json").read_text(encoding="utf-8"))
    del no_layers["text_config"]["num_hidden_layers"]
    spec = ModelSpec.from_config(no_layers, tmp_path / "config.json", MODEL_DIR)
    with pytest.raises(ArchError, match=r"config\.json: no integer text_config\.num_hidden_layers"):
        spec.load_sizes()
