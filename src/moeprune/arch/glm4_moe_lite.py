"""GLM-4.7-Flash / GLM-4.5 Lite (``glm4_moe_lite``): GLM-4.5's router with DeepSeek's MLA attention.

Hub layout and routing as DeepSeek-V3 (per-expert tensors from transformers' conversion mapping,
``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``, shared experts never sliced); MoE
layers per ``mlp_layer_types`` as GLM-MoE-DSA. llama.cpp converts it as ``deepseek2``.
"""

from __future__ import annotations

from moeprune.arch.glm_moe_dsa import GlmMoeDsa


class Glm4MoeLite(GlmMoeDsa):
    name = "glm4_moe_lite"
    family = "GLM-4.5-Lite"
    model_types = ("glm4_moe_lite",)
    transformers_causal_lm = "Glm4MoeLiteForCausalLM"
    gguf_arch = "deepseek2"
