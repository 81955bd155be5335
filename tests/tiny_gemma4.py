"""The one tiny random Gemma 4 MoE the tests share (the demo model's family at toy sizes).

Four decoder layers (three sliding-window, one full-attention, as Gemma 4 alternates them), 16
experts with top-2 routing, no per-layer inputs, text only. Tests that need other sizes pass
overrides of the text config; a test that needs Gemma 4's real layout (a vision tower, 128
experts) builds that on purpose (``tests/test_streamed.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NUM_LAYERS = 4
NUM_EXPERTS = 16
TOP_K = 2
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, global_head_dim=64, enable_moe_block=True, num_experts=NUM_EXPERTS,
    top_k_experts=TOP_K, moe_intermediate_size=32, hidden_size_per_layer_input=0, sliding_window=64,
    layer_types=["sliding_attention"] * (NUM_LAYERS - 1) + ["full_attention"],
)


def tiny_gemma4_config(**text_overrides: Any):
    """``Gemma4Config`` of the tiny model; ``text_overrides`` replace text-config fields."""
    from transformers import Gemma4Config, Gemma4TextConfig

    text = Gemma4TextConfig(**{**TEXT_CONFIG, **text_overrides})
    return Gemma4Config(text_config=text, vision_config=None, audio_config=None)


def tiny_gemma4_model(seed: int = 0, **text_overrides: Any):
    """The tiny model with random weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.Gemma4ForConditionalGeneration(tiny_gemma4_config(**text_overrides)).eval()


def save_tiny_gemma4(out_dir: Path, seed: int = 0, max_shard_size: str | None = None, **text_overrides: Any) -> Path:
    """Save the tiny model (safetensors, sharded when ``max_shard_size`` is given) into ``out_dir``."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_gemma4_model(seed, **text_overrides).save_pretrained(out_dir, **kwargs)
    return out_dir
