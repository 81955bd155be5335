"""gpt-oss (``gpt_oss``): fused experts with biases, transposed weights, top-k then softmax.

Hub layout (bf16): ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate and up interleaved),
``mlp.experts.gate_up_proj_bias`` [E, 2I], ``mlp.experts.down_proj`` [E, I, H],
``mlp.experts.down_proj_bias`` [E, H], router ``mlp.router.weight`` [E, H] and ``mlp.router.bias``
[E]. The published checkpoints store the experts as MXFP4 blocks (``*_blocks``, ``*_scales``):
those are refused, dequantize to bf16 first. Routing: top-k of the logits, softmax over the k.
"""

from __future__ import annotations

from typing import Any

from moeprune.arch.base import TOPK_SOFTMAX, MoeArch
from moeprune.arch.patterns import EXPERT_BIAS, EXPERTS, ROUTER_BIAS, ROUTER_WEIGHT, TensorPattern


class GptOss(MoeArch):
    name = "gpt_oss"
    family = "gpt-oss"
    model_types = ("gpt_oss",)
    transformers_causal_lm = "GptOssForCausalLM"
    num_experts_key = "num_local_experts"
    top_k_key = "num_experts_per_tok"
    expert_intermediate_key = "intermediate_size"
    dense_intermediate_key = None
    # transformers loads gpt-oss checkpoints fused as they are: no conversion mapping to derive from.
    own_expert_patterns = (
        TensorPattern(r"mlp\.experts\.gate_up_proj", EXPERTS, "experts.gate_up_proj"),
        TensorPattern(r"mlp\.experts\.gate_up_proj_bias", EXPERT_BIAS, "experts.gate_up_proj_bias"),
        TensorPattern(r"mlp\.experts\.down_proj", EXPERTS, "experts.down_proj"),
        TensorPattern(r"mlp\.experts\.down_proj_bias", EXPERT_BIAS, "experts.down_proj_bias"),
    )
    router_patterns = (
        TensorPattern(r"mlp\.router\.weight", ROUTER_WEIGHT, "mlp.router.weight"),
        TensorPattern(r"mlp\.router\.bias", ROUTER_BIAS, "mlp.router.bias"),
    )
    routing = TOPK_SOFTMAX
    router_attribute = "router"
    router_expert_params = ("weight", "bias")
    expert_params = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
    gguf_arch = "gpt-oss"
    gguf_required_tensors = ((r"^blk\.\d+\.ffn_gate_inp\.bias$", "blk.N.ffn_gate_inp.bias tensors (router bias)"),)
    router_sentence = "The router keeps only the rows and biases of retained experts (expert biases likewise)"

    def unsupported_hint(self) -> str:
        return "only bf16/fp gpt-oss experts are supported; dequantize MXFP4 (*_blocks, *_scales) checkpoints first"

    def experts_unsupported(self, experts: Any) -> str | None:
        if getattr(experts, "_is_expert_parallel", False):
            return "experts with expert parallelism are not supported by the profiler"
        return None

    def expert_outputs_sorted(self, experts: Any, hidden_sorted: Any, counts: Any, use_grouped: bool) -> Any:
        # The eager algorithm of GptOssExperts: x @ W[e] + b[e], interleaved clamp-GLU, @ D[e] + d[e].
        output = hidden_sorted.new_empty((hidden_sorted.shape[0], experts.down_proj.shape[-1]),
                                         dtype=experts.down_proj.dtype)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            block = hidden_sorted[start : start + count]
            gate_up = block @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
            output[start : start + count] = (
                experts._apply_gate(gate_up) @ experts.down_proj[expert] + experts.down_proj_bias[expert]
            )
            start += count
        return output
