"""dots.llm1 (``dots1``): DeepSeek-V3's router and layout under plain attention.

Hub layout and routing as DeepSeek-V3 (per-expert ``mlp.experts.{i}.*_proj.weight`` from
transformers' conversion mapping, ``mlp.gate.weight``, ``mlp.gate.e_score_correction_bias``,
``mlp.shared_experts.*`` never sliced, the first ``first_k_dense_replace`` layers dense; sigmoid
+ correction bias, grouped top-k, scaling). llama.cpp calls it ``dots1``.
"""

from __future__ import annotations

from moeprune.arch.deepseek import Glm4Moe


class Dots1(Glm4Moe):
    name = "dots1"
    family = "dots.llm1"
    model_types = ("dots1",)
    transformers_causal_lm = "Dots1ForCausalLM"
    gguf_arch = "dots1"
