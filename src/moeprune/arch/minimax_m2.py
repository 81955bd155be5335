"""MiniMax-M2 (``minimax_m2``): Mixtral's layout with a sigmoid router and a selection bias.

Hub layout: ``block_sparse_moe.experts.{i}.w1/w2/w3.weight`` per expert (from transformers'
conversion mapping, which renames ``block_sparse_moe`` to ``mlp`` in memory), router
``block_sparse_moe.gate.weight`` [E, H] and the selection-only bias
``block_sparse_moe.e_score_correction_bias`` [E], held by the MoE block (not the router) and
passed to the router's forward. Routing: sigmoid scores; the choice adds the bias and takes the
top-k; the weights are the chosen experts' sigmoid scores, renormalised. llama.cpp calls it
``minimax-m2`` and stores the bias as ``blk.N.exp_probs_b.bias``.
"""

from __future__ import annotations

from typing import Any

from moeprune.arch.base import SIGMOID_BIASED, MoeModules
from moeprune.arch.mixtral import Mixtral
from moeprune.arch.modules import keep_rows
from moeprune.arch.patterns import CORRECTION_BIAS, ROUTER_WEIGHT, TensorPattern


class MiniMaxM2(Mixtral):
    """Mixtral's config keys and expert layout; its own router, routing and GGUF name."""

    name = "minimax_m2"
    family = "MiniMax-M2"
    model_types = ("minimax_m2",)
    transformers_causal_lm = "MiniMaxM2ForCausalLM"
    router_patterns = (
        TensorPattern(r"block_sparse_moe\.gate\.weight", ROUTER_WEIGHT, "block_sparse_moe.gate.weight"),
        TensorPattern(r"block_sparse_moe\.e_score_correction_bias", CORRECTION_BIAS,
                      "block_sparse_moe.e_score_correction_bias"),
    )
    routing = SIGMOID_BIASED
    gguf_arch = "minimax-m2"
    gguf_required_tensors = ((r"^blk\.\d+\.exp_probs_b\.bias$", "blk.N.exp_probs_b.bias tensors (e_score_correction_bias)"),)
    router_sentence = "The router keeps only the rows and selection-bias entries of retained experts"

    def router_probabilities(self, router: Any, outputs: Any) -> Any:
        import torch

        return torch.sigmoid(outputs[0].float())

    def route(self, router: Any, logits: Any, allowed: Any | None = None,
              e_score_correction_bias: Any | None = None) -> tuple[Any, Any]:
        import torch

        scores = torch.sigmoid(logits.float())
        choice = scores + e_score_correction_bias
        if allowed is not None:
            choice = choice.masked_fill(~allowed, float("-inf"))
        index = torch.topk(choice, router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        return weights / weights.sum(dim=-1, keepdim=True), index

    def _slice_modules(self, modules: MoeModules, rows: Any, kept: int) -> None:
        super()._slice_modules(modules, rows, kept)
        keep_rows(modules.block, "e_score_correction_bias", rows)
