"""GLM-MoE-DSA (``glm_moe_dsa``, GLM-5): GLM-4.5's router under DeepSeek sparse attention.

Hub layout and routing as DeepSeek-V3 (per-expert ``mlp.experts.{i}.*_proj.weight`` from
transformers' conversion mapping, ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``,
shared experts never sliced; sigmoid + correction bias, grouped top-k, scaling). Which layers
are MoE is stated per layer by ``mlp_layer_types`` ("dense" / "sparse"), which transformers
fills from ``first_k_dense_replace`` when absent. llama.cpp calls it ``glm-dsa``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeprune.arch.deepseek import Glm4Moe


class GlmMoeDsa(Glm4Moe):
    name = "glm_moe_dsa"
    family = "GLM-MoE-DSA"
    model_types = ("glm_moe_dsa",)
    transformers_causal_lm = "GlmMoeDsaForCausalLM"
    gguf_arch = "glm-dsa"

    def is_moe_layer(self, config: Mapping[str, Any], layer: int) -> bool:
        kinds = self.text_config(config).get("mlp_layer_types")
        if isinstance(kinds, list) and layer < len(kinds):
            return kinds[layer] == "sparse"
        return super().is_moe_layer(config, layer)
