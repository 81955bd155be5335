"""GGUF quantization with the pinned llama-quantize, and optional importance matrices.

llama-quantize falls back to another type for tensors whose row length is not a multiple of
the target type's block size (Q4_K -> Q5_0, Q6_K -> Q8_0, ...) and logs one warning per tensor.
Those fallbacks change what the published file contains, so they are parsed into the record
(tensor, row length, block size, requested and actual type) rather than left in a log.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_file, write_json
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.process import no_output_error, run_logged

_FALLBACK_RE = re.compile(
    r"warning: (?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+) "
    r"\(required for type\s+(?P<requested>\S+)\) (?P<forced_f16>\(WARNING: must use F16 due to unusual shape\) )?"
    r"-> falling back to\s+(?P<actual>\S+)"
)
_FALLBACK_SUMMARY_RE = re.compile(r"WARNING: (?P<count>\d+) of (?P<total>\d+) tensor\(s\) required fallback quantization")


def parse_fallbacks(log_text: str) -> dict[str, Any]:
    """Fallback warnings of a llama-quantize log: {"tensors": [...], "count", "total_tensors"}.

    ``count``/``total_tensors`` come from llama-quantize's own summary line (None if absent, e.g.
    when nothing fell back); ``tensors`` lists each warning in log order.
    """
    tensors = [
        {
            "tensor": match["tensor"],
            "ncols": int(match["ncols"]),
            "block_size": int(match["block"]),
            "requested_type": match["requested"],
            "actual_type": match["actual"],
            "forced_f16": match["forced_f16"] is not None,
        }
        for match in _FALLBACK_RE.finditer(log_text)
    ]
    summary = _FALLBACK_SUMMARY_RE.search(log_text)
    return {
        "tensors": tensors,
        "count": int(summary["count"]) if summary else len(tensors),
        "total_tensors": int(summary["total"]) if summary else None,
    }


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    """The record as written beside the GGUF (and published): without local absolute paths."""
    return {key: value for key, value in record.items() if key not in ("in_path", "out_path")}


def quantize_gguf(
    build: LlamaCppBuild,
    in_path: Path,
    out_path: Path,
    qtype: str,
    imatrix: Path | None = None,
    *,
    threads: int | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Quantize ``in_path`` to ``out_path`` as ``qtype`` (e.g. "Q4_K_M"); return the record.

    The record (also written to ``<out_path>.json``) holds the command, input/output sha256,
    and every fallback llama-quantize made. ``out_path`` appears only on success.
    """
    in_path = Path(in_path)
    out_path = Path(out_path)
    if not in_path.is_file():
        raise MoepruneError(f"{in_path}: GGUF to quantize not found; run `invoke convert` first")
    if imatrix is not None and not Path(imatrix).is_file():
        raise MoepruneError(f"{imatrix}: importance matrix not found; run `invoke quantize --imatrix` to compute it")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.tmp-", dir=out_path.parent) as tmp:
        tmp_out = Path(tmp) / out_path.name
        command = [str(build.binary("llama-quantize"))]
        if imatrix is not None:
            command += ["--imatrix", str(imatrix)]
        command += [str(in_path), str(tmp_out), qtype]
        if threads is not None:
            command.append(str(threads))
        output = run_logged(command, log_path, "llama-quantize", writing=out_path)
        if not tmp_out.is_file():
            raise no_output_error("llama-quantize", output, tmp_out, log_path)
        record = {
            "stage": "quantize",
            "llamacpp_key": build.key,
            "llama_cpp_commit": build.record.get("source", {}).get("llama_cpp_commit"),
            "qtype": qtype,
            "in_path": str(in_path),
            "in_file": in_path.name,
            "in_sha256": sha256_file(in_path),
            "imatrix": Path(imatrix).name if imatrix is not None else None,
            "imatrix_sha256": sha256_file(Path(imatrix)) if imatrix is not None else None,
            "out_path": str(out_path),
            "file": out_path.name,
            "size_bytes": tmp_out.stat().st_size,
            "sha256": sha256_file(tmp_out),
            "fallbacks": parse_fallbacks(output),
        }
        os.replace(tmp_out, out_path)
    write_json(out_path.with_name(out_path.name + ".json"), public_record(record))
    return record


def compute_imatrix(
    build: LlamaCppBuild,
    gguf_path: Path,
    text_path: Path,
    out_path: Path,
    *,
    ctx_size: int = 512,
    threads: int | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Compute an importance matrix of ``gguf_path`` over the plain text ``text_path``.

    Returns a record (also at ``<out_path>.json``) with input hashes and the output sha256.
    """
    gguf_path, text_path, out_path = Path(gguf_path), Path(text_path), Path(out_path)
    if not text_path.is_file() or text_path.stat().st_size == 0:
        raise MoepruneError(f"{text_path}: calibration text for the importance matrix is missing or empty")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.tmp-", dir=out_path.parent) as tmp:
        tmp_out = Path(tmp) / out_path.name
        command = [
            str(build.binary("llama-imatrix")), "-m", str(gguf_path), "-f", str(text_path),
            "-o", str(tmp_out), "--ctx-size", str(ctx_size), "--no-ppl",
        ]
        if threads is not None:
            command += ["--threads", str(threads)]
        output = run_logged(command, log_path, "llama-imatrix", writing=out_path)
        if not tmp_out.is_file():
            raise no_output_error("llama-imatrix", output, tmp_out, log_path)
        record = {
            "stage": "imatrix",
            "llamacpp_key": build.key,
            "gguf_sha256": sha256_file(gguf_path),
            "text_file": text_path.name,
            "text_sha256": sha256_file(text_path),
            "ctx_size": ctx_size,
            "out_path": str(out_path),
            "file": out_path.name,
            "sha256": sha256_file(tmp_out),
        }
        os.replace(tmp_out, out_path)
    write_json(out_path.with_name(out_path.name + ".json"), public_record(record))
    return record


def calibration_text(prompts_path: Path, out_path: Path) -> Path:
    """Write the calibration prompts (JSONL, field "prompt") as plain text for llama-imatrix."""
    lines = []
    for number, line in enumerate(Path(prompts_path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError):
            raise MoepruneError(f"{prompts_path}:{number}: not a JSON object with a 'prompt' field") from None
    with atomic_file(Path(out_path)) as handle:
        handle.write("\n\n".join(lines) + "\n")
    return Path(out_path)
