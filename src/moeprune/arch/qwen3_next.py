"""Qwen3-Next (``qwen3_next``): Qwen2-MoE's router and shared expert under hybrid attention.

Hub layout: ``mlp.experts.{i}.{gate,up,down}_proj.weight`` per expert (from transformers'
conversion mapping), router ``mlp.gate.weight`` [E, H]; ``mlp.shared_expert.*`` and
``mlp.shared_expert_gate`` serve every token and are never sliced. Routing: softmax over all
experts, top-k, renormalised when ``norm_topk_prob``. Layers follow ``mlp_only_layers`` and
``decoder_sparse_step`` as in Qwen3-MoE; the linear-attention (Gated DeltaNet) layers do not
change the MoE block. llama.cpp calls it ``qwen3next``.

The Hub checkpoints also carry a multi-token-prediction block (``mtp.*``, with its own experts)
that transformers never loads and nothing profiles: it is copied unchanged (its ``layers.0`` must
not be read as decoder layer 0) and left out of the GGUF (``--no-mtp``).
"""

from __future__ import annotations

from moeprune.arch.qwen_moe import Qwen2Moe


class Qwen3Next(Qwen2Moe):
    name = "qwen3_next"
    family = "Qwen3-Next"
    model_types = ("qwen3_next",)
    transformers_causal_lm = "Qwen3NextForCausalLM"
    never_sliced_re = r"^mtp\.|\.mlp\.shared_expert(?:_gate)?\."
    gguf_arch = "qwen3next"
    gguf_convert_args = ("--no-mtp",)
