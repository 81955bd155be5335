"""Tiny random models of every supported MoE family, saved in their Hub on-disk layout.

Each is built with transformers' own classes (``save_pretrained`` writes the layout the Hub has,
e.g. one tensor per expert for Qwen3-MoE and DeepSeek-V3), with routers spread so routing is
decisive and every per-expert bias / scale differs. The tokenizer is GPT-2's byte-level BPE,
rebuilt from ``models/ggml-vocab-gpt-2.gguf`` of the pinned llama.cpp tree: the pinned converter
recognises its pre-tokenizer hash (the same as ``openai-community/gpt2``), so the GGUF conversion
and llama-server run end to end offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NUM_EXPERTS = 8
TOP_K = 2
NUM_LAYERS = 3
VOCAB_SIZE = 50257  # GPT-2's
CHAT_TEMPLATE = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)
COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=50256, eos_token_id=50256,
              pad_token_id=50256, tie_word_embeddings=False)
# Gated DeltaNet layers around one full-attention layer (Qwen3-Next, Qwen3.5).
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8)
# Multi-head latent attention (DeepSeek, GLM Lite / DSA); llama.cpp tells V2-Lite (no q-LoRA) by its layer count.
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)


@dataclass(frozen=True)
class Family:
    name: str  # the adapter's name
    config_class: str
    kwargs: dict[str, Any]
    moe_layers: tuple[int, ...]
    keep: int  # experts kept per MoE layer in the chain
    extra_tokens: tuple[str, ...] = ()  # special tokens the family's GGUF vocab code looks up
    nested: dict[str, Any] | None = None  # multimodal config: kwargs go to text_config, these beside it
    # "safetensors only" in the chain: the pinned converter's error on this tiny model (a regex) and why
    no_gguf: tuple[str, str] | None = None
    # streamed replay refuses (and says to use "whole"): the model carries state from layer to layer
    streamed: bool = True


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("qwen3_moe", "Qwen3MoeConfig", dict(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64,
                                                   moe_intermediate_size=16, head_dim=8, norm_topk_prob=True), (0, 1, 2), 5),
        Family("qwen2_moe", "Qwen2MoeConfig", dict(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64,
                                                   moe_intermediate_size=16, shared_expert_intermediate_size=32), (0, 1, 2), 5),
        Family("mixtral", "MixtralConfig", dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                                                intermediate_size=16, head_dim=8), (0, 1, 2), 5),
        # OLMoE has no grouped-query attention (llama.cpp sizes its k-norm by the hidden size).
        Family("olmoe", "OlmoeConfig", dict(num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=16,
                                            num_key_value_heads=4),
               (0, 1, 2), 5),
        Family("deepseek_v3", "DeepseekV3Config", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
            routed_scaling_factor=2.5), (1, 2), 6),
        Family("deepseek_v2", "DeepseekV2Config", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
            # llama.cpp tells V2-Lite (no q-LoRA) by its 26-27 layers; a 3-layer model needs q_lora_rank.
            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
            num_key_value_heads=4, routed_scaling_factor=1.0), (1, 2), 5),
        Family("glm4_moe", "Glm4MoeConfig", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8), (1, 2), 6,
            ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")),
        Family("gpt_oss", "GptOssConfig", dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                                               intermediate_size=16, head_dim=8, sliding_window=16,
                                               layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
               (0, 1, 2), 5),
        Family("qwen3_5_moe", "Qwen3_5MoeConfig", dict(
            num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=16, shared_expert_intermediate_size=32,
            head_dim=8, **LINEAR_ATTENTION), (0, 1, 2), 5,
            nested=dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32)),
            no_gguf=("BPE pre-tokenizer was not recognized",
                     "transformers 5.23 reads any qwen3_5_moe tokenizer as Qwen3_5Tokenizer (Qwen's pre-tokenizer), so "
                     "the offline GPT-2 test vocabulary hashes to a pre-tokenizer the pinned converter does not know")),
        Family("qwen3_next", "Qwen3NextConfig", dict(
            num_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, head_dim=8, **LINEAR_ATTENTION), (0, 1, 2), 5),
        # MiniMax-M2's Hub config states rotary_dim and scoring_func (the converter reads both).
        Family("minimax_m2", "MiniMaxM2Config", dict(num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K,
                                                     intermediate_size=16, head_dim=8, rotary_dim=8, scoring_func="sigmoid"),
               (0, 1, 2), 5),
        # Hunyuan-A13B states top-k, expert width and shared experts per layer (lists).
        Family("hunyuan_v1_moe", "HunYuanMoEV1Config", dict(
            num_experts=NUM_EXPERTS, moe_topk=[TOP_K] * NUM_LAYERS, intermediate_size=16,
            moe_intermediate_size=[16] * NUM_LAYERS, num_shared_expert=[1] * NUM_LAYERS, head_dim=8), (0, 1, 2), 5,
            no_gguf=("has no attribute mergeable_ranks",
                     "the pinned converter reads Hunyuan's own tiktoken tokenizer (remote code, mergeable_ranks), "
                     "which no offline test model can carry")),
        Family("glm_moe_dsa", "GlmMoeDsaConfig", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, **MLA, index_topk=64,
            index_n_heads=2, index_head_dim=64), (1, 2), 6,  # llama.cpp rotates indexer heads in blocks of 64
            ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
            streamed=False),  # the DSA indexer's top-k is shared between layers
        Family("glm4_moe_lite", "Glm4MoeLiteConfig", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, **MLA), (1, 2), 6,
            ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")),
        Family("dots1", "Dots1Config", dict(
            n_routed_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, intermediate_size=64, moe_intermediate_size=16,
            n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8,
            num_key_value_heads=4, scoring_func="sigmoid"), (1, 2), 6),  # as dots.llm1: no GQA, scoring_func stated
    ]
}


class Lazy(Mapping[str, Any]):
    """name -> value, each made by ``make(name)`` on first access and kept: a session fixture over
    every family then costs only the families the selected tests use."""

    def __init__(self, names: Iterable[str], make: Callable[[str], Any]) -> None:
        self._names = tuple(names)
        self._make = make
        self._made: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._made:
            self._made[name] = self._make(name)
        return self._made[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def vocab_size(model_dir: Path) -> int:
    """The text model's vocabulary size (nested under ``text_config`` in multimodal families)."""
    from moeprune.arch import inspect

    return int(inspect(model_dir).text_config()["vocab_size"])


