"""Random bf16 weights for a transformers config, written as safetensors shards one group at a time.

The benches that need a model at the reference's real shapes (``profile_memory.py``,
``scale_rehearsal.py``) cannot instantiate it: 26B-A4B is ~50 GB in bf16. They build the model on
the meta device for its tensor names and shapes, then write one shard per decoder layer (plus one
for everything outside the layers: embeddings, final norm, towers), so the writer never holds more
than one layer. The names are the model's ``state_dict`` names, which is the Hub layout for
families whose transformers class has no checkpoint conversion mapping (Gemma 4 has none).

Values: norms and scales 1 (a real model's are near it), routers ``N(0, 1)`` (routing as decisive as
a trained router's), everything else ``N(0, 0.02^2)``; one generator seeded once, in name order, so
the same config writes the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _group(name: str) -> str:
    """Shard group of a tensor: its decoder layer's index within the language model, else 'shell'."""
    if ".language_model.layers." in name or name.startswith("model.layers."):
        return name.split(".layers.")[1].split(".")[0]
    return "shell"


def _value(name: str, shape: Any, generator: Any) -> Any:
    import torch

    if name.endswith(("norm.weight", "scale", "layer_scalar")) or "layernorm" in name:
        return torch.ones(shape)
    if name.endswith("router.proj.weight"):
        return torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) * 0.02


def write_random_shards(model_class: Any, config: Any, directory: Path, seed: int = 0) -> dict[str, int]:
    """Write ``model_class(config)``'s tensors (tied ``lm_head`` excluded) as bf16 shards under ``directory``.

    Returns {shard file name: bytes}. ``config.json`` is written last, by the caller, to mark the
    directory complete.
    """
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = model_class(config)
    shapes = {name: tensor.shape for name, tensor in model.state_dict().items() if not name.startswith("lm_head")}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(_group(name), []).append(name)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for index, members in enumerate(groups.values()):
        tensors = {name: _value(name, shapes[name], generator).to(torch.bfloat16).contiguous() for name in members}
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        sizes[shard] = (directory / shard).stat().st_size
        del tensors
    total = sum(int(torch.Size(shapes[n]).numel()) * 2 for n in weight_map)
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=1))
    return sizes
