"""The embedded demo: a small Gemma-4-architecture MoE, its tokenizer, data and lm-eval task.

``MODEL_DIR`` is the committed model (built by ``invoke demo-model``); ``TASKS_DIR`` is the
lm-eval ``--include_path`` holding the ``demo_mcq`` task. :mod:`moeprune.demo.criteria` is the
drop-map criteria experiment on this model (`invoke compare-criteria`, docs/criteria.md).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_DIR = PACKAGE_DIR / "model"
TASKS_DIR = PACKAGE_DIR / "tasks"
HELDOUT_PATH = TASKS_DIR / "demo_mcq" / "demo_mcq.jsonl"

__all__ = ["HELDOUT_PATH", "MODEL_DIR", "PACKAGE_DIR", "TASKS_DIR"]
