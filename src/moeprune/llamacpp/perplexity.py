"""The pinned ``llama-perplexity`` as a KL-divergence meter, and a strict parser of its output.

Two calls, as llama.cpp documents them:

1. ``--kl-divergence-base FILE`` with the reference model: computes perplexity over the text and
   saves the reference's next-token log-probabilities (quantized to 16 bits per entry) to FILE;
2. ``--kl-divergence --kl-divergence-base FILE`` with a model to compare: reads the tokens and
   log-probabilities back, prints per-chunk figures and a statistics block (mean PPL of both,
   their ratio, mean KL divergence with its uncertainty, percentiles, Δp, "Same top p").

llama-perplexity exits 0 after many of its own errors (no statistics when fewer than 100 tokens
were scored, a vocabulary that does not match, a log-probability file it cannot read), so the
exit code proves nothing: the output must hold every line this parser needs, or
:class:`PerplexityOutputError` says which line is missing and quotes the output's tail.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.llamacpp.build import LlamaCppBuild

LOG_TAIL_LINES = 30
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_PM = r"\s*(?:±|\+/-)\s*"

# "name": (regex, has uncertainty, scale): the lines of the kl_divergence statistics block.
_STAT_LINES: dict[str, tuple[str, bool, float]] = {
    "ppl": (r"^Mean PPL\(Q\)\s*:\s*(?P<v>{n}){pm}(?P<u>{n})\s*$", True, 1.0),
    "ppl_base": (r"^Mean PPL\(base\)\s*:\s*(?P<v>{n}){pm}(?P<u>{n})\s*$", True, 1.0),
    "log_ppl_ratio": (r"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*(?P<v>{n}){pm}(?P<u>{n})\s*$", True, 1.0),
    "ppl_ratio": (r"^Mean PPL\(Q\)/PPL\(base\)\s*:\s*(?P<v>{n}){pm}(?P<u>{n})\s*$", True, 1.0),
    "mean_kld": (r"^Mean\s+KLD:\s*(?P<v>{n}){pm}(?P<u>{n})\s*$", True, 1.0),
    "max_kld": (r"^Maximum KLD:\s*(?P<v>{n})\s*$", False, 1.0),
    "median_kld": (r"^Median\s+KLD:\s*(?P<v>{n})\s*$", False, 1.0),
    "p99_kld": (r"^99\.0%\s+KLD:\s*(?P<v>{n})\s*$", False, 1.0),
    "mean_delta_p": (r"^Mean\s+Δp:\s*(?P<v>{n}){pm}(?P<u>{n})\s*%\s*$", True, 0.01),
    "rms_delta_p": (r"^RMS Δp\s*:\s*(?P<v>{n}){pm}(?P<u>{n})\s*%\s*$", True, 0.01),
    "top1_agreement": (r"^Same top p:\s*(?P<v>{n}){pm}(?P<u>{n})\s*%\s*$", True, 0.01),
}
_COMPILED = {
    name: (re.compile(pattern.format(n=_NUMBER, pm=_PM), re.MULTILINE), has_u, scale)
    for name, (pattern, has_u, scale) in _STAT_LINES.items()
}
_CHUNKS_RE = re.compile(r"kl_divergence: computing over (?P<chunks>\d+) chunks, n_ctx=(?P<ctx>\d+)")
_BASE_CHUNKS_RE = re.compile(r"perplexity: calculating perplexity over (?P<chunks>\d+) chunks, n_ctx=(?P<ctx>\d+)")
_FINAL_PPL_RE = re.compile(rf"Final estimate: PPL = (?P<v>{_NUMBER}) \+/- (?P<u>{_NUMBER})")
_STATS_START = "====== Perplexity statistics ======"
_TABLE_START_RE = re.compile(r"^chunk\s+PPL\s+ln\(PPL\(Q\)/PPL\(base\)\)", re.MULTILINE)
_LAST_STAT_RE = re.compile(r"^Same top p:.*$", re.MULTILINE)
_ERROR_HINTS = (
    "does not look like a file containing log-probabilities",
    "inconsistent vocabulary",
    "failed reading",
    "you need at least",
    "failed to open",
    "unable to load model",
    "failed to decode",
)


class PerplexityOutputError(MoepruneError):
    """llama-perplexity's output is not what this version of moeprune knows how to read."""


@dataclass(frozen=True)
class KldStatistics:
    """What one ``--kl-divergence`` run measured (fractions, not percent)."""

    values: dict[str, dict[str, float | None]]
    """{"mean_kld": {"value", "stderr"}, "top1_agreement": ..., "ppl_ratio": ..., ...}"""
    chunks: int
    ctx_size: int

    @property
    def scored_tokens(self) -> int:
        # llama-perplexity scores the second half of every chunk: n_ctx - 1 - n_ctx // 2 tokens.
        return self.chunks * (self.ctx_size - 1 - self.ctx_size // 2)

    def as_dict(self) -> dict[str, Any]:
        return {**self.values, "chunks": self.chunks, "ctx_size": self.ctx_size, "scored_tokens": self.scored_tokens}


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.strip().splitlines()[-lines:]) or "(no output)"


def _known_error(text: str) -> str | None:
    for line in text.splitlines():
        if any(hint in line for hint in _ERROR_HINTS):
            return line.strip()
    return None


