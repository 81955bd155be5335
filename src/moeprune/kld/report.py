"""``eval/kld.json``: rows of KL divergence to the reference, built from llama-perplexity output.

Every number of a row comes from the evidence file beside it (``eval/kld/<label>.txt``, the
deterministic part of llama-perplexity's output), so :func:`recompute_kld` can rebuild the numbers
from the published files and ``verify`` compares them with ``kld.json``.

The perplexity ratio is PPL(model) / PPL(reference), both as llama-perplexity computed them from
full-precision logits over the same tokens. llama-perplexity's own ``ln(PPL(Q)/PPL(base))`` compares
with the reference's *saved* log-probabilities, which are 16-bit and clipped at -16 nats; on text
the model predicts badly it is biased (the reference against itself gives more than 0), so it is
kept only as ``log_ppl_ratio_vs_saved``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.llamacpp.perplexity import parse_base_output, parse_kld_output

KLD_FORMAT_VERSION = 1
ROLES = ("reference", "base-eval", "pruned-eval", "pruned-converted", "pruned-quant", "base-candidate", "plain-eval")
"""plain-eval: the pruned checkpoint before recalibration at the eval type (recalibrated runs only)."""


class KldError(MoepruneError):
    """The KL-divergence measurements are incomplete or inconsistent."""


def row_numbers(evidence: str, reference_ppl: float, where: str) -> dict[str, Any]:
    """The numbers of one row, from its evidence text (see module docstring for the ratio)."""
    stats = parse_kld_output(evidence, where)
    values = stats.values
    return {
        "mean_kld": values["mean_kld"],
        "top1_agreement": values["top1_agreement"],
        "ppl": values["ppl"],
        "ppl_ratio": values["ppl"]["value"] / reference_ppl,
        "log_ppl_ratio_vs_saved": values["log_ppl_ratio_vs_saved"],
        "rms_delta_p": values["rms_delta_p"],
        "chunks": stats.chunks,
        "ctx_size": stats.ctx_size,
        "scored_tokens": stats.scored_tokens,
    }


def reference_numbers(evidence: str, where: str) -> dict[str, Any]:
    return parse_base_output(evidence, where)


def choose_rival(pruned_size_bytes: int, candidates: Mapping[str, int]) -> str:
    """The candidate type whose file size is closest to the pruned eval quant (ties: the smaller file)."""
    if not candidates:
        raise KldError("kld.rival_types: no candidate type left to quantize the base model to")
    return min(sorted(candidates), key=lambda t: (abs(candidates[t] - pruned_size_bytes), candidates[t]))


def self_check(row: Mapping[str, Any], tolerance: float) -> dict[str, Any]:
    """The reference against its own saved log-probabilities: KLD 0, every top-1 the same, ratio 1."""
    kld = row["mean_kld"]["value"]
    top1 = row["top1_agreement"]["value"]
    ratio = row["ppl_ratio"]
    passed = abs(kld) <= tolerance and top1 == 1.0 and abs(ratio - 1.0) <= 1e-5
    return {"label": row["label"], "mean_kld": kld, "top1_agreement": top1, "ppl_ratio": ratio,
            "tolerance": tolerance, "passed": passed}


def rival_record(rows: Sequence[Mapping[str, Any]], pruned_label: str, rival_label: str) -> dict[str, Any]:
    by_label = {row["label"]: row for row in rows}
    pruned, rival = by_label[pruned_label], by_label[rival_label]
    candidates = [{"quant_type": r["quant_type"], "size_bytes": r["gguf"]["size_bytes"]}
                  for r in rows if r["role"] == "base-candidate"]
    pruned_size = pruned["gguf"]["size_bytes"]
    return {
        "label": rival_label,
        "quant_type": rival["quant_type"],
        "size_bytes": rival["gguf"]["size_bytes"],
        "pruned_label": pruned_label,
        "pruned_size_bytes": pruned_size,
        "size_difference_fraction": rival["gguf"]["size_bytes"] / pruned_size - 1,
        "candidates": candidates,
    }


def recompute_kld(eval_dir: Path, stored: Mapping[str, Any]) -> dict[str, Any]:
    """``stored`` (a kld.json) with every number re-derived from the evidence files in ``eval_dir``.

    The provenance (commands, GGUF hashes, settings) is taken from ``stored``; the numbers, the
    rival choice and the self-check are recomputed. Raises KldError for a missing evidence file.
    """
    from moeprune.hashing import sha256_file

    eval_dir = Path(eval_dir)
    if not stored.get("enabled", False):
        return json.loads(json.dumps(stored))
    out = json.loads(json.dumps(stored))

    def read(relative: str) -> str:
        path = eval_dir / relative
        if not path.is_file():
            raise KldError(f"{path}: evidence file of eval/kld.json is missing")
        return path.read_text(encoding="utf-8")

    reference = out["reference"]
    reference.update(reference_numbers(read(reference["evidence"]), f"eval/{reference['evidence']}"))
    reference["evidence_sha256"] = sha256_file(eval_dir / reference["evidence"])
    ppl = reference["ppl"]
    for row in out["rows"]:
        row.update(row_numbers(read(row["evidence"]), ppl, f"eval/{row['evidence']}"))
        row["evidence_sha256"] = sha256_file(eval_dir / row["evidence"])
    candidates = {r["quant_type"]: r["gguf"]["size_bytes"] for r in out["rows"] if r["role"] == "base-candidate"}
    pruned_label = out["rival"]["pruned_label"]
    pruned_row = next(r for r in out["rows"] if r["label"] == pruned_label)
    rival_type = choose_rival(pruned_row["gguf"]["size_bytes"], candidates)
    rival_label = next(r["label"] for r in out["rows"] if r["role"] == "base-candidate" and r["quant_type"] == rival_type)
    out["rival"] = rival_record(out["rows"], pruned_label, rival_label)
    self_row = next(r for r in out["rows"] if r["role"] == "reference")
    out["self_check"] = self_check(self_row, out["settings"]["self_kld_tolerance"])
    return out


def load_kld(path: Path) -> dict[str, Any] | None:
    """``eval/kld.json`` validated against its schema, or None when the file does not exist."""
    from moeprune.schemas import validate_file

    path = Path(path)
    if not path.is_file():
        return None
    return validate_file("kld", path)
