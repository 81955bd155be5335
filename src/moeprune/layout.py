"""The run directory layout: one place that names every output of a run.

``runs/<recipe name>/``
    ``profile/``                  phase-1 sequences (JSONL), statistics (safetensors), summary JSON
    ``expert_drop_metadata.json`` the drop map
    ``pruned/``                   the pruned Hugging Face checkpoint (sharded safetensors)
    ``gguf/``                     GGUF files (base and pruned, converted and quantized) + records:
                                  ``<name>-<TYPE>.gguf`` (pruned), ``base-<TYPE>.gguf`` (base, not
                                  published), ``<file>.gguf.json`` beside each, and
                                  ``<stem>.imatrix.gguf`` when the recipe asks for an imatrix;
                                  ``<name>-plain-<TYPE>.gguf``: with ``[recalibrate]`` on, the
                                  pruned checkpoint before recalibration (measured, not published);
                                  ``mmproj-<TYPE>.gguf``: a multimodal base's vision projector
                                  (published: the pruned model keeps the base's tower)
    ``eval/``                     lm-eval outputs, per-sample logs, ``results.json``, ``kld.json``
    ``kld/``                      reference log-probabilities and rival quants of the kld stage
    ``card/``                     rendered README.md (model card) and plots
    ``manifest.json``             every artifact file with size and sha256
    ``deleted.json``              intermediates deleted on purpose (disk.delete_intermediates):
                                  what each was (size, sha256) and which stages made and last read it
    ``run.lock.json``             per-stage dependencies and outputs (what produced what)
    ``.writer.json``              the writer holding the run (pid, command, start), while one does
    ``logs/``                     stage and server logs

Every stage, the manifest and the card ask this class for a path; none spells a file name. A
GGUF's role (base or pruned) is read back with :meth:`RunLayout.gguf_role`, which parses the
names this class gives, exactly (a run named ``baseline`` is a pruned model, not a base).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Model = Literal["base", "pruned", "plain"]
"""base; pruned (the published checkpoint: recalibrated when the recipe recalibrates); plain (the
pruned checkpoint before recalibration, measured beside it at the same size, only then)."""
UNPUBLISHED_MODELS: tuple[Model, ...] = ("base", "plain")  # GGUFs measured for the card, never published
BASE_GGUF_PREFIX = "base"
PLAIN_GGUF_SUFFIX = "-plain"  # <run>-plain-<TYPE>.gguf: '-' never in a type, so no pruned name reads so
MMPROJ_PREFIX = "mmproj"
# GGUF types (F32, BF16, Q4_K_M, IQ4_XS...) never contain '-', so "<prefix>-<TYPE>" parses one way.
_GGUF_NAME = r"-(?P<type>[A-Za-z0-9_]+)(?:\.imatrix)?\.gguf(?:\.json)?"

DEFAULT_RUNS_DIR = Path("runs")
SEQUENCES_NAME = "sequences.jsonl"  # in profile/ of a run and of a published artifact alike


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
        return self.profile_dir / SEQUENCES_NAME

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
    def recalibrated_dir(self) -> Path:
        """The pruned checkpoint with refitted router tensors (recipe ``[recalibrate]``)."""
        return self.root / "recalibrated"

    @property
    def gguf_dir(self) -> Path:
        return self.root / "gguf"

    @property
    def run_name(self) -> str:
        """The run's name (the recipe's ``name``): the pruned GGUFs are named after it."""
        return self.root.name

    def gguf_path(self, which: Model, gguf_type: str) -> Path:
        """The ``which`` model's GGUF of ``gguf_type`` (e.g. "Q4_K_M", "bf16")."""
        return self.gguf_dir / f"{self._gguf_prefixes()[which]}-{gguf_type.upper()}.gguf"

    def _gguf_prefixes(self) -> dict[Model, str]:
        return {"base": BASE_GGUF_PREFIX, "pruned": self.run_name, "plain": self.run_name + PLAIN_GGUF_SUFFIX}

    @staticmethod
    def gguf_record_path(gguf: Path) -> Path:
        """The conversion/quantization record written beside a GGUF (``<file>.gguf.json``)."""
        return gguf.with_name(gguf.name + ".json")

    def mmproj_path(self, gguf_type: str) -> Path:
        """The vision projector of ``gguf_type``, converted once from the base (moeprune.llamacpp.mmproj)."""
        return self.gguf_dir / f"{MMPROJ_PREFIX}-{gguf_type.upper()}.gguf"

    def imatrix_path(self, which: Model, source_type: str) -> Path:
        """The importance matrix computed from the ``which`` model's ``source_type`` GGUF."""
        source = self.gguf_path(which, source_type)
        return source.with_name(f"{source.stem}.imatrix.gguf")

    @property
    def imatrix_calibration_path(self) -> Path:
        """The calibration text llama-imatrix reads (hidden: scratch, never published)."""
        return self.gguf_dir / ".imatrix-calibration.txt"

    def gguf_role(self, name: str) -> Model | None:
        """Which model a file of ``gguf/`` belongs to, from the names this layout gives; None for
        anything else."""
        for role, prefix in self._gguf_prefixes().items():
            if re.fullmatch(re.escape(prefix) + _GGUF_NAME, name):
                return role
        return None

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    def eval_model_dir(self, which: Model) -> Path:
        """lm-eval outputs and per-sample logs of one model (``eval/base``, ``eval/pruned``, ``eval/plain``)."""
        return self.eval_dir / which

    def log_path(self, name: str) -> Path:
        """``logs/<name>.log``: the log of one step (``convert-demo-F32``, ``prune.container``...)."""
        return self.logs_dir / f"{name}.log"

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
    def deleted_path(self) -> Path:
        """The records of intermediates deleted on purpose (moeprune.deleted)."""
        return self.root / "deleted.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "run.lock.json"

    @property
    def writer_path(self) -> Path:
        """Who holds the run's writer lock (moeprune.runlock), for the message a second writer gets."""
        return self.root / ".writer.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"
