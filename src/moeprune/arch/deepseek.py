"""DeepSeek-V3 (``deepseek_v3``), GLM-4.5-MoE (``glm4_moe``, the same router) and DeepSeek-V2 (``deepseek_v2``).

Hub layout: ``mlp.experts.{i}.{gate,up,down}_proj.weight`` per routed expert, router
``mlp.gate.weight`` [E, H], and for V3/GLM the selection bias ``mlp.gate.e_score_correction_bias``
[E]; ``mlp.shared_experts.*`` serve every token and are never sliced. The first
``first_k_dense_replace`` layers are dense. The count is ``n_routed_experts``.

V3/GLM routing: sigmoid scores; the choice adds the correction bias, keeps the ``topk_group`` best
of ``n_group`` expert groups (a group's score is the sum of its two best), then the top-k; the
weights are the chosen experts' sigmoid scores, renormalised when ``norm_topk_prob``, times
``routed_scaling_factor``. V2: softmax, ``greedy`` or ``group_limited_greedy`` (group score =
its best expert). Groups are contiguous blocks of E / n_group experts, so a pruned model keeps its
routing only if every group keeps the same number of experts (and, for V3, at least two).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moeprune.arch.base import SIGMOID_GROUPED, SOFTMAX_TOPK, ArchError, MoeArch
from moeprune.arch.patterns import CORRECTION_BIAS, ROUTER_WEIGHT, TensorPattern


class DeepseekV3(MoeArch):
    name = "deepseek_v3"
    family = "DeepSeek-V3"
    model_types = ("deepseek_v3",)
    transformers_causal_lm = "DeepseekV3ForCausalLM"
    num_experts_key = "n_routed_experts"
    top_k_key = "num_experts_per_tok"
    expert_intermediate_key = "moe_intermediate_size"
    dense_intermediate_key = "intermediate_size"  # the dense first layers
    router_patterns = (
        TensorPattern(r"mlp\.gate\.weight", ROUTER_WEIGHT, "mlp.gate.weight"),
        TensorPattern(r"mlp\.gate\.e_score_correction_bias", CORRECTION_BIAS, "mlp.gate.e_score_correction_bias"),
    )
    never_sliced_re = r"\.mlp\.shared_experts\."
    routing = SIGMOID_GROUPED
    router_expert_params = ("weight", "e_score_correction_bias")
    gguf_arch = "deepseek2"
    gguf_required_tensors = ((r"^blk\.\d+\.exp_probs_b\.bias$", "blk.N.exp_probs_b.bias tensors (e_score_correction_bias)"),)
    router_sentence = ("The router keeps only the rows and correction-bias entries of retained experts (shared "
                       "experts and the dense first layers are unchanged)")
    grouped_needs_two = True  # a group's score sums its two best experts

    def is_moe_layer(self, config: Mapping[str, Any], layer: int) -> bool:
        text = self.text_config(config)
        return layer >= int(text.get("first_k_dense_replace") or 0)

    def routing_groups(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        text = self.text_config(config)
        groups, topk_group = self._group_keys(text)
        return groups, topk_group, 2 if groups > 1 and self.grouped_needs_two else 1

    def _group_keys(self, text: Mapping[str, Any]) -> tuple[int, int]:
        return int(text.get("n_group") or 1), int(text.get("topk_group") or 1)

    def check_drop_map(self, drop_map: Any, config: Mapping[str, Any], source: Path | str) -> None:
        groups, topk_group, _ = self.routing_groups(config)
        num_experts = int(drop_map["num_experts"])
        top_k = int(drop_map["top_k"])
        size = num_experts // groups
        for entry in drop_map["layers"]:
            per_group = [sum(1 for i in entry["keep"] if i // size == g) for g in range(groups)]
            if len(set(per_group)) != 1:
                raise ArchError(
                    f"{source}: layer {entry['layer']} keeps {per_group} experts in its {groups} routing groups "
                    f"({self.family} routes by groups of {size}): every group must keep the same number; make the drop map with "
                    "`invoke dropmap` (every strategy keeps the groups balanced) or balance this keep set"
                )
            kept = per_group[0]
            if groups > 1 and self.grouped_needs_two and kept < 2:
                raise ArchError(f"{source}: layer {entry['layer']} keeps {kept} expert per routing group; "
                                f"{self.family} scores a group by its two best experts: keep at least 2 per group")
            if groups > 1 and kept * topk_group < top_k:
                raise ArchError(f"{source}: layer {entry['layer']} keeps {kept} per group x topk_group {topk_group} "
                                f"< top-k {top_k}: the router could not choose {top_k} experts")

    def router_probabilities(self, router: Any, outputs: Any) -> Any:
        import torch

        return torch.sigmoid(outputs[0].float())

    def route(self, router: Any, logits: Any, allowed: Any | None = None) -> tuple[Any, Any]:
        import torch

        num_experts = logits.shape[-1]
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        groups = router.num_group
        group_scores = choice.view(-1, groups, num_experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
        group_index = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index


class Glm4Moe(DeepseekV3):
    name = "glm4_moe"
    family = "GLM-4.5-MoE"
    model_types = ("glm4_moe",)
    transformers_causal_lm = "Glm4MoeForCausalLM"
    gguf_arch = "glm4moe"


class DeepseekV2(DeepseekV3):
    name = "deepseek_v2"
    family = "DeepSeek-V2"
    model_types = ("deepseek_v2",)
    transformers_causal_lm = "DeepseekV2ForCausalLM"
    router_patterns = (TensorPattern(r"mlp\.gate\.weight", ROUTER_WEIGHT, "mlp.gate.weight"),)
    routing = SOFTMAX_TOPK
    router_expert_params = ("weight",)
    gguf_required_tensors = ()
    router_sentence = ("The router keeps only the rows of retained experts (shared experts and the dense first "
                       "layers are unchanged)")
    grouped_needs_two = False

    def _group_keys(self, text: Mapping[str, Any]) -> tuple[int, int]:
        if text.get("topk_method", "greedy") != "group_limited_greedy":
            return 1, 1
        return int(text.get("n_group") or 1), int(text.get("topk_group") or 1)

    def router_probabilities(self, router: Any, outputs: Any) -> Any:
        import torch

        return torch.softmax(outputs[0].float(), dim=-1)

    def route(self, router: Any, logits: Any, allowed: Any | None = None) -> tuple[Any, Any]:
        import torch

        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if router.topk_method == "group_limited_greedy":
            num_experts = scores.shape[-1]
            groups = router.num_group
            group_scores = scores.view(-1, groups, num_experts // groups).max(dim=-1).values
            group_index = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_index, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, groups, num_experts // groups).reshape(-1, num_experts)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, index = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, index
