"""Qwen3.5/3.6-MoE (``qwen3_5_moe``, text config ``qwen3_5_moe_text``): Qwen3-Next's MoE block in
a multimodal checkpoint.

The Hub checkpoints (Qwen3.5-35B-A3B, Qwen3.6-35B-A3B) are ``Qwen3_5MoeForConditionalGeneration``:
the decoder sits under ``model.language_model.layers.N`` and its config under ``text_config``.
Per-expert ``mlp.experts.{i}.{gate,up,down}_proj.weight`` (from transformers' conversion mapping),
router ``mlp.gate.weight`` [E, H], a shared expert and its gate that are never sliced. Every
decoder layer is MoE. Routing: softmax over all experts, top-k, always renormalised. llama.cpp
calls it ``qwen35moe``. The multi-token-prediction block (``mtp.*``) is handled as in Qwen3-Next.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moeprune.arch.qwen3_next import Qwen3Next


class Qwen35Moe(Qwen3Next):
    name = "qwen3_5_moe"
    family = "Qwen3.5-MoE"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    transformers_causal_lm = "Qwen3_5MoeForConditionalGeneration"
    text_config_key = "text_config"
    layer_prefix = "model.language_model.layers."
    gguf_arch = "qwen35moe"

    def is_moe_layer(self, config: Mapping[str, Any], layer: int) -> bool:
        return True
