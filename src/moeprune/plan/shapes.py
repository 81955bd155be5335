"""A model's tensor shapes, without its weights, and the GGUF tensors the converter makes of them.

A base on disk (a local directory or the HF cache) is read from its safetensors headers. A Hub
base that is not downloaded yet is planned from a pinned config shipped under ``plan/known/``
(``<org>--<name>.json``: its ``config.json``, the dtype it is published in, and its provenance):
the tensors are those of its own transformers class built on the ``meta`` device from that config
(no weights), so ``invoke check`` can say what the reference run needs before its 50 GB download.
The config is used for the plan only; no published number comes from it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.plan.ggml import GgufTensor

KNOWN_DIR = Path(__file__).parent / "known"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
# Towers the text GGUF does not contain (the converter keeps the language model only).
_TOWER = re.compile(r"vision|audio|multi_modal_projector|embed_vision|embed_audio|mm_")


@dataclass(frozen=True)
class HfTensor:
    name: str
    dtype: str  # safetensors dtype: BF16, F32, ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class ModelShapes:
    """Config and tensor shapes of a checkpoint; ``source`` says where they were read."""

    config: dict[str, Any]
    tensors: tuple[HfTensor, ...]
    source: str

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about the model beyond its tensors."""

    num_layers: int
    num_experts: int
    moe_layers: tuple[int, ...]


def model_facts(config: Mapping[str, Any]) -> ModelFacts:
    """The model facts the plan reads, all from the model's :class:`~moeprune.arch.ModelSpec`."""
    from moeprune.arch.spec import ModelSpec

    spec = ModelSpec.from_config(config)
    return ModelFacts(spec.num_layers or 0, spec.num_experts, tuple(spec.moe_layers))


def read_shapes(model_dir: Path) -> ModelShapes:
    """Shapes from ``config.json`` and the safetensors headers of ``model_dir`` (no tensor read)."""
    from moeprune.arch import inspect
    from moeprune.io.checkpoint import Checkpoint

    config = inspect(model_dir, "model config.json").config
    with Checkpoint.open(model_dir) as checkpoint:
        tensors = tuple(HfTensor(i.name, i.dtype, tuple(i.shape)) for i in checkpoint.tensors())
    return ModelShapes(config, tensors, f"safetensors headers of {model_dir}")


def known_path(hub_id: str) -> Path:
    return KNOWN_DIR / f"{hub_id.replace('/', '--')}.json"


def known_shapes(hub_id: str) -> ModelShapes | None:
    """The shapes of ``hub_id`` from its pinned config (see the module docstring), or None."""
    path = known_path(hub_id)
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return shapes_from_config(data["config"], data["dtype"],
                              f"pinned config {path.name} ({data['provenance']['summary']})")


def shapes_from_config(config: dict[str, Any], dtype: str, source: str) -> ModelShapes:
    """Every tensor a checkpoint of ``config`` holds, in ``dtype`` (its transformers class on the
    ``meta`` device: :func:`moeprune.arch.spec.meta_tensor_shapes`)."""
    from moeprune.arch.spec import meta_tensor_shapes

    tensors = tuple(HfTensor(name, dtype, shape) for name, shape in meta_tensor_shapes(config))
    return ModelShapes(config, tensors, source)


