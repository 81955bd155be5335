"""llama.cpp's tensor types and llama-quantize's choice of a type per tensor, as pure functions.

Transcribed from the pinned llama.cpp (``ggml/src/ggml.c`` type traits; ``src/llama-quant.cpp``:
``tensor_allows_quantization``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``) for the
file types recipes use. The plan predicts a quantized GGUF's size with them, and the card explains
the fallbacks the quantize record lists (rows not a multiple of 256 cannot use k-quants: for
Q4_K_M a 704-wide expert ``ffn_down_exps`` becomes Q5_0, or Q8_0 where the layer gets more bits).

Tensors are described by their GGUF name (``blk.N.ffn_down_exps.weight``, ``token_embd.weight``),
their row length (``ncols``, ggml's ``ne[0]``: the last dimension of the safetensors shape) and
their element count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moeprune.errors import MoepruneError

# (block size in elements, bytes per block): ggml's type traits.
TYPE_TRAITS: dict[str, tuple[int, int]] = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
    "IQ4_NL": (32, 18), "IQ4_XS": (256, 136), "IQ3_S": (256, 110), "IQ3_XXS": (256, 98),
    "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ1_S": (256, 50), "IQ1_M": (256, 56),
    "TQ1_0": (256, 54), "TQ2_0": (256, 66),
}

# llama-quantize's file types (``llama_ftype_get_default_type``) this module has the rules of.
FTYPE_DEFAULT: dict[str, str] = {
    "F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K",
    "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS",
}

# ``tensor_type_fallback``: a 256-block type whose rows do not divide falls back to a 32-block one.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1",
             "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ3_XXS": "IQ4_NL", "IQ2_XXS": "IQ4_NL",
             "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL", "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL"}


class UnknownTypeError(MoepruneError):
    """A GGUF type whose size rules this module does not have."""


def tensor_bytes(gguf_type: str, numel: int, ncols: int) -> int:
    """Bytes of a tensor of ``numel`` elements in rows of ``ncols`` stored as ``gguf_type``."""
    try:
        block, size = TYPE_TRAITS[gguf_type.upper()]
    except KeyError:
        raise UnknownTypeError(f"GGUF type {gguf_type!r}: no size known (known: {', '.join(TYPE_TRAITS)})") from None
    if ncols % block:
        raise MoepruneError(f"a row of {ncols} elements cannot be stored as {gguf_type} (blocks of {block})")
    return numel // block * size


def fallback_type(target: str, ncols: int) -> str:
    """The type llama-quantize writes for a tensor it chose ``target`` for: ``target`` when the rows
    divide into its blocks, else its 32-block fallback, else F16 (``tensor_type_fallback``)."""
    block = TYPE_TRAITS[target][0]
    if ncols % block == 0:
        return target
    chosen = _FALLBACK.get(target, target if block <= 32 else None)
    if chosen is None:
        raise UnknownTypeError(f"llama-quantize defines no fallback for {target}")
    return chosen if ncols % TYPE_TRAITS[chosen][0] == 0 else "F16"


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a converted GGUF, as llama-quantize sees it."""

    name: str  # GGUF name, e.g. blk.3.ffn_down_exps.weight
    ncols: int  # ne[0]: elements per row
    numel: int
    ndim: int
    gguf_type: str  # its type in the converted file (F16, F32, ...)


@dataclass(frozen=True)
class QuantModel:
    """The hyper-parameters llama-quantize's rules read (``qs.model.hparams``)."""

    n_layer: int
    n_expert: int  # 0 or 1 for a dense model
    n_gqa: int  # attention heads per KV head (layer 0)


