"""The pinned ``llama-perplexity`` as a KL-divergence meter, and a strict parser of its output.

Two calls, as llama.cpp documents them:

1. ``--kl-divergence-base FILE`` with the reference model: computes perplexity over the text (one
   running ``[k]PPL`` figure per chunk) and saves the reference's next-token log-probabilities
   (16 bits per entry) to FILE;
2. ``--kl-divergence --kl-divergence-base FILE`` with a model to compare: reads the tokens and
   log-probabilities back and prints one row per chunk of *running* figures over every token
   scored so far: PPL, ln(PPL(Q)/PPL(base)), mean KL divergence, RMS Δp and "Same top p" (each
   ± its uncertainty), then a statistics block.

The pinned llama.cpp logs through an asynchronous queue that it never flushes at exit
(``common_log_main`` leaks the logger on purpose, llama.cpp issue 22142), so whatever it logs last
can be lost when the process ends first; on a busy machine, and with a small model that exits
within microseconds, it often is, statistics block included. Hence:

- every figure is read from the per-chunk rows, and the text is run for one chunk more than is
  scored (:data:`SPARE_CHUNKS`): the figures of chunk N are the result over chunks 1..N, and the
  spare chunk's compute gives the log thread time to write row N;
- one chunk per batch (``--batch-size`` = ``--ctx-size``), so rows are written one at a time;
- ``OMP_WAIT_POLICY=passive`` so OpenMP's spinning threads do not starve the log thread (no
  number changes);
- an output that still lacks row N, with no error of llama-perplexity's own, is run again
  (:data:`ATTEMPTS` times in all).

llama-perplexity also exits 0 after many of its own errors (a vocabulary that does not match, a
log-probability file it cannot read, too little text), so the exit code proves nothing: the output
must hold every line this parser needs, or :class:`PerplexityOutputError` says in one line which is
missing (and llama-perplexity's own error, if it printed one); the whole output is in the log.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.llamacpp.build import LlamaCppBuild
from moeprune.llamacpp.process import run_logged
ATTEMPTS = 3
SPARE_CHUNKS = 1
MIN_SCORED_TOKENS = 100
_N = r"[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|nan|inf)"
_PM = r"\s*±\s*"
_ROW_RE = re.compile(
    rf"^\s*(?P<chunk>\d+)\s+(?P<ppl>{_N}){_PM}(?P<ppl_u>{_N})\s+(?P<lr>{_N}){_PM}(?P<lr_u>{_N})"
    rf"\s+(?P<kld>{_N}){_PM}(?P<kld_u>{_N})\s+(?P<dp>{_N}){_PM}(?P<dp_u>{_N})\s*%"
    rf"\s+(?P<top>{_N}){_PM}(?P<top_u>{_N})\s*%\s*$",
    re.MULTILINE,
)
_HEADER_RE = re.compile(r"^chunk\s+PPL\s+ln\(PPL\(Q\)/PPL\(base\)\)\s+KL Divergence.*$", re.MULTILINE)
_CHUNKS_RE = re.compile(r"kl_divergence: computing over (?P<chunks>\d+) chunks, n_ctx=(?P<ctx>\d+)")
_BASE_CHUNKS_RE = re.compile(r"perplexity: calculating perplexity over (?P<chunks>\d+) chunks, n_ctx=(?P<ctx>\d+)")
_BASE_PPL_RE = re.compile(rf"\[(?P<chunk>\d+)\](?P<v>{_N}),")
_ERROR_HINTS = (
    "does not look like a file containing log-probabilities",
    "inconsistent vocabulary",
    "failed reading",
    "you need at least",
    "failed to open",
    "unable to load model",
    "failed to decode",
    "failed to eval",
)


class PerplexityOutputError(MoepruneError):
    """llama-perplexity's output is not what this version of moeprune knows how to read."""


@dataclass(frozen=True)
class KldStatistics:
    """What one ``--kl-divergence`` run measured over chunks 1..``chunks`` (fractions, not percent)."""

    values: dict[str, dict[str, float]]
    """{"mean_kld": {"value", "stderr"}, "top1_agreement", "ppl", "log_ppl_ratio_vs_saved", "rms_delta_p"}"""
    chunks: int
    ctx_size: int

    @property
    def scored_tokens(self) -> int:
        return scored_tokens(self.chunks, self.ctx_size)


