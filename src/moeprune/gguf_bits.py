"""A GGUF's effective bits per weight and the tensors llama-quantize gave another type, from the file.

A quant type's name understates what a file costs: llama-quantize keeps norms in F32, gives some
layers more bits, and falls back from a 256-block k-quant to a 32-block type for tensors whose rows
do not divide (the reference model's 704-wide ``ffn_down_exps`` and 2112-wide ``ffn_down``: Q4_K ->
Q5_0, Q6_K -> Q8_0; :func:`moeprune.plan.ggml.fallback_type`). The card states both, read from the
published file itself (its tensor types, element counts and stored bytes) so they cannot drift from
it; the quantize record's fallback list is cross-checked against the file's tensor types.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError


@dataclass(frozen=True)
class GgufBits:
    """The tensor data of one GGUF: weights (elements of every tensor), bytes and each tensor's type."""

    weights: int
    tensor_bytes: int
    tensor_types: dict[str, str]  # GGUF tensor name -> type name (Q4_K, F32, ...)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bits / weights over every tensor (norms and embeddings included; metadata not)."""
        return 8 * self.tensor_bytes / self.weights


def read_gguf_bits(path: Path, shown: str) -> GgufBits:
    """Read ``path``'s tensor table (no tensor data is read); ``shown`` names it in errors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise MoepruneError(f"{shown}: not a readable GGUF ({type(exc).__name__}: {exc}); "
                            "re-run the stage that wrote it") from None
    tensors = list(reader.tensors)
    weights = sum(int(t.n_elements) for t in tensors)
    if weights == 0:
        raise MoepruneError(f"{shown}: a GGUF with no tensor elements; re-run the stage that wrote it")
    return GgufBits(weights=weights, tensor_bytes=sum(int(t.n_bytes) for t in tensors),
                    tensor_types={t.name: t.tensor_type.name for t in tensors})


def fallback_counts(fallbacks: list[dict[str, Any]], bits: GgufBits | None, shown: str) -> dict[tuple[str, str], int]:
    """{(requested type, actual type): tensors} of a quantize record's ``fallbacks.tensors``, each
    checked against the GGUF's own tensor types when the file is at hand (``bits``; a record that
    disagrees with its file is an error)."""
    counts: Counter[tuple[str, str]] = Counter()
    for entry in fallbacks:
        name, requested, actual = entry["tensor"], entry["requested_type"].upper(), entry["actual_type"].upper()
        counts[(requested, actual)] += 1
        if bits is None:
            continue
        found = bits.tensor_types.get(name)
        if found is None:
            raise MoepruneError(f"{shown}: its quantize record lists a fallback for {name}, a tensor the GGUF does not have")
        if found.upper() != actual:
            raise MoepruneError(f"{shown}: its quantize record says {name} fell back to {actual}, the GGUF stores it "
                                f"as {found}")
    return dict(sorted(counts.items()))