# --- the converter's view ------------------------------------------------------------------------
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_ROLES: tuple[tuple[str, str], ...] = (
    # (regex on the name after "layers.N.", GGUF role); the first match wins.
    (r"experts.*(?:gate_up_proj)", "ffn_gate_up_exps"),
    (r"experts.*(?:down_proj|\.w2\b|down)", "ffn_down_exps"),
    (r"experts.*(?:gate_proj|\.w1\b)", "ffn_gate_exps"),
    (r"experts.*(?:up_proj|\.w3\b)", "ffn_up_exps"),
    (r"shared_experts?\..*down", "ffn_down_shexp"),
    (r"shared_experts?\..*gate", "ffn_gate_shexp"),
    (r"shared_experts?\..*up", "ffn_up_shexp"),
    (r"router\.(?:proj\.)?weight$|mlp\.gate\.weight$|block_sparse_moe\.gate\.weight$", "ffn_gate_inp"),
    (r"down_proj", "ffn_down"),
    (r"gate_proj", "ffn_gate"),
    (r"up_proj", "ffn_up"),
    (r"qkv_proj", "attn_qkv"),
    (r"q_proj\.weight$", "attn_q"),
    (r"k_proj\.weight$", "attn_k"),
    (r"v_proj\.weight$", "attn_v"),
    (r"o_proj\.weight$", "attn_output"),
)


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name (enough of it for llama-quantize's rules) of a checkpoint tensor; None for a
    tensor the text GGUF leaves out (vision / audio towers)."""
    if _TOWER.search(hf_name):
        return None
    if hf_name.endswith("lm_head.weight"):
        return "output.weight"
    if hf_name.endswith("embed_tokens.weight"):
        return "token_embd.weight"
    match = _LAYER.search(hf_name)
    if match is None:
        return f"{hf_name.rsplit('.', 1)[0]}.other_norm.weight" if hf_name.endswith("norm.weight") else hf_name
    layer, rest = match.groups()
    for pattern, role in _ROLES:
        if re.search(pattern, rest):
            return f"blk.{layer}.{role}.weight"
    return f"blk.{layer}.{rest}"


def gguf_tensors(shapes: ModelShapes, outtype: str) -> list[GgufTensor]:
    """The converted GGUF's tensors at ``outtype`` (f16/bf16/f32): 1-D tensors (norms, scales) and
    the router stay F32, as the pinned converter writes them."""
    out = []
    for tensor in shapes.tensors:
        name = gguf_name(tensor.name)
        if name is None:
            continue
        ndim = len(tensor.shape)
        keep_f32 = ndim < 2 or "ffn_gate_inp" in name
        out.append(GgufTensor(name, tensor.shape[-1] if tensor.shape else 1, tensor.numel, ndim,
                              "F32" if keep_f32 else outtype.upper()))
    return sorted(out, key=lambda t: _file_order(t.name))


def towers(config: Mapping[str, Any]) -> tuple[str, ...]:
    """The multimodal towers the config declares (the model's spec answers)."""
    from moeprune.arch.spec import ModelSpec

    return ModelSpec.from_config(config).towers


def has_vision_tower(config: Mapping[str, Any]) -> bool:
    return "vision" in towers(config)


def mmproj_tensors(shapes: ModelShapes, outtype: str) -> list[GgufTensor]:
    """The vision projector's tensors (``convert_hf_to_gguf.py --mmproj``) at ``outtype``: every
    vision tower tensor, with the audio tower's when the config has one; 1-D tensors and the
    position table stay F32, and a row the type's blocks cannot hold is written at F16."""
    from moeprune.arch.base import TOWER_MARKERS
    from moeprune.plan.ggml import TYPE_TRAITS

    has_audio = "audio" in towers(shapes.config)
    markers = [m for m in TOWER_MARKERS if "audio" not in m or has_audio]
    out = []
    for tensor in shapes.tensors:
        if not any(marker in tensor.name for marker in markers):
            continue
        ncols = tensor.shape[-1] if tensor.shape else 1
        gguf_type = outtype.upper()
        if len(tensor.shape) < 2 or "position_embedding" in tensor.name:
            gguf_type = "F32"
        elif ncols % TYPE_TRAITS[gguf_type][0]:
            gguf_type = "F16"
        out.append(GgufTensor(tensor.name, ncols, tensor.numel, len(tensor.shape), gguf_type))
    return out


def _file_order(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]) if parts[0] == "blk" and parts[1].isdigit() else -1, name)


_PER_EXPERT = re.compile(r"experts\.(\d+)\.")
_EXPERT_AXIS = re.compile(r"expert|router|gate")


def pruned_shapes(base: ModelShapes, num_experts: int, kept_by_layer: Mapping[int, int]) -> ModelShapes:
    """The shapes prune writes: in each layer of ``kept_by_layer``, tensors with a leading expert
    axis (fused experts, router rows, per-expert scales) keep that many rows, and one-tensor-per-
    expert checkpoints keep that many experts' tensors (prune keeps ``keep`` experts, renumbered
    0..kept-1)."""
    tensors = []
    for tensor in base.tensors:
        match = _LAYER.search(tensor.name)
        kept = kept_by_layer.get(int(match.group(1))) if match and not _TOWER.search(tensor.name) else None
        if kept is not None:
            per_expert = _PER_EXPERT.search(match.group(2))
            if per_expert is not None:
                if int(per_expert.group(1)) >= kept:
                    continue
            elif tensor.shape and tensor.shape[0] == num_experts and _EXPERT_AXIS.search(match.group(2)):
                tensor = HfTensor(tensor.name, tensor.dtype, (kept, *tensor.shape[1:]))
        tensors.append(tensor)
    return ModelShapes(base.config, tuple(tensors), f"{base.source}, pruned to the kept experts")


def n_gqa(tensors: Sequence[GgufTensor]) -> int:
    """Attention heads per KV head, from layer 0's q and k rows (llama-quantize reads layer 0)."""
    rows = {t.name: t.numel // t.ncols for t in tensors if t.name.startswith("blk.0.attn_")}
    q, k = rows.get("blk.0.attn_q.weight"), rows.get("blk.0.attn_k.weight")
    return max(1, q // k) if q and k else 1
