"""Statistics of evaluation results: pure functions over per-question outcomes.

Accuracy and its standard error follow lm-evaluation-harness exactly (``mean`` and
``mean_stderr`` in ``lm_eval/api/metrics.py``: the sample standard deviation over ``sqrt(n)``,
summed in Python in sample order), so a number recomputed from a sample log equals the one
lm-eval reported, bit for bit.

The paired statistics use that both models answered the *same* questions: the 2x2 agreement
table, the exact McNemar test (a two-sided binomial test on the discordant pairs) and a paired
bootstrap interval for the accuracy difference. Two independent +-3% intervals cannot resolve a
3-point difference; a paired analysis of the same 198 questions can.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np


def accuracy(outcomes: Sequence[float]) -> float:
    """Mean of per-question scores, computed as lm-eval's ``mean`` (``sum(arr) / len(arr)``)."""
    if len(outcomes) == 0:
        raise ValueError("accuracy of an empty list of outcomes is undefined")
    return sum(outcomes) / len(outcomes)


def accuracy_stderr(outcomes: Sequence[float]) -> float | None:
    """Standard error of the mean exactly as lm-eval's ``mean_stderr``.

    ``sqrt(sum((x - mean)^2) / (n - 1)) / sqrt(n)``. lm-eval reports "N/A" for a single
    sample; this returns None then.
    """
    n = len(outcomes)
    if n < 2:
        return None
    mu = accuracy(outcomes)
    sample_std = math.sqrt(sum([(x - mu) ** 2 for x in outcomes]) / (n - 1))
    return sample_std / math.sqrt(n)


@dataclass(frozen=True)
class AgreementTable:
    """2x2 table of two models' correctness on the same questions (model A vs model B)."""

    both_correct: int
    a_only: int  # A correct, B wrong
    b_only: int  # A wrong, B correct
    both_wrong: int

    @property
    def n(self) -> int:
        return self.both_correct + self.a_only + self.b_only + self.both_wrong

    @property
    def discordant(self) -> int:
        return self.a_only + self.b_only


def _as_bool_vector(name: str, outcomes: Sequence[float] | np.ndarray) -> np.ndarray:
    values = np.asarray(outcomes, dtype=float)
    if values.ndim != 1:
        raise ValueError(f"{name}: expected a 1-d sequence of 0/1 outcomes")
    if not np.all((values == 0.0) | (values == 1.0)):
        raise ValueError(f"{name}: outcomes must be 0 or 1 (correct / not correct)")
    return values == 1.0


def agreement_table(correct_a: Sequence[float], correct_b: Sequence[float]) -> AgreementTable:
    """Cross-tabulate two aligned 0/1 vectors (question i of A is question i of B)."""
    a = _as_bool_vector("correct_a", correct_a)
    b = _as_bool_vector("correct_b", correct_b)
    if a.shape != b.shape:
        raise ValueError(f"outcome vectors differ in length: {a.size} vs {b.size}")
    return AgreementTable(
        both_correct=int(np.sum(a & b)),
        a_only=int(np.sum(a & ~b)),
        b_only=int(np.sum(~a & b)),
        both_wrong=int(np.sum(~a & ~b)),
    )


def mcnemar_exact_p(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar p-value.

    Under H0 (equal accuracy) each discordant pair falls either way with probability 1/2, so
    ``min(a_only, b_only) ~ Binomial(n = a_only + b_only, 1/2)``;
    ``p = min(1, 2 * P(X <= min(a_only, b_only)))``. Computed with exact fractions; 1.0
    when there are no discordant pairs.
    """
    if a_only < 0 or b_only < 0:
        raise ValueError("discordant counts must be non-negative")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


@dataclass(frozen=True)
class BootstrapInterval:
    """Percentile interval of the paired accuracy difference ``mean(B) - mean(A)``."""

    difference: float
    low: float
    high: float
    confidence: float
    resamples: int
    seed: int


def paired_bootstrap_ci(
    correct_a: Sequence[float],
    correct_b: Sequence[float],
    *,
    resamples: int,
    seed: int,
    confidence: float = 0.95,
    chunk_resamples: int = 1000,
) -> BootstrapInterval:
    """Paired bootstrap percentile interval for ``accuracy(B) - accuracy(A)``.

    Questions are resampled with replacement, the same indices for both models (that is what
    makes it paired). Deterministic for a given seed: one ``numpy.random.Generator(PCG64(seed))``
    draws all indices, in chunks of ``chunk_resamples`` to bound memory.
    """
    a = _as_bool_vector("correct_a", correct_a).astype(float)
    b = _as_bool_vector("correct_b", correct_b).astype(float)
    if a.shape != b.shape:
        raise ValueError(f"outcome vectors differ in length: {a.size} vs {b.size}")
    n = a.size
    if n == 0:
        raise ValueError("bootstrap of an empty list of outcomes is undefined")
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be in (0, 1)")
    per_question = b - a  # -1, 0 or +1
    rng = np.random.Generator(np.random.PCG64(seed))
    diffs = np.empty(resamples, dtype=float)
    for start in range(0, resamples, chunk_resamples):
        stop = min(resamples, start + chunk_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        diffs[start:stop] = per_question[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(diffs, [alpha / 2, 1.0 - alpha / 2])
    return BootstrapInterval(
        difference=float(per_question.mean()),
        low=float(low),
        high=float(high),
        confidence=confidence,
        resamples=resamples,
        seed=seed,
    )
