"""OLMoE (``olmoe``): every layer MoE, per-expert Hub layout, softmax then top-k.

``mlp.experts.{i}.{gate,up,down}_proj.weight`` and ``mlp.gate.weight``; the expert width is
``intermediate_size``; top-k weights are renormalised only when ``norm_topk_prob`` (false in
OLMoE-1B-7B).
"""

from __future__ import annotations

from moeprune.arch.base import SOFTMAX_TOPK, MoeArch
from moeprune.arch.patterns import ROUTER_WEIGHT, TensorPattern


class Olmoe(MoeArch):
    name = "olmoe"
    family = "OLMoE"
    model_types = ("olmoe",)
    transformers_causal_lm = "OlmoeForCausalLM"
    num_experts_key = "num_experts"
    num_experts_aliases = ("num_local_experts",)
    top_k_key = "num_experts_per_tok"
    expert_intermediate_key = "intermediate_size"
    dense_intermediate_key = None
    router_patterns = (TensorPattern(r"mlp\.gate\.weight", ROUTER_WEIGHT, "mlp.gate.weight"),)
    routing = SOFTMAX_TOPK
    gguf_arch = "olmoe"
