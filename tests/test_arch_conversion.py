"""Expert tensor patterns come from transformers' conversion mapping, not from the family modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moeprune.arch import ADAPTERS, arch_for_config
from moeprune.arch.base import ArchError, MoeArch
from moeprune.arch.conversion import patterns_from_converters, transformers_expert_patterns
from moeprune.arch.patterns import EXPERT, EXPERTS

ARCH_DIR = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "arch"


def _mapped(adapter: MoeArch) -> bool:
    return transformers_expert_patterns(adapter.conversion_types or adapter.model_types) is not None


def test_no_family_module_restates_per_expert_patterns():
    """Only conversion.py turns an expert index into a regex group; families with a mapping state no
    expert pattern of their own."""
    for path in sorted(ARCH_DIR.glob("*.py")):
        if path.name != "conversion.py":
            assert "(?P<expert>" not in path.read_text(), path.name
    for adapter in ADAPTERS:
        assert not (_mapped(adapter) and adapter.own_expert_patterns), adapter.name


@pytest.mark.parametrize("adapter", [a for a in ADAPTERS if any(a.name == m for m in ("qwen3_moe", "mixtral"))],
                         ids=lambda a: a.name)
def test_patterns_follow_the_mapping_transformers_ships(adapter):
    """Every per-expert source and fused target of the family's expert-merging converters is a pattern."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    mapping = get_checkpoint_conversion_mapping(adapter.model_types[0])
    sources = {s for c in mapping if hasattr(c, "operations") for s in c.source_patterns if "experts.*." in s}
    per_expert = {p.label for p in adapter.expert_patterns if p.role == EXPERT}
    assert per_expert == {s.split("*.", 1)[1] for s in sources}
    assert {p.label for p in adapter.expert_patterns if p.role == EXPERTS} == {"experts.gate_up_proj", "experts.down_proj"}


@pytest.mark.parametrize(("model_type", "name", "label", "expert"), [
    ("mixtral", "model.layers.3.block_sparse_moe.experts.5.w3.weight", "w3.weight", 5),
    ("minimax_m2", "model.layers.0.block_sparse_moe.experts.11.w2.weight", "w2.weight", 11),
    ("qwen3_moe", "model.layers.7.mlp.experts.127.down_proj.weight", "down_proj.weight", 127),
    ("qwen3_5_moe", "model.language_model.layers.2.mlp.experts.0.gate_proj.weight", "gate_proj.weight", 0),
    ("hunyuan_v1_moe", "model.layers.1.mlp.experts.63.up_proj.weight", "up_proj.weight", 63),
])
def test_hub_names_are_classified_from_the_derived_patterns(model_type, name, label, expert):
    tensor = arch_for_config({"model_type": model_type}).classify_tensor(name)
    assert (tensor.role, tensor.label, tensor.expert) == (EXPERT, label, expert)
    assert tensor.renamed(expert + 1000).endswith(f"experts.{expert + 1000}.{label}")


def test_a_fused_save_of_a_per_expert_family_is_classified_too():
    arch = arch_for_config({"model_type": "mixtral"})
    assert arch.classify_tensor("model.layers.1.mlp.experts.gate_up_proj").role == EXPERTS
    assert arch.classify_tensor("model.layers.1.block_sparse_moe.experts.down_proj").role == EXPERTS


def test_a_mapping_with_other_names_gives_other_patterns():
    """The patterns are read from the converters, whatever they name: a new mapping needs no code here."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    converters = [
        WeightRenaming(".moe.", ".mlp."),
        WeightConverter(source_patterns=["moe.experts.*.fc_in.weight", "moe.experts.*.fc_gate.weight"],
                        target_patterns="moe.experts.gate_up_proj", operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
        WeightConverter(source_patterns="moe.experts.*.fc_out.weight", target_patterns="moe.experts.down_proj",
                        operations=[MergeModulelist(dim=0)]),
        WeightConverter(source_patterns="attn.wqkv", target_patterns=["attn.q", "attn.k", "attn.v"], operations=[Chunk(dim=0)]),
    ]
    patterns = patterns_from_converters(converters)
    assert [(p.role, p.label) for p in patterns] == [
        (EXPERT, "fc_in.weight"), (EXPERT, "fc_gate.weight"), (EXPERT, "fc_out.weight"),
        (EXPERTS, "experts.gate_up_proj"), (EXPERTS, "experts.down_proj"),
    ]
    match = patterns[2].regex.match("model.layers.4.moe.experts.9.fc_out.weight")
    assert match is not None and match["layer"] == "4" and match["expert"] == "9"
    assert not any(p.regex.match("model.layers.4.attn.wqkv") for p in patterns)


def test_a_family_without_mapping_or_patterns_is_refused():
    class Unmapped(MoeArch):
        name = family = "unmapped"
        model_types = ("no_such_model_type",)

    with pytest.raises(ArchError, match=re.escape("unmapped: transformers has no expert conversion mapping")):
        Unmapped().classify_tensor("model.layers.0.mlp.experts.0.w1.weight")
