"""Write the pinned config of google/gemma-4-26B-A4B-it that the run plan uses offline.

``src/moeprune/plan/known/google--gemma-4-26B-A4B-it.json`` holds a ``config.json`` and the dtype
the checkpoint is published in; the plan builds the model's tensors from it (its transformers class
on the ``meta`` device: :func:`moeprune.plan.shapes.shapes_from_config`), so ``invoke check`` on
the reference recipe can plan its disk before the base is downloaded. The config is made here,
without the Hub, from the reference's text dimensions: 30 layers, hidden 2816, 16 heads of 256
(global layers: 512, 2 KV heads, K = V), 128 experts of 704, top-8, dense MLP 2112, vocabulary
262144 (the seed card's architecture section; the same values as bench/profile_memory.py). The
vision tower is transformers' default Gemma4VisionConfig, which may differ from the real one; the
text GGUFs do not contain it. Tensors are BF16, as published. tests/test_run_plan.py checks that
the shipped file is what this script writes.

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
    from profile_memory import synthetic_config
    from transformers import Gemma4Config, Gemma4VisionConfig

    text = synthetic_config(30).text_config
    config = Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(), audio_config=None)
    config.architectures = ["Gemma4ForConditionalGeneration"]
    return {
        "hub_id": HUB_ID,
        "provenance": {
            "summary": "the reference's text dimensions in transformers' Gemma4Config; not the Hub's config.json",
            "generator": "bench/write_reference_shapes.py",
            "vision_tower": "transformers' default Gemma4VisionConfig (an estimate; not in the text GGUFs)",
        },
        "dtype": "BF16",
        "config": config.to_dict(),
    }


def render(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, help="a downloaded model directory to check the summary against")
    args = parser.parse_args()
    from moeprune.plan.shapes import known_path, known_shapes, read_shapes

    target = known_path(HUB_ID)
    if args.compare:
        real = {t.name: t.shape for t in read_shapes(args.compare).tensors}
        ours = {t.name: t.shape for t in known_shapes(HUB_ID).tensors}
        text = [n for n in ours if "vision" not in n]
        bad = [n for n in text if real.get(n) != ours[n]]
        print(f"{len(text) - len(bad)} of {len(text)} text tensors match; differ or missing: {bad[:10]}")
        return 1 if bad else 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(build()), encoding="utf-8")
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
