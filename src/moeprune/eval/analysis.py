"""Error analysis of one model on one task, from lm-eval per-sample records (pure).

What the reference card reports for GPQA Diamond: how many answers were correct, wrong
(the model committed to another choice) or invalid (the flexible-extract filter found no
letter and lm-eval wrote its fallback ``"[invalid]"``); how the wrong answers spread over the
letters; and how long the responses were (median / mean characters, ~tokens = chars / 4, how
many exceed 20k and 30k characters).

The loop canary (:func:`loop_canary`) counts what accuracy hides in an aggressive prune: responses
cut off by the generation budget (llama-server's ``finish_reason`` is ``"length"``), responses
whose tail is a repeated n-gram loop (:func:`ends_in_loop`), and responses that end empty.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

INVALID_ANSWER = "[invalid]"  # lm-eval's RegexFilter / MultiChoiceRegexFilter fallback
PRIMARY_FILTER = "flexible-extract"
PRIMARY_METRIC = "exact_match"
CHARS_PER_TOKEN = 4  # the card's rule of thumb for "~tokens"
LONG_RESPONSE_CHARS = (20_000, 30_000)
# The loop rule, one definition (README "Loop canary", the card states it): a response loops
# when its last LOOP_MIN_SPAN_WORDS or more whitespace-separated words repeat one n-gram of
# n <= LOOP_MAX_NGRAM_WORDS words at least LOOP_MIN_REPEATS times in a row (a cut last copy
# counts, and so does one whose last word was cut in half).
LOOP_MAX_NGRAM_WORDS = 50
LOOP_MIN_REPEATS = 4
LOOP_MIN_SPAN_WORDS = 20
TRUNCATED_FINISH_REASON = "length"  # OpenAI / llama-server: stopped at max_tokens (max_gen_toks)
FINISH_REASON_KEY = "finish_reason"  # what our eval adds to each lm-eval sample record

_LETTER = re.compile(r"^\(?([A-Za-z])\)?$")


def response_text(record: Mapping[str, Any]) -> str:
    """The model's raw response of a generation record (``resps`` is ``[[text]]``)."""
    resps = record.get("resps") or [[""]]
    first = resps[0]
    text = first[0] if isinstance(first, list) and first else first
    return text if isinstance(text, str) else ""


def extracted_answer(record: Mapping[str, Any]) -> str:
    """The filtered answer (``filtered_resps`` is ``["(B)"]``) as a string."""
    filtered = record.get("filtered_resps") or [INVALID_ANSWER]
    value = filtered[0]
    if isinstance(value, list):  # some filters keep a list per request
        value = value[0] if value else INVALID_ANSWER
    return str(value)


def answer_letter(answer: str) -> str | None:
    """``"(B)"`` / ``"B"`` / ``"b"`` -> ``"B"``; anything else -> None."""
    match = _LETTER.match(answer.strip())
    return match.group(1).upper() if match else None


def is_correct(record: Mapping[str, Any], metric: str = PRIMARY_METRIC) -> bool:
    """True when the record's metric value is 1 (lm-eval's exact_match)."""
    return float(record[metric]) == 1.0


def response_length_stats(texts: Sequence[str]) -> dict[str, Any]:
    """Median / mean characters, approximate tokens, counts above the long-response marks."""
    lengths = [len(text) for text in texts]
    if not lengths:
        return {
            "count": 0, "median_chars": None, "mean_chars": None,
            "median_tokens_approx": None, "mean_tokens_approx": None,
            "max_chars": None, "over_chars": {str(mark): 0 for mark in LONG_RESPONSE_CHARS},
            "chars_per_token": CHARS_PER_TOKEN,
        }
    median_chars = float(statistics.median(lengths))
    mean_chars = sum(lengths) / len(lengths)
    return {
        "count": len(lengths),
        "median_chars": median_chars,
        "mean_chars": mean_chars,
        "median_tokens_approx": median_chars / CHARS_PER_TOKEN,
        "mean_tokens_approx": mean_chars / CHARS_PER_TOKEN,
        "max_chars": max(lengths),
        "over_chars": {str(mark): sum(1 for n in lengths if n > mark) for mark in LONG_RESPONSE_CHARS},
        "chars_per_token": CHARS_PER_TOKEN,
    }


