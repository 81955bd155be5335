"""Hunyuan-MoE (``hunyuan_v1_moe``, Hunyuan-A13B): a Qwen-style router named ``gate.wg``.

Hub layout: ``mlp.experts.{i}.{gate,up,down}_proj.weight`` per expert (from transformers'
conversion mapping), router ``mlp.gate.wg.weight`` [E, H] (kept in float32), and a shared
``mlp.shared_mlp.*`` that every token uses: never sliced. The count is ``num_experts``, top-k
``moe_topk``: one integer, or (Hunyuan-A13B) a per-layer list, which must hold one value (a
per-layer list of expert counts is refused); every expert's width is ``intermediate_size``. Routing: softmax over all experts, top-k, renormalised. llama.cpp
calls it ``hunyuan-moe``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeprune.arch.base import SOFTMAX_TOPK, MoeArch
from moeprune.arch.patterns import ROUTER_WEIGHT, TensorPattern


class HunyuanV1Moe(MoeArch):
    name = "hunyuan_v1_moe"
    family = "Hunyuan-MoE"
    model_types = ("hunyuan_v1_moe",)
    transformers_causal_lm = "HunYuanMoEV1ForCausalLM"
    num_experts_key = "num_experts"
    top_k_key = "moe_topk"
    expert_intermediate_key = "intermediate_size"
    dense_intermediate_key = None
    router_patterns = (TensorPattern(r"mlp\.gate\.wg\.weight", ROUTER_WEIGHT, "mlp.gate.wg.weight"),)
    never_sliced_re = r"\.mlp\.shared_mlp\."
    routing = SOFTMAX_TOPK
    router_expert_params = ("wg.weight",)
    gguf_arch = "hunyuan-moe"
    router_sentence = "The router `gate.wg` keeps only the rows of retained experts (the shared MLP is unchanged)"

    def top_k(self, config: Mapping[str, Any]) -> int | None:
        value = self.text_config(config).get(self.top_k_key)
        if isinstance(value, list) and value and len(set(value)) == 1:
            value = value[0]
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    def model_top_k(self, model: Any) -> int | None:
        return self.top_k(model.config.to_dict())
