"""The reference model's file sizes as the run plan predicts them, against the seed card's.

The seed published google/gemma-4-26B-A4B-it pruned to 109 experts with "bf16 size | 50 GB |
42 GB" and "GGUF Q4_K_M size | 16 GB | 14 GB" (converted to f16, then llama-quantize Q4_K_M). The
plan computes the same files from shapes alone (the pinned config, :mod:`moeprune.plan.shapes`)
and llama-quantize's type rules with their fallbacks (:mod:`moeprune.plan.ggml`); this prints
both, with the tensor types each GGUF gets and its effective bits per weight.

    python bench/reference_sizes.py [--card PATH] [--kept 109]

``--card`` defaults to ``../shared/reference/gemma-4-A4B-109e-model-card.txt`` beside the
checkout; its two size rows are read from it, not typed in here.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HUB_ID = "google/gemma-4-26B-A4B-it"
CARD = ROOT.parent / "shared" / "reference" / "gemma-4-A4B-109e-model-card.txt"
ROWS = {"bf16": "bf16 size", "Q4_K_M": "GGUF Q4_K_M size"}


def card_sizes(card: Path) -> dict[str, tuple[str, str]]:
    """{row: (base, pruned)} as the card prints them, e.g. ("16 GB", "14 GB")."""
    text = card.read_text(encoding="utf-8")
    found = {}
    for key, label in ROWS.items():
        match = re.search(rf"^\| {re.escape(label)} \| ([^|]+?) \| ([^|]+?) \|", text, re.M)
        if match is None:
            raise SystemExit(f"{card}: no '| {label} | ... |' row")
        found[key] = match.groups()
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", type=Path, default=CARD)
    parser.add_argument("--kept", type=int, default=109, help="experts kept per MoE layer")
    args = parser.parse_args()
    from moeprune.plan.gather import quant_model
    from moeprune.plan.ggml import gguf_bytes, quantized_types
    from moeprune.plan.shapes import gguf_tensors, known_shapes, model_facts, pruned_shapes

    seed = card_sizes(args.card)
    base = known_shapes(HUB_ID)
    facts = model_facts(base.config)
    pruned = pruned_shapes(base, facts.num_experts, dict.fromkeys(facts.moe_layers, args.kept))
    print(f"shapes: {base.source}")
    print(f"{'file':<34}{'base':>12}{'pruned':>12}   seed card (base, pruned)")
    sizes = [t.total_bytes for t in (base, pruned)]
    print(f"{'bf16 checkpoint':<34}{sizes[0] / 1e9:>9.2f} GB{sizes[1] / 1e9:>9.2f} GB   {', '.join(seed['bf16'])}")
    details = []
    for name, shapes, experts in (("base", base, facts.num_experts), ("pruned", pruned, args.kept)):
        tensors = gguf_tensors(shapes, "f16")
        types = quantized_types(tensors, "Q4_K_M", quant_model(shapes, tensors, experts))
        size = gguf_bytes(tensors, types)
        params = sum(t.numel for t in tensors)
        counts = Counter(types)
        details.append((name, size, params, counts))
    print(f"{'  the same in GiB':<34}{sizes[0] / 2**30:>8.2f} GiB{sizes[1] / 2**30:>8.2f} GiB")
    q4 = [d[1] for d in details]
    print(f"{'GGUF Q4_K_M (tensor data)':<34}{q4[0] / 1e9:>9.2f} GB{q4[1] / 1e9:>9.2f} GB   {', '.join(seed['Q4_K_M'])}")
    print(f"{'  the same in GiB':<34}{q4[0] / 2**30:>8.2f} GiB{q4[1] / 2**30:>8.2f} GiB")
    for name, size, params, counts in details:
        kinds = ", ".join(f"{t} x{n}" for t, n in sorted(counts.items()))
        print(f"{name} Q4_K_M: {size * 8 / params:.2f} bits per weight over {params} text parameters; tensors: {kinds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