def _number(text: str, what: str, where: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise PerplexityOutputError(f"{where}: llama-perplexity reported {what} = {text}; the comparison is void "
                                    "(a model that produced non-finite logits?)")
    return value


def parse_kld_output(text: str, where: str = "llama-perplexity output") -> KldStatistics:
    """The statistics of a ``--kl-divergence`` run, from its combined stdout/stderr.

    Raises PerplexityOutputError naming the first missing line (or llama-perplexity's own error).
    """
    found = _known_error(text)
    if _STATS_START not in text:
        reason = f"llama-perplexity said: {found!r}" if found else (
            f"no '{_STATS_START}' block (llama-perplexity prints it only when at least 100 tokens were "
            "scored: give it more text or a smaller ctx_size)")
        raise PerplexityOutputError(f"{where}: {reason}\n--- last lines ---\n{_tail(text)}")
    block = text[text.index(_STATS_START):]
    values: dict[str, dict[str, float | None]] = {}
    for name, (pattern, has_uncertainty, scale) in _COMPILED.items():
        match = pattern.search(block)
        if match is None:
            raise PerplexityOutputError(
                f"{where}: the statistics block has no line matching {_STAT_LINES[name][0]!r} ({name}); this "
                f"llama-perplexity prints a format moeprune does not recognise\n--- last lines ---\n{_tail(text)}"
            )
        value = _number(match["v"], name, where) * scale
        stderr = _number(match["u"], f"{name} uncertainty", where) * scale if has_uncertainty else None
        values[name] = {"value": value, "stderr": stderr}
    chunks = _CHUNKS_RE.search(text)
    if chunks is None:
        raise PerplexityOutputError(f"{where}: no 'kl_divergence: computing over N chunks, n_ctx=M' line; "
                                    f"cannot tell how many tokens were scored\n--- last lines ---\n{_tail(text)}")
    return KldStatistics(values, int(chunks["chunks"]), int(chunks["ctx"]))


def parse_base_output(text: str, where: str = "llama-perplexity output") -> dict[str, Any]:
    """``{"ppl": {"value", "stderr"}, "chunks", "ctx_size"}`` of a ``--kl-divergence-base`` run."""
    final = _FINAL_PPL_RE.search(text)
    chunks = _BASE_CHUNKS_RE.search(text)
    if final is None or chunks is None:
        found = _known_error(text)
        missing = "'Final estimate: PPL = ...'" if final is None else "'calculating perplexity over N chunks'"
        reason = f"llama-perplexity said: {found!r}" if found else f"no {missing} line"
        raise PerplexityOutputError(f"{where}: {reason}\n--- last lines ---\n{_tail(text)}")
    return {
        "ppl": {"value": _number(final["v"], "PPL", where), "stderr": _number(final["u"], "PPL uncertainty", where)},
        "chunks": int(chunks["chunks"]),
        "ctx_size": int(chunks["ctx"]),
    }


def evidence_text(text: str, where: str = "llama-perplexity output") -> str:
    """The deterministic part of a ``--kl-divergence`` output, kept as evidence and re-parsed by
    ``verify``: the chunk count line, the per-chunk table and the statistics block (no timings,
    no paths, no system information)."""
    chunks = _CHUNKS_RE.search(text)
    table = _TABLE_START_RE.search(text)
    last = None
    if _STATS_START in text:
        last = _LAST_STAT_RE.search(text, text.index(_STATS_START))
    if chunks is None or table is None or last is None:
        parse_kld_output(text, where)  # raises the precise error
        raise PerplexityOutputError(f"{where}: no per-chunk table in the output\n--- last lines ---\n{_tail(text)}")
    lines = [chunks.group(0), text[table.start():last.end()].rstrip()]
    return "\n".join(lines) + "\n"


def perplexity_command(
    build: LlamaCppBuild,
    gguf_path: Path,
    text_path: Path,
    logits_path: Path,
    *,
    ctx_size: int,
    compare: bool,
    chunks: int | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 0,
) -> list[str]:
    """The llama-perplexity command line: save the reference (``compare=False``) or compare to it."""
    command = [str(build.binary("llama-perplexity")), "--model", str(gguf_path), "--file", str(text_path),
               "--ctx-size", str(ctx_size), "--kl-divergence-base", str(logits_path),
               "--n-gpu-layers", str(n_gpu_layers), "--seed", str(seed)]
    if compare:
        command.append("--kl-divergence")
    if chunks is not None:
        command += ["--chunks", str(chunks)]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command


def run_perplexity(command: Sequence[str], log_path: Path, what: str) -> str:
    """Run llama-perplexity, write its whole output to ``log_path``; return the output.

    A non-zero exit raises MoepruneError with the output's tail. LLAMA_ARG_* variables are
    dropped from the environment: the recipe decides every setting.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLAMA_ARG_")}
    result = subprocess.run(list(command), capture_output=True, text=True, errors="replace", env=env,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(f"$ {' '.join(command)}\n{output}", encoding="utf-8")
    if result.returncode != 0:
        raise MoepruneError(f"{what}: llama-perplexity failed (exit {result.returncode}); log: {log_path}\n"
                            f"--- last lines ---\n{_tail(output)}")
    return output