def _category(name: str) -> str:
    """``tensor_get_category``: the first of these substrings the name contains."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for part, category in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                           ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                           ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                           ("ffn_down", "ffn_down")):
        if part in name:
            return category
    return "other"


def allows_quantization(tensor: GgufTensor) -> bool:
    """``tensor_allows_quantization`` for the names a converted MoE text model has."""
    name = tensor.name
    if tensor.ndim < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    return not any(part in name for part in ("ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj",
                                             "position_embd", "token_types", "ssm_conv1d"))


def _layer(name: str) -> int:
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blk" or not parts[1].isdigit():
        raise MoepruneError(f"GGUF tensor {name}: no layer number (blk.N.)")
    return int(parts[1])


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _mixture_type(ftype: str, default: str, tensor: GgufTensor, category: str, model: QuantModel,
                  tied: bool, i_attention_wv: int, n_attention_wv: int, has_imatrix: bool) -> str:
    """``llama_tensor_get_type_impl`` for the file types of :data:`FTYPE_DEFAULT` (not its Falcon,
    70B and MXFP4 branches, which no supported family reaches)."""
    new = default
    if category == "output" or (tied and category == "token_embd"):
        if tensor.ncols % TYPE_TRAITS[default][0] != 0:
            return "Q8_0"
        return default if default == "Q8_0" else "Q6_K"
    if category == "token_embd":
        return new
    if category in ("attn_v", "attn_qkv", "attn_kv_b"):
        if ftype == "Q2_K":
            new = "Q4_K" if model.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q3_K_M":
            new = "Q5_K" if i_attention_wv < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            new = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4:
            new = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(i_attention_wv, n_attention_wv):
            new = "Q6_K"
        elif ftype == "Q4_K_S" and i_attention_wv < 4:
            new = "Q5_K"
        if model.n_expert == 8:
            new = "Q8_0"
        return new
    if category == "attn_k":
        return "Q8_0" if model.n_expert == 8 else new
    if category == "ffn_down":
        i_layer, n_layer = _layer(tensor.name), model.n_layer
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i_layer < n_layer // 16 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype == "Q4_K_M":
            return "Q6_K" if _use_more_bits(i_layer, n_layer) else new
        if i_layer < n_layer // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
            return "Q5_K"
        if ftype == "Q5_K_M" and _use_more_bits(i_layer, n_layer):
            return "Q6_K"
        if ftype == "Q4_K_S" and i_layer < n_layer // 8:
            return "Q5_K"
        if ftype in ("Q4_0", "Q5_0") and has_imatrix and i_layer < n_layer // 8:
            return "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return new
    if category == "attn_output":
        if model.n_expert == 8:
            return "Q5_K" if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS") else new
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, new)
    return new  # (llama.cpp's own attn_qkv branch is unreachable: attn_qkv is an attn_v category above)


def quantized_types(tensors: Sequence[GgufTensor], ftype: str, model: QuantModel,
                    has_imatrix: bool = False) -> list[str]:
    """The type llama-quantize writes for each tensor of ``tensors`` (in file order) for ``ftype``."""
    ftype = ftype.upper()
    if ftype not in FTYPE_DEFAULT:
        raise UnknownTypeError(f"quantize type {ftype!r}: the plan has no size rules for it "
                               f"(it has: {', '.join(FTYPE_DEFAULT)})")
    default = FTYPE_DEFAULT[ftype]
    quantized = default not in ("F32", "F16", "BF16")
    tied = not any(t.name == "output.weight" for t in tensors)
    categories = [_category(t.name) for t in tensors]
    n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in categories)
    i_attention_wv = 0
    types = []
    for tensor, category in zip(tensors, categories):
        if not allows_quantization(tensor):
            types.append(tensor.gguf_type)
            continue
        if not quantized:
            types.append(default)
            continue
        chosen = _mixture_type(ftype, default, tensor, category, model, tied, i_attention_wv, n_attention_wv,
                               has_imatrix)
        if category in ("attn_v", "attn_qkv", "attn_kv_b"):
            i_attention_wv += 1
        types.append(fallback_type(chosen, tensor.ncols))
    return types


def gguf_bytes(tensors: Sequence[GgufTensor], types: Sequence[str]) -> int:
    """Tensor data bytes of a GGUF whose tensors are stored as ``types`` (metadata not counted)."""
    return sum(tensor_bytes(t, tensor.numel, tensor.ncols) for tensor, t in zip(tensors, types))
