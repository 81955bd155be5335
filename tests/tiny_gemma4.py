"""The one tiny random Gemma 4 MoE the tests share (the demo model's family at toy sizes).

Four decoder layers (three sliding-window, one full-attention, as Gemma 4 alternates them), 16
experts with top-2 routing, no per-layer inputs, text only unless ``vision=True`` (then with a
tiny vision tower, :data:`VISION_CONFIG`, that the pinned converter's ``--mmproj`` and llama-server's
mtmd take as is: no vision dimension has to be real-sized). Tests that need other sizes pass
overrides of the text config; a test that needs Gemma 4's real layout (128 experts) builds that on
purpose (``tests/test_streamed.py``).
"""

from __future__ import annotations

import json
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


VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
    head_dim=16, patch_size=4, position_embedding_size=64,
)
# What the converter's --mmproj reads besides config.json (the image normalisation), as Gemma 4's
# processor_config.json nests it.
PROCESSOR_CONFIG: dict[str, Any] = {"image_processor": {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}}


def tiny_gemma4_config(vision: bool = False, **text_overrides: Any):
    """``Gemma4Config`` of the tiny model; ``text_overrides`` replace text-config fields."""
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig

    text = Gemma4TextConfig(**{**TEXT_CONFIG, **text_overrides})
    return Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(**VISION_CONFIG) if vision else None,
                        audio_config=None)


def tiny_gemma4_model(seed: int = 0, vision: bool = False, **text_overrides: Any):
    """The tiny model with random weights drawn after ``torch.manual_seed(seed)``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    return transformers.Gemma4ForConditionalGeneration(tiny_gemma4_config(vision, **text_overrides)).eval()


def save_tiny_gemma4(out_dir: Path, seed: int = 0, max_shard_size: str | None = None, vision: bool = False,
                     **text_overrides: Any) -> Path:
    """Save the tiny model (safetensors, sharded when ``max_shard_size`` is given) into ``out_dir``."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    tiny_gemma4_model(seed, vision, **text_overrides).save_pretrained(out_dir, **kwargs)
    if vision:
        (out_dir / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG))
    return out_dir


def save_servable_tiny_gemma4(out_dir: Path, vision: bool = False, **kwargs: Any) -> Path:
    """The tiny model with the committed demo's Gemma-4-format tokenizer and chat template, so that
    the pinned converter and llama-server take it (its vocabulary is the demo's)."""
    import shutil

    from moeprune.demo import MODEL_DIR

    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(MODEL_DIR / name, out_dir / name)
    vocab_size = json.loads((MODEL_DIR / "config.json").read_text())["text_config"]["vocab_size"]
    return save_tiny_gemma4(out_dir, vision=vision, vocab_size=vocab_size, **kwargs)
