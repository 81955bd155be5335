"""Gemma 4 (``gemma4``, ``gemma4_text``): router and experts on the decoder layer itself.

On disk and in memory the experts are fused: ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I]. The router normalises the hidden state, projects it with
``router.proj`` [E, H], takes the softmax over all experts, the top-k, renormalises them and
multiplies each weight by ``router.per_expert_scale`` [E] of the chosen expert. Every layer is an
MoE layer unless ``enable_moe_block`` is false (then the model is dense). The config nests the
decoder under ``text_config``. llama.cpp calls the architecture ``gemma4`` and stores the
per-expert scale as ``blk.N.ffn_down_exps.scale``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moeprune.arch.base import SOFTMAX_TOPK, MoeArch, MoeModules
from moeprune.arch.patterns import EXPERT_SCALE, EXPERTS, ROUTER_WEIGHT, TensorPattern
from moeprune.patching import Patches


class Gemma4(MoeArch):
    name = "gemma4"
    family = "Gemma 4"
    model_types = ("gemma4", "gemma4_text")
    transformers_causal_lm = "Gemma4ForConditionalGeneration"

    num_experts_key = "num_experts"
    top_k_key = "top_k_experts"
    text_config_key = "text_config"

    # transformers loads Gemma 4 checkpoints fused as they are: no conversion mapping to derive from.
    own_expert_patterns = (
        TensorPattern(r"experts\.gate_up_proj", EXPERTS, "experts.gate_up_proj"),
        TensorPattern(r"experts\.down_proj", EXPERTS, "experts.down_proj"),
    )
    router_patterns = (
        TensorPattern(r"router\.proj\.weight", ROUTER_WEIGHT, "router.proj.weight"),
        TensorPattern(r"router\.per_expert_scale", EXPERT_SCALE, "router.per_expert_scale"),
    )
    experts_module_re = r"(?:^|\.)layers\.\d+\.experts\."
    layer_prefix = "model.language_model.layers."

    routing = SOFTMAX_TOPK
    router_attribute = "router"
    block_attribute = None
    router_expert_params = ("per_expert_scale",)
    relaxed_top_k_router = True

    gguf_arch = "gemma4"
    gguf_required_tensors = (
        (r"^blk\.\d+\.ffn_down_exps\.scale$", "blk.N.ffn_down_exps.scale tensors (router.per_expert_scale was not converted)"),
    )
    # convert_hf_to_gguf.py maps both through tensor_mapping (FFN_GATE_UP_EXP, FFN_DOWN_EXP) unchanged.
    gguf_expert_tensors = (
        ("experts.gate_up_proj", "blk.{layer}.ffn_gate_up_exps.weight"),
        ("experts.down_proj", "blk.{layer}.ffn_down_exps.weight"),
    )
    router_sentence = "The router `proj.weight` and `per_expert_scale` keep only the rows of retained experts"

    def dense_reason(self, config: Mapping[str, Any]) -> str | None:
        if self.text_config(config).get("enable_moe_block") is False:
            return "enable_moe_block is false: this model has no expert layers"
        return None

    def unsupported_hint(self) -> str:
        return ("only fused bf16/fp experts.gate_up_proj, experts.down_proj are supported; quantized or "
                "per-expert split checkpoints must be converted first")

    def moe_modules(self, model: Any) -> list[MoeModules]:
        # Every decoder layer with ``router`` (with its per-expert scale) and fused ``experts``.
        found: list[MoeModules] = []
        for name, module in model.named_modules():
            experts = getattr(module, "experts", None)
            router = getattr(module, "router", None)
            if experts is None or router is None:
                continue
            if not all(hasattr(experts, attr) for attr in ("gate_up_proj", "down_proj", "num_experts")):
                continue
            if not hasattr(router, "per_expert_scale"):
                continue
            layer_index = getattr(module, "layer_idx", None)
            if layer_index is None:
                layer_index = int(name.rsplit(".", 1)[-1]) if name.rsplit(".", 1)[-1].isdigit() else len(found)
            found.append(MoeModules(int(layer_index), router, experts, module))
        found.sort(key=lambda modules: modules.layer_index)
        return found

    def router_probabilities(self, router: Any, outputs: Any) -> Any:
        return outputs[0]  # the router returns its softmax probabilities first

    def route(self, router: Any, logits: Any, allowed: Any | None = None) -> tuple[Any, Any]:
        import torch

        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probabilities = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probabilities, k=router.config.top_k_experts, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * router.per_expert_scale[index], index

    def mask_router(self, patches: Patches, modules: MoeModules, dropped: Sequence[int]) -> None:
        # The router's logits come from ``router.proj``: -inf there for the dropped experts.
        import torch

        mask = torch.zeros(modules.router.proj.out_features)
        mask[list(dropped)] = float("-inf")

        def hook(_module, _inputs, output):
            return output + mask.to(output.dtype)

        patches.forward_hook(modules.router.proj, hook)

    def _slice_modules(self, modules: MoeModules, rows: Any, kept: int) -> None:
        from torch import nn

        experts, router = modules.experts, modules.router
        experts.gate_up_proj = nn.Parameter(experts.gate_up_proj.data[rows].clone(), requires_grad=False)
        experts.down_proj = nn.Parameter(experts.down_proj.data[rows].clone(), requires_grad=False)
        experts.num_experts = kept
        router.proj.weight = nn.Parameter(router.proj.weight.data[rows].clone(), requires_grad=False)
        router.proj.out_features = kept
        router.per_expert_scale = nn.Parameter(router.per_expert_scale.data[rows].clone(), requires_grad=False)