def gpt2_vocab(llama_cpp_root: Path) -> dict[str, list[str]]:
    """GPT-2's tokens and merges, read from the pinned tree's ``models/ggml-vocab-gpt-2.gguf``."""
    vocab_file = llama_cpp_root / "models" / "ggml-vocab-gpt-2.gguf"
    script = (
        "import json, sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\n"
        "json.dump({k: r.get_field('tokenizer.ggml.' + k).contents() for k in ('tokens', 'merges')}, sys.stdout)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_root / "gguf-py"), "NO_LOCAL_GGUF": "1"}
    dumped = subprocess.run([sys.executable, "-c", script, str(vocab_file)], capture_output=True, text=True,
                            env=env, check=True)
    return json.loads(dumped.stdout)


def write_gpt2_tokenizer(vocab: dict[str, list[str]], out_dir: Path, extra_tokens: tuple[str, ...] = ()) -> Path:
    """Write GPT-2's tokenizer (plus ``extra_tokens`` as added special tokens) into ``out_dir``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab["tokens"])},
                     merges=[tuple(m.split(" ", 1)) for m in vocab["merges"]])
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<|endoftext|>", *extra_tokens)])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "model_max_length": 256,
        "add_bos_token": False,
    }, indent=2))
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir


def build_family_model(name: str, out_dir: Path, vocab: dict[str, list[str]], seed: int = 0) -> Path:
    """Save a tiny random ``name`` model (float32, Hub layout) with the GPT-2 tokenizer files."""
    import torch
    import transformers

    from moeprune.arch import arch_for_config, arch_for_model

    family = FAMILIES[name]
    settings = {**COMMON, **family.kwargs, "vocab_size": VOCAB_SIZE + len(family.extra_tokens)}
    if family.nested is not None:
        settings = {"text_config": settings, "tie_word_embeddings": False, **family.nested}
    config = getattr(transformers, family.config_class)(**settings)
    torch.manual_seed(seed)
    causal_lm = arch_for_config(config.to_dict()).transformers_causal_lm
    model = getattr(transformers, causal_lm)._from_config(config).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for modules in arch_for_model(model).moe_modules(model):
            router, experts = modules.router, modules.experts
            for attribute, value in [*router.named_parameters(), *router.named_buffers(),
                                     ("e_score_correction_bias", getattr(modules.block, "e_score_correction_bias", None))]:
                if value is None:
                    continue
                # the router's rows spread widely (decisive routing); every bias differs per expert
                spread = 1.0 if attribute.endswith("weight") and value.dim() == 2 else 0.3
                value.copy_(spread * torch.randn(value.shape, generator=generator))
            for attribute in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
                value = getattr(experts, attribute, None)
                if value is not None:
                    value.copy_(0.2 * torch.randn(value.shape, generator=generator))
    model.save_pretrained(out_dir)
    write_gpt2_tokenizer(vocab, out_dir, family.extra_tokens)
    return out_dir