def periodic_tail_words(words: Sequence[str], period: int) -> int:
    """How many trailing ``words`` repeat with ``period`` (``words[i] == words[i + period]``),
    counting the first copy; 0 when fewer than two periods fit."""
    if period < 1 or len(words) < 2 * period:
        return 0
    i = len(words) - period - 1
    while i >= 0 and words[i] == words[i + period]:
        i -= 1
    span = len(words) - (i + 1)
    return span if span >= 2 * period else 0


def ends_in_loop(text: str) -> bool:
    """True when the response's tail is one n-gram repeated by the loop rule above.

    Only the tail counts: a model that repeated itself and then went on to answer did not loop
    unboundedly; one that loops to the end of its budget ends in the loop.
    """
    words = text.split()
    # The budget can cut the last word in half ("... so the ans"): the tail may also start before it.
    for tail in (words, words[:-1]):
        for period in range(1, LOOP_MAX_NGRAM_WORDS + 1):
            span = periodic_tail_words(tail, period)
            if span >= LOOP_MIN_REPEATS * period and span >= LOOP_MIN_SPAN_WORDS:
                return True
    return False


def is_empty_response(text: str) -> bool:
    """No visible answer: nothing but whitespace (e.g. everything went into the reasoning)."""
    return not text.strip()


def loop_canary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Truncated / looping / empty response counts of one filter's records, and the loop rule.

    ``truncated`` is None when a record does not carry ``finish_reason`` (lm-eval's own sample
    logs drop it; ``invoke eval`` adds it from the server's reply), so it is never guessed.
    """
    texts = [response_text(r) for r in records]
    recorded = all(FINISH_REASON_KEY in r for r in records)
    return {
        "truncated": sum(1 for r in records if r.get(FINISH_REASON_KEY) == TRUNCATED_FINISH_REASON)
        if recorded else None,
        "looping": sum(1 for text in texts if ends_in_loop(text)),
        "empty": sum(1 for text in texts if is_empty_response(text)),
        "loop_rule": {"max_ngram_words": LOOP_MAX_NGRAM_WORDS, "min_repeats": LOOP_MIN_REPEATS,
                      "min_span_words": LOOP_MIN_SPAN_WORDS},
    }


def error_analysis(
    records: Sequence[Mapping[str, Any]],
    *,
    filter_name: str = PRIMARY_FILTER,
    metric: str = PRIMARY_METRIC,
) -> dict[str, Any]:
    """Correct / wrong / invalid counts, wrong-letter distribution and response lengths.

    ``records`` are lm-eval sample records; only those of ``filter_name`` are used (one per
    question). A record is *invalid* when the filter fell back to ``"[invalid]"``, *correct*
    when ``metric`` is 1, *wrong* otherwise.
    """
    chosen = [r for r in records if r.get("filter") == filter_name]
    if not chosen:
        raise ValueError(f"no sample records for filter '{filter_name}'")
    correct = wrong = invalid = 0
    wrong_letters: dict[str, int] = {}
    target_letters: dict[str, int] = {}
    for record in chosen:
        answer = extracted_answer(record)
        target = answer_letter(str(record.get("target", "")))
        if target is not None:
            target_letters[target] = target_letters.get(target, 0) + 1
        if is_correct(record, metric):
            correct += 1
        elif answer == INVALID_ANSWER:
            invalid += 1
        else:
            wrong += 1
            letter = answer_letter(answer) or "other"
            wrong_letters[letter] = wrong_letters.get(letter, 0) + 1
    total = len(chosen)
    return {
        "filter": filter_name,
        "metric": metric,
        "total": total,
        "correct": correct,
        "wrong": wrong,
        "invalid": invalid,
        "correct_fraction": correct / total,
        "wrong_fraction": wrong / total,
        "invalid_fraction": invalid / total,
        "wrong_answer_letters": dict(sorted(wrong_letters.items())),
        "target_letters": dict(sorted(target_letters.items())),
        "response_length": response_length_stats([response_text(r) for r in chosen]),
        "canary": loop_canary(chosen),
    }
