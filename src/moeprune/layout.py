"""The run directory layout: one place that names every output of a run.

``runs/<recipe name>/``
    ``profile/``                  phase-1 sequences (JSONL), statistics (safetensors), summary JSON
    ``expert_drop_metadata.json`` the drop map
    ``pruned/``                   the pruned Hugging Face checkpoint (sharded safetensors)
    ``gguf/``                     GGUF files (base and pruned, converted and quantized) + records
    ``eval/``                     lm-eval outputs, per-sample logs, ``results.json``, ``kld.json``
    ``kld/``                      reference log-probabilities and rival quants of the kld stage
    ``card/``                     rendered README.md (model card) and plots
    ``manifest.json``             every artifact file with size and sha256
    ``run.lock.json``             per-stage dependencies and outputs (what produced what)
    ``logs/``                     stage and server logs
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_RUNS_DIR = Path("runs")


def runs_root() -> Path:
    """Root of all runs: $MOEPRUNE_RUNS_DIR, else ./runs."""
    return Path(os.environ.get("MOEPRUNE_RUNS_DIR", DEFAULT_RUNS_DIR))


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run. Pure: creates nothing."""

    root: Path

    @classmethod
    def for_recipe(cls, recipe_name: str, runs_dir: Path | None = None) -> RunLayout:
        return cls((runs_dir or runs_root()) / recipe_name)

    @property
    def profile_dir(self) -> Path:
        return self.root / "profile"

    @property
    def sequences_path(self) -> Path:
        return self.profile_dir / "sequences.jsonl"

    @property
    def profile_stats_path(self) -> Path:
        return self.profile_dir / "stats.safetensors"

    @property
    def profile_summary_path(self) -> Path:
        return self.profile_dir / "profile.json"

    @property
    def drop_map_path(self) -> Path:
        return self.root / "expert_drop_metadata.json"

    @property
    def pruned_dir(self) -> Path:
        return self.root / "pruned"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def results_path(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def kld_path(self) -> Path:
        """KL divergence to the base model of each measured GGUF (schemas/kld.schema.json)."""
        return self.eval_dir / "kld.json"

    @property
    def kld_evidence_dir(self) -> Path:
        """The deterministic part of each llama-perplexity output, re-parsed by verify (published)."""
        return self.eval_dir / "kld"

    @property
    def kld_work_dir(self) -> Path:
        """The reference's saved log-probabilities and the rival quants (large, not published)."""
        return self.root / "kld"

    @property
    def card_dir(self) -> Path:
        return self.root / "card"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"
