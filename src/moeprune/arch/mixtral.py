"""Mixtral (``mixtral``): ``block_sparse_moe`` on disk, ``mlp`` in memory.

Hub layout: ``block_sparse_moe.experts.{i}.w1/w2/w3.weight`` (gate, down, up) per expert and
the router ``block_sparse_moe.gate.weight`` [E, H]; the expert count is ``num_local_experts`` and
each expert's width ``intermediate_size`` (there is no dense MLP). Routing: softmax, top-k,
always renormalised. llama.cpp converts it as ``llama`` with experts.
"""

from __future__ import annotations

from moeprune.arch.base import SOFTMAX_TOPK, MoeArch
from moeprune.arch.patterns import ROUTER_WEIGHT, TensorPattern


class Mixtral(MoeArch):
    name = "mixtral"
    family = "Mixtral"
    model_types = ("mixtral",)
    transformers_causal_lm = "MixtralForCausalLM"
    num_experts_key = "num_local_experts"
    top_k_key = "num_experts_per_tok"
    expert_intermediate_key = "intermediate_size"
    dense_intermediate_key = None
    router_patterns = (
        TensorPattern(r"block_sparse_moe\.gate\.weight", ROUTER_WEIGHT, "block_sparse_moe.gate.weight"),
    )
    experts_module_re = r"(?:^|\.)layers\.\d+\.(?:block_sparse_moe\.|mlp\.)?experts\."
    routing = SOFTMAX_TOPK
    gguf_arch = "llama"
