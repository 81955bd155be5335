"""An unquantized GGUF's expert tensors against the safetensors it claims to come from, bit for bit.

The family adapter names the GGUF tensor that holds each fused expert tensor of the checkpoint
(:attr:`moeprune.arch.base.MoeArch.gguf_expert_tensors`); the pinned converter writes them
unchanged in element order, so expert ``e`` of the GGUF tensor (``data[e]``) must be the bytes of
expert ``e`` of the checkpoint tensor:

- exactly, when the GGUF type equals the checkpoint's dtype (F32, F16, BF16);
- otherwise after the converter's own cast: the checkpoint's values as float32 (exact from F16 and
  BF16), then ``gguf.quants.quantize`` to the GGUF's type (F32: unchanged; F16: numpy's
  round-to-nearest-even; BF16: gguf's rounding).

Quantized GGUF types (Q8_0 and below) are not compared here: their chain is followed by record
(:mod:`moeprune.custody`). Large checkpoints are sampled (see :func:`experts_to_compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moeprune.errors import MoepruneError

UNQUANTIZED = ("F32", "F16", "BF16")
# Up to this many bytes of expert tensors a checkpoint is compared whole; above, a sample.
WHOLE_BELOW_BYTES = 256 * 1024**2
SAMPLED_PER_LAYER = 4
SAMPLE_RULE = (f"{SAMPLED_PER_LAYER} experts per layer, numpy.random.default_rng(layer).choice(num_experts, "
               f"{SAMPLED_PER_LAYER}, replace=False)")


@dataclass
class TensorMatch:
    compared: int = 0  # expert slices compared
    problems: list[str] = field(default_factory=list)
    how: list[str] = field(default_factory=list)


def experts_to_compare(num_experts: int, layer: int, whole: bool) -> list[int]:
    """Every expert of a small checkpoint; else :data:`SAMPLE_RULE` (seeded by the layer: reproducible)."""
    if whole or num_experts <= SAMPLED_PER_LAYER:
        return list(range(num_experts))
    return sorted(int(i) for i in np.random.default_rng(layer).choice(num_experts, SAMPLED_PER_LAYER, replace=False))


def _as_float32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return np.frombuffer(raw, dtype=np.float32)
    if dtype == "F16":
        return np.frombuffer(raw, dtype=np.float16).astype(np.float32)
    if dtype == "BF16":
        return (np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    raise MoepruneError(f"checkpoint dtype {dtype} is not compared with a GGUF (F32, F16 and BF16 are)")


def expected_bytes(raw: bytes, source_dtype: str, gguf_type: str) -> bytes:
    """What the converter writes for one expert's checkpoint bytes ``raw`` in a GGUF tensor of ``gguf_type``."""
    if source_dtype == gguf_type:
        return raw
    import gguf

    values = _as_float32(raw, source_dtype)
    return np.asarray(gguf.quants.quantize(values, gguf.GGMLQuantizationType[gguf_type])).tobytes()


def compare_gguf_experts(gguf_path: Path, checkpoint_dir: Path, shown: str) -> TensorMatch:
    """Compare the expert tensors of ``gguf_path`` with the checkpoint in ``checkpoint_dir``."""
    from gguf import GGUFReader

    from moeprune.arch import inspect
    from moeprune.arch.patterns import EXPERTS
    from moeprune.io.checkpoint import Checkpoint

    out = TensorMatch()
    arch = inspect(checkpoint_dir).adapter
    if not arch.gguf_expert_tensors:
        out.how.append(f"{arch.family}: its adapter names no GGUF expert tensors; not compared")
        return out
    names = dict(arch.gguf_expert_tensors)
    try:
        reader = GGUFReader(str(gguf_path))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        out.problems.append(f"{shown}: not a readable GGUF ({type(exc).__name__}: {exc})")
        return out
    tensors = {t.name: t for t in reader.tensors}
    with Checkpoint.open(checkpoint_dir) as checkpoint:
        pairs = []
        for info in checkpoint.tensors():
            found = arch.classify_tensor(info.name)
            if found is not None and found.role == EXPERTS and found.label in names:
                pairs.append((found.layer, info, names[found.label].format(layer=found.layer)))
        whole = sum(info.nbytes for _, info, _ in pairs) <= WHOLE_BELOW_BYTES
        out.how.append("every expert" if whole else SAMPLE_RULE)
        casts = set()
        for layer, info, gguf_name in sorted(pairs, key=lambda p: (p[0], p[2])):
            tensor = tensors.get(gguf_name)
            if tensor is None:
                out.problems.append(f"{shown}: no tensor {gguf_name} (expected for {info.name})")
                continue
            gguf_type = tensor.tensor_type.name
            if gguf_type not in UNQUANTIZED:
                out.how.append(f"{gguf_name} is {gguf_type}: not compared")
                continue
            data = tensor.data
            num_experts = info.shape[0]
            if data.shape[0] != num_experts:
                out.problems.append(f"{shown}: {gguf_name} holds {data.shape[0]} experts, {info.name} {num_experts}")
                continue
            row = info.row_nbytes()
            casts.add(f"{info.dtype}->{gguf_type}")
            differing = []
            for expert in experts_to_compare(num_experts, layer, whole):
                want = expected_bytes(checkpoint.read(info, expert * row, row), info.dtype, gguf_type)
                out.compared += 1
                if np.asarray(data[expert]).tobytes() != want:
                    differing.append(expert)
            if differing:
                out.problems.append(f"{shown}: {gguf_name} experts {differing} differ from {info.name} of "
                                    f"{checkpoint_dir.name}/ ({info.dtype} -> {gguf_type}): this GGUF does not hold "
                                    "these weights")
        out.how += [("bit for bit, " if cast.split("->")[0] == cast.split("->")[1] else "after the converter's cast ")
                    + cast for cast in sorted(casts)]
    return out


def describe(match: TensorMatch) -> str:
    return f"{match.compared} expert slices compared ({'; '.join(match.how)})"


__all__ = ["SAMPLE_RULE", "TensorMatch", "compare_gguf_experts", "describe", "experts_to_compare", "expected_bytes"]