def scored_tokens(chunks: int, ctx_size: int) -> int:
    """llama-perplexity scores the second half of every chunk: ``n_ctx - 1 - n_ctx // 2`` tokens."""
    return chunks * (ctx_size - 1 - ctx_size // 2)


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


def _missing(where: str, what: str, text: str) -> PerplexityOutputError:
    found = _known_error(text)
    reason = f"llama-perplexity said: {found!r}" if found else f"no {what}"
    return PerplexityOutputError(f"{where}: {reason}")


def scored_chunks(total_chunks: int, ctx_size: int, where: str = "llama-perplexity") -> int:
    """How many chunks are scored when llama-perplexity ran ``total_chunks`` (the spare is not)."""
    scored = total_chunks - SPARE_CHUNKS
    if scored < 1 or scored_tokens(scored, ctx_size) < MIN_SCORED_TOKENS:
        raise PerplexityOutputError(
            f"{where}: the text gives {total_chunks} chunk(s) of {ctx_size} tokens; at least "
            f"{MIN_SCORED_TOKENS} scored tokens plus {SPARE_CHUNKS} spare chunk are needed: give it more "
            "text, or a smaller kld.ctx_size"
        )
    return scored


def parse_kld_output(text: str, where: str = "llama-perplexity output") -> KldStatistics:
    """The running figures of the last scored chunk of a ``--kl-divergence`` run (see the module
    docstring: the final chunk llama-perplexity ran is the spare and is not used)."""
    header = _CHUNKS_RE.search(text)
    if header is None:
        raise _missing(where, "'kl_divergence: computing over N chunks, n_ctx=M' line", text)
    total, ctx_size = int(header["chunks"]), int(header["ctx"])
    wanted = scored_chunks(total, ctx_size, where)
    if _HEADER_RE.search(text) is None:
        raise _missing(where, "per-chunk table header ('chunk  PPL  ln(PPL(Q)/PPL(base))  KL Divergence ...'); "
                              "this llama-perplexity prints a format moeprune does not recognise", text)
    rows = {int(match["chunk"]): match for match in _ROW_RE.finditer(text)}
    absent = [k for k in range(1, wanted + 1) if k not in rows]
    if absent:
        raise _missing(where, f"row for chunk(s) {absent[:5]} of the {wanted} scored (the output ended early)", text)
    row = rows[wanted]
    number = lambda name, what: _number(row[name], what, where)  # noqa: E731
    values = {
        "ppl": {"value": number("ppl", "PPL"), "stderr": number("ppl_u", "PPL uncertainty")},
        "log_ppl_ratio_vs_saved": {"value": number("lr", "ln(PPL(Q)/PPL(base))"),
                                   "stderr": number("lr_u", "ln ratio uncertainty")},
        "mean_kld": {"value": number("kld", "KL divergence"), "stderr": number("kld_u", "KLD uncertainty")},
        "rms_delta_p": {"value": number("dp", "RMS Δp") / 100, "stderr": number("dp_u", "Δp uncertainty") / 100},
        "top1_agreement": {"value": number("top", "Same top p") / 100, "stderr": number("top_u", "top-p uncertainty") / 100},
    }
    return KldStatistics(values, wanted, ctx_size)


def parse_base_output(text: str, where: str = "llama-perplexity output") -> dict[str, Any]:
    """``{"ppl", "chunks", "ctx_size", "chunks_run"}`` of a ``--kl-divergence-base`` run: the
    reference's running perplexity after its last scored chunk."""
    header = _BASE_CHUNKS_RE.search(text)
    if header is None:
        raise _missing(where, "'perplexity: calculating perplexity over N chunks, n_ctx=M' line", text)
    total, ctx_size = int(header["chunks"]), int(header["ctx"])
    wanted = scored_chunks(total, ctx_size, where)
    running = {int(match["chunk"]): match["v"] for match in _BASE_PPL_RE.finditer(text)}
    if wanted not in running:
        raise _missing(where, f"running perplexity '[{wanted}]...' of the last scored chunk (the output ended early)",
                       text)
    return {"ppl": _number(running[wanted], "PPL", where), "chunks": wanted, "ctx_size": ctx_size,
            "chunks_run": total}


def evidence_text(text: str, where: str = "llama-perplexity output") -> str:
    """The deterministic part of a ``--kl-divergence`` output that the figures come from, kept as
    evidence and re-parsed by ``verify``: the chunk count line, the table header and the rows of
    the scored chunks (no timings, paths or system information)."""
    stats = parse_kld_output(text, where)
    header = _HEADER_RE.search(text)
    rows = {int(match["chunk"]): match.group(0).rstrip() for match in _ROW_RE.finditer(text)}
    lines = [_CHUNKS_RE.search(text).group(0), header.group(0).rstrip()]  # type: ignore[union-attr]
    lines += [rows[k] for k in range(1, stats.chunks + 1)]
    return "\n".join(lines) + "\n"


def base_evidence_text(text: str, where: str = "llama-perplexity output") -> str:
    """The deterministic part of a ``--kl-divergence-base`` output (chunk count and running PPLs)."""
    parsed = parse_base_output(text, where)
    running = [f"[{m['chunk']}]{m['v']}," for m in _BASE_PPL_RE.finditer(text) if int(m["chunk"]) <= parsed["chunks"]]
    return _BASE_CHUNKS_RE.search(text).group(0) + "\n" + "".join(running) + "\n"  # type: ignore[union-attr]


def perplexity_command(
    build: LlamaCppBuild,
    gguf_path: Path,
    text_path: Path,
    logits_path: Path,
    *,
    ctx_size: int,
    compare: bool,
    chunks: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    seed: int = 0,
) -> list[str]:
    """The llama-perplexity command line: save the reference (``compare=False``; ``chunks`` scored
    chunks plus the spare, None: all the text holds) or compare to it (one chunk per batch)."""
    command = [str(build.binary("llama-perplexity")), "--model", str(gguf_path), "--file", str(text_path),
               "--ctx-size", str(ctx_size), "--batch-size", str(ctx_size), "--kl-divergence-base", str(logits_path),
               "--n-gpu-layers", str(n_gpu_layers), "--seed", str(seed)]
    if compare:
        command.append("--kl-divergence")  # the chunk count comes from the saved file
    elif chunks is not None:
        command += ["--chunks", str(chunks + SPARE_CHUNKS)]
    if threads is not None:
        command += ["--threads", str(threads)]
    return command


def run_perplexity(command: Sequence[str], log_path: Path, what: str) -> str:
    """Run llama-perplexity, write its whole output to ``log_path``; return the output.

    A non-zero exit raises MoepruneError in one line (its cause and the log). LLAMA_ARG_*
    variables are dropped from the environment: the recipe decides every setting.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("LLAMA_ARG_")}
    env.setdefault("OMP_WAIT_POLICY", "passive")  # let the log thread run (see the module docstring)
    try:
        return run_logged(list(command), log_path, "llama-perplexity", env=env)
    except MoepruneError as exc:
        raise MoepruneError(f"{what}: {exc}") from None


def run_until_complete(command: Sequence[str], log_path: Path, what: str, parse: Any,
                       attempts: int = ATTEMPTS) -> tuple[str, Any]:
    """Run llama-perplexity until ``parse(output)`` succeeds; return ``(output, parsed)``.

    An output that ends early with no error of llama-perplexity's own is the lost-log race of the
    module docstring: it is run again, up to ``attempts`` times. A reported error fails at once.
    """
    for attempt in range(1, attempts + 1):
        output = run_perplexity(command, log_path, what)
        try:
            return output, parse(output)
        except PerplexityOutputError as exc:
            if _known_error(output) is not None or attempt == attempts:
                raise PerplexityOutputError(f"{exc} ({what}: {attempt} attempt(s)); log: {log_path}") from None
    raise AssertionError("unreachable")
