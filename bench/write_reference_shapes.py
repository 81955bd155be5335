"""Write the pinned shape summary of google/gemma-4-26B-A4B-it that the run plan uses offline.

``src/moeprune/plan/known/google--gemma-4-26B-A4B-it.json`` holds a config and every tensor's
name, dtype and shape, so ``invoke check`` on the reference recipe can plan its disk before the
base is downloaded. It is built here, without the Hub, from transformers' own Gemma 4 classes
(meta device: no weights) and the reference's text dimensions: 30 layers, hidden 2816, 16 heads
of 256 (global layers: 512, 2 KV heads, K = V), 128 experts of 704, top-8, dense MLP 2112,
vocabulary 262144 (the seed card's architecture section; the same values as
bench/profile_memory.py). The vision tower is transformers' default Gemma4VisionConfig, which
may differ from the real one; the text GGUFs do not contain it. Tensors are BF16, as published.

An auditor with the Hub checks it with ``python bench/write_reference_shapes.py --compare DIR``
against a download: every text tensor's shape must match (the plan then uses the real headers
anyway, as soon as the base is in the HF cache).

    python bench/write_reference_shapes.py [--compare MODEL_DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

HUB_ID = "google/gemma-4-26B-A4B-it"


def build() -> dict:
    import torch
    from profile_memory import synthetic_config
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4VisionConfig

    text = synthetic_config(30).text_config
    config = Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(), audio_config=None)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    with torch.device("meta"):
        model = Gemma4ForConditionalGeneration(config)
    tied = set()
    if config.get_text_config().tie_word_embeddings:
        tied.add("lm_head.weight")
    tensors = [[name, "BF16", list(t.shape)] for name, t in model.state_dict().items() if name not in tied]
    return {
        "hub_id": HUB_ID,
        "provenance": {
            "summary": "transformers Gemma4 classes at the reference's text dimensions; not the Hub headers",
            "generator": "bench/write_reference_shapes.py",
            "transformers": __import__("transformers").__version__,
            "vision_tower": "transformers' default Gemma4VisionConfig (an estimate; not in the text GGUFs)",
        },
        "config": config.to_dict(),
        "tensors": tensors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="a downloaded model directory to check the summary against")
    args = parser.parse_args()
    from moeprune.plan.shapes import known_path, read_shapes

    target = known_path(HUB_ID)
    if args.compare:
        real = {t.name: t.shape for t in read_shapes(args.compare).tensors}
        ours = {name: tuple(shape) for name, _, shape in json.loads(target.read_text())["tensors"]}
        text = [n for n in ours if "vision" not in n]
        bad = [n for n in text if real.get(n) != ours[n]]
        print(f"{len(text) - len(bad)} of {len(text)} text tensors match; differ or missing: {bad[:10]}")
        return 1 if bad else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(build(), indent=0, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
