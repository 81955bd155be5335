"""Qwen3-MoE (``qwen3_moe``) and Qwen2-MoE (``qwen2_moe``, with a shared expert).

Hub layout: ``mlp.experts.{i}.{gate,up,down}_proj.weight`` per expert and the router
``mlp.gate.weight`` [E, H]. Routing: softmax over all experts, top-k, renormalised when
``norm_topk_prob``. A layer is MoE unless it is in ``mlp_only_layers`` or off the
``decoder_sparse_step`` grid. Qwen2-MoE adds ``mlp.shared_expert.*`` and ``mlp.shared_expert_gate``,
which every token uses: never sliced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeprune.arch.base import SOFTMAX_TOPK, MoeArch
from moeprune.arch.patterns import ROUTER_WEIGHT, TensorPattern


class Qwen3Moe(MoeArch):
    name = "qwen3_moe"
    family = "Qwen3-MoE"
    model_types = ("qwen3_moe",)
    transformers_causal_lm = "Qwen3MoeForCausalLM"
    num_experts_key = "num_experts"
    num_experts_aliases = ("num_local_experts",)
    top_k_key = "num_experts_per_tok"
    expert_intermediate_key = "moe_intermediate_size"
    dense_intermediate_key = None  # intermediate_size only serves mlp_only_layers
    router_patterns = (TensorPattern(r"mlp\.gate\.weight", ROUTER_WEIGHT, "mlp.gate.weight"),)
    routing = SOFTMAX_TOPK
    gguf_arch = "qwen3moe"

    def is_moe_layer(self, config: Mapping[str, Any], layer: int) -> bool:
        text = self.text_config(config)
        step = int(text.get("decoder_sparse_step") or 1)
        return layer not in (text.get("mlp_only_layers") or []) and (layer + 1) % step == 0


class Qwen2Moe(Qwen3Moe):
    name = "qwen2_moe"
    family = "Qwen2-MoE"
    model_types = ("qwen2_moe",)
    transformers_causal_lm = "Qwen2MoeForCausalLM"
    never_sliced_re = r"\.mlp\.shared_expert(?:_gate)?\."
    gguf_arch = "qwen2moe"
    router_sentence = ("The router keeps only the rows of retained experts (the shared expert and its gate "
                       "are unchanged)")
