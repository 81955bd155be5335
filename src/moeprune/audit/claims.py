"""Claims of a model card, read from its model-index metadata and from text laid out like the
seed card's (pure functions over the README text).

What is read:

- ``model-index`` in the YAML front matter: each metric whose name or type names an lm-eval filter
  (``flexible-extract``, ``strict-match``) is an accuracy claim (a value above 1 is a percentage);
- tables: the headline comparison (``| | Original | This model | Delta |``: accuracy with its
  ``±`` stderr, experts per layer, top-k, total parameters, safetensors size), the results table
  (``| Metric | Score |`` with a filter per row) and the per-layer retention table
  (``| Layer | Retained % | Layer | Retained % | ...``);
- error-analysis lines (``142 correct (71.7%)``, ``55 wrong answer``, ``1 invalid extraction``,
  ``(A: 12, B: 11, ...)`` after "Wrong answers", median / mean response length, ``N responses
  exceeded 20k characters``, ``198 questions``), ``Worst case: Layer 14 at 99.01%`` and the
  architecture lines (``Layers: 30``, ``Hidden size: 2816``, ...).

Every other table cell with a number, and every line with a number in the results, evaluation,
error-analysis or pruning sections that no rule reads, is returned as *unparsed*: the audit lists
it as "not checked", never as passed.

A claim matches a recomputed value when they agree to the claim's displayed precision (half a unit
of its last digit; for ``~630`` half a unit of its last non-zero digit).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moeprune.eval.analysis import PRIMARY_FILTER

FILTERS = (PRIMARY_FILTER, "strict-match")
GIB = 1024**3
_NUMBER = re.compile(r"(?P<approx>~)?(?P<num>-?\d[\d,]*(?:\.\d+)?)\s*(?P<unit>%|B\b|M\b|GiB|GB|k\b)?"
                     r"(?:\s*±\s*(?P<err>\d[\d.]*)\s*%)?")
_HAS_DIGIT = re.compile(r"\d")
_CHECKED_SECTIONS = re.compile(r"result|evaluation|error|pruning|response|decision", re.IGNORECASE)


@dataclass(frozen=True)
class Claim:
    """One number the card states. ``scale`` turns the recomputed value into the claim's units."""

    key: str
    value: float
    decimals: int
    tolerance: float
    scale: float
    where: str  # "README.md:12" or "README.md: model-index"
    text: str

    def matches(self, recomputed: float) -> bool:
        return abs(recomputed * self.scale - self.value) <= self.tolerance + 1e-9 * max(1.0, abs(self.value))

    def shown(self, recomputed: float) -> str:
        value = recomputed * self.scale
        return f"{value:.{self.decimals}f}" if self.decimals else f"{value:,.0f}"


@dataclass(frozen=True)
class Unparsed:
    where: str
    text: str


def _number(text: str, approx: bool = False) -> tuple[float, int, float]:
    """(value, decimals, tolerance) of a displayed number like ``2,536``, ``71.72``, ``~630``."""
    clean = text.replace(",", "")
    decimals = len(clean.split(".", 1)[1]) if "." in clean else 0
    tolerance = 0.5 * 10**-decimals
    if approx and decimals == 0:
        digits = clean.lstrip("-")
        zeros = len(digits) - len(digits.rstrip("0")) if digits.strip("0") else 0
        tolerance = 0.5 * 10**zeros
    return float(clean), decimals, tolerance


def _claim(key: str, text: str, where: str, scale: float, approx: bool = False, raw: str | None = None) -> Claim:
    value, decimals, tolerance = _number(text, approx)
    return Claim(key, value, decimals, tolerance, scale, where, raw if raw is not None else text)


def split_front_matter(text: str) -> tuple[str | None, list[tuple[int, str]]]:
    """(YAML front matter or None, [(line number, line)] of the body)."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":
        for index in range(1, len(lines)):
            if lines[index].strip() == "---":
                return "\n".join(lines[1:index]), list(enumerate(lines[index + 1:], start=index + 2))
    return None, list(enumerate(lines, start=1))


def model_index_claims(front_matter: str | None, source: str) -> tuple[list[Claim], list[Unparsed]]:
    if front_matter is None:
        return [], []
    import yaml

    try:
        meta = yaml.safe_load(front_matter) or {}
    except yaml.YAMLError as exc:
        return [], [Unparsed(f"{source}: front matter", f"YAML does not parse: {exc}")]
    claims, unparsed = [], []
    for model in meta.get("model-index") or []:
        for result in (model or {}).get("results") or []:
            dataset = ((result or {}).get("dataset") or {}).get("name", "?")
            for metric in (result or {}).get("metrics") or []:
                label = f"{metric.get('name') or ''} {metric.get('type') or ''}".lower()
                value = metric.get("value")
                where = f"{source}: model-index ({dataset})"
                shown = f"{dataset} {metric.get('name') or metric.get('type')} = {value}"
                found = next((f for f in FILTERS if f in label or f.replace("-", " ") in label), None)
                if found is None or not isinstance(value, (int, float)) or isinstance(value, bool):
                    unparsed.append(Unparsed(where, shown))
                    continue
                scale = 100.0 if value > 1 else 1.0
                claims.append(_claim(f"accuracy/{found}", repr(float(value)) if isinstance(value, float) else str(value),
                                     where, scale, raw=shown))
    return claims, unparsed


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_separator(cells: list[str]) -> bool:
    return all(re.fullmatch(r":?-{3,}:?", cell) or cell == "" for cell in cells) and any(cells)


_COMPARISON_ROWS = (
    (re.compile(r"gpqa|accuracy|flexible", re.I), "accuracy/flexible-extract"),
    (re.compile(r"experts per layer", re.I), "experts_per_layer"),
    (re.compile(r"top-?k", re.I), "top_k"),
    (re.compile(r"total params|parameters", re.I), "total_params"),
    (re.compile(r"^(?!.*gguf).*(bf16|safetensors|weights).*size", re.I), "safetensors_gib"),
)


def _value_claims(key: str, cell: str, where: str, raw: str) -> list[Claim] | None:
    """Claims of one table cell under ``key``; None if the cell has no number this key can read."""
    match = _NUMBER.search(cell)
    if match is None:
        return None
    unit, number, approx = match["unit"], match["num"], bool(match["approx"])
    if key.endswith("total_params"):
        scale = {"B": 1e-9, "M": 1e-6}.get(unit or "")
        if scale is None:
            return None
        return [_claim(key, number, where, scale, approx, raw)]
    if key.endswith("safetensors_gib"):
        if unit not in ("GB", "GiB"):
            return None
        return [_claim(key, number, where, 1.0 / GIB, approx, raw)]
    if "accuracy/" in key:
        if unit != "%":
            return None
        out = [_claim(key, number, where, 100.0, approx, raw)]
        if match["err"]:
            out.append(_claim(key.replace("accuracy/", "stderr/"), match["err"], where, 100.0, False, raw))
        return out
    if unit:
        return None
    return [_claim(key, number, where, 1.0, approx, raw)]


def table_claims(block: list[tuple[int, str]], source: str) -> tuple[list[Claim], list[Unparsed]]:
    """Claims of one markdown table (``block`` = its lines with their numbers)."""
    rows = [(n, _cells(line)) for n, line in block]
    rows = [(n, cells) for n, cells in rows if not _is_separator(cells)]
    if not rows:
        return [], []
    header = [cell.lower() for cell in rows[0][1]]
    body = rows[1:]
    claims: list[Claim] = []
    unparsed: list[Unparsed] = []

    def leftover(n: int, cell: str, why: str = "") -> None:
        if _HAS_DIGIT.search(cell):
            unparsed.append(Unparsed(f"{source}:{n}", cell + (f" ({why})" if why else "")))

    if any("retained" in cell for cell in header) and any("layer" in cell for cell in header):
        for n, cells in body:
            for i in range(0, len(cells) - 1, 2):
                layer = re.fullmatch(r"L?(\d+)", cells[i])
                percent = re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", cells[i + 1])
                if layer and percent:
                    claims.append(_claim(f"retained/L{layer[1]}", percent[1], f"{source}:{n}", 100.0,
                                         raw=f"{cells[i]} {cells[i + 1]}"))
                else:
                    leftover(n, f"{cells[i]} {cells[i + 1]}")
        return claims, unparsed

    if header and re.search(r"original|base|this model|pruned", header[0]):
        # The seed card's header has no cell above the row labels (``| Original | This model | Delta | |``).
        header = [""] + header[:-1] if header[-1] == "" else [""] + header
    pruned_col = next((i for i, cell in enumerate(header) if re.search(r"this model|pruned", cell)), None)
    base_col = next((i for i, cell in enumerate(header) if re.search(r"original|base", cell)), None)
    if pruned_col is not None:
        for n, cells in body:
            label = cells[0] if cells else ""
            key = next((k for pattern, k in _COMPARISON_ROWS if pattern.search(label)), None)
            for i, cell in enumerate(cells[1:], start=1):
                column = "" if i == pruned_col else "base." if i == base_col else None
                parsed = None
                if key is not None and column is not None:
                    parsed = _value_claims(column + key, cell, f"{source}:{n}", f"{label}: {header[i]} {cell}")
                if parsed:
                    claims.extend(parsed)
                else:
                    leftover(n, f"{label}: {header[i] if i < len(header) else '?'} {cell}",
                             "derived difference" if column is None else "")
        return claims, unparsed

    if header[:2] == ["metric", "score"] or (len(header) >= 2 and "score" in header[1]):
        for n, cells in body:
            label = cells[0].lower()
            filter_name = next((f for f in FILTERS if f in label), None)
            parsed = _value_claims(f"accuracy/{filter_name}", cells[1], f"{source}:{n}", f"{cells[0]} {cells[1]}") \
                if filter_name and len(cells) > 1 else None
            if parsed:
                claims.extend(parsed)
            else:
                for cell in cells[1:]:
                    leftover(n, f"{cells[0]}: {cell}")
        return claims, unparsed

    for n, cells in body:  # any other table: its numbers are claims we cannot check
        label = cells[0] if cells else ""
        for cell in cells[1:]:
            leftover(n, f"{label}: {cell}")
    return claims, unparsed


_LINE_RULES: tuple[tuple[re.Pattern[str], tuple[tuple[str, str, float, bool], ...]], ...] = (
    (re.compile(r"(?P<n>\d[\d,]*) correct\b(?: \((?P<pct>[\d.]+)%\))?", re.I),
     (("correct", "n", 1.0, False), ("correct_fraction", "pct", 100.0, False))),
    (re.compile(r"(?P<n>\d[\d,]*) wrong(?: answers?)?\b(?: \((?P<pct>[\d.]+)%\))?", re.I),
     (("wrong", "n", 1.0, False), ("wrong_fraction", "pct", 100.0, False))),
    (re.compile(r"(?P<n>\d[\d,]*) invalid(?: extractions?)?\b(?: \((?P<pct>[\d.]+)%\))?", re.I),
     (("invalid", "n", 1.0, False), ("invalid_fraction", "pct", 100.0, False))),
    (re.compile(r"Median(?: response length)?: (?P<n>[\d,.]+) characters(?: \(~(?P<tok>[\d,]+) tokens\))?", re.I),
     (("median_chars", "n", 1.0, False), ("median_tokens", "tok", 1.0, True))),
    (re.compile(r"Mean(?: response length)?: (?P<n>[\d,.]+) characters(?: \(~(?P<tok>[\d,]+) tokens\))?", re.I),
     (("mean_chars", "n", 1.0, False), ("mean_tokens", "tok", 1.0, True))),
    (re.compile(r"(?P<n>\d[\d,]*) questions\b", re.I), (("questions", "n", 1.0, False),)),
    # The loop canary line, as moeprune's card writes it (moeprune.eval.analysis.loop_canary).
    (re.compile(r"(?P<n>\d[\d,]*) hit the generation budget", re.I), (("truncated", "n", 1.0, False),)),
    (re.compile(r"(?P<n>\d[\d,]*) end in a repeated n-gram loop", re.I), (("looping", "n", 1.0, False),)),
    (re.compile(r"(?P<n>\d[\d,]*) end empty", re.I), (("empty", "n", 1.0, False),)),
    (re.compile(r"^\W*Layers: (?P<n>\d+)", re.I), (("num_layers", "n", 1.0, False),)),
    (re.compile(r"Hidden size: (?P<n>[\d,]+)", re.I), (("hidden_size", "n", 1.0, False),)),
    (re.compile(r"Expert intermediate size: (?P<n>[\d,]+)", re.I), (("moe_intermediate_size", "n", 1.0, False),)),
    (re.compile(r"Dense MLP intermediate size: (?P<n>[\d,]+)", re.I), (("intermediate_size", "n", 1.0, False),)),
    (re.compile(r"Top-k routing: (?P<n>\d+)", re.I), (("top_k", "n", 1.0, False),)),
    (re.compile(r"Vocabulary: (?P<n>[\d,]+)", re.I), (("vocab_size", "n", 1.0, False),)),
    (re.compile(r"num_experts: (?P<n>\d+)", re.I), (("experts_per_layer", "n", 1.0, False),)),
    (re.compile(r"Uniform (?P<n>\d+) experts per layer", re.I), (("experts_per_layer", "n", 1.0, False),)),
)
_EXCEEDED = re.compile(r"(?P<n>\d[\d,]*) responses? exceeded (?P<k>\d+)k characters", re.I)
_WORST = re.compile(r"Worst case: Layer (?P<layer>\d+) at (?P<pct>[\d.]+)%", re.I)
_LETTERS = re.compile(r"\b(?P<letter>[A-Z]): (?P<n>\d+)\b")


def line_claims(number: int, line: str, source: str) -> tuple[list[Claim], bool]:
    """Claims of one non-table line, and whether any rule read it."""
    where = f"{source}:{number}"
    claims: list[Claim] = []
    for pattern, fields in _LINE_RULES:
        for match in pattern.finditer(line):
            for key, group, scale, approx in fields:
                if match[group]:
                    claims.append(_claim(key, match[group], where, scale, approx, match[0]))
    for match in _EXCEEDED.finditer(line):
        claims.append(_claim(f"over_{int(match['k']) * 1000}", match["n"], where, 1.0, raw=match[0]))
    for match in _WORST.finditer(line):
        claims.append(_claim(f"retained/L{match['layer']}", match["pct"], where, 100.0, raw=match[0]))
    if re.search(r"wrong answers", line, re.I):
        for match in _LETTERS.finditer(line):
            claims.append(_claim(f"wrong_letter/{match['letter']}", match["n"], where, 1.0, raw=match[0]))
    return claims, bool(claims)


def parse_card(text: str, source: str = "README.md") -> tuple[list[Claim], list[Unparsed]]:
    """Every claim this module can read from a card, and the numbers it could not read."""
    front, body = split_front_matter(text)
    claims, unparsed = model_index_claims(front, source)
    section = ""
    block: list[tuple[int, str]] = []

    def flush() -> None:
        if block:
            found, left = table_claims(block, source)
            claims.extend(found)
            unparsed.extend(left)
            block.clear()

    for number, line in body:
        stripped = line.strip()
        if stripped.startswith("|"):
            block.append((number, line))
            continue
        flush()
        if stripped.startswith("#"):
            section = stripped.lstrip("#").strip()
            continue
        if not _HAS_DIGIT.search(stripped):
            continue
        found, read = line_claims(number, stripped, source)
        claims.extend(found)
        if not read and _CHECKED_SECTIONS.search(section):
            unparsed.append(Unparsed(f"{source}:{number}", stripped))
    flush()
    return claims, unparsed


# Recomputed numbers an auditor wants to see even when the card states none of them.
SHOWN_UNCLAIMED = ("accuracy/flexible-extract", "stderr/flexible-extract", "accuracy/strict-match", "questions",
                   "correct", "wrong", "invalid", "median_chars", "mean_chars", "over_20000", "over_30000",
                   "truncated", "looping", "empty")


def compare_claims(report: Any, claims: list[Claim], unparsed: list[Unparsed],
                   recomputed: dict[str, tuple[float, str]], missing: dict[str, str] | None = None) -> None:
    """One (d) row per claim: pass / fail beside the recomputed value, or not checked.

    Recomputed eval numbers the card does not state (:data:`SHOWN_UNCLAIMED`, wrong answers by
    letter) get a "not checked" row too, with the value: nothing to compare them with.
    """
    missing = missing or {}
    claimed_keys = {claim.key for claim in claims}
    for key in [*SHOWN_UNCLAIMED, *sorted(k for k in recomputed if k.startswith("wrong_letter/"))]:
        if key in recomputed and key not in claimed_keys:
            value, origin = recomputed[key]
            report.not_checked("d", key, "README.md", f"recomputed from {origin}; the card states no such number",
                               recomputed=value)
    for claim in claims:
        shown_claim: float | int = int(claim.value) if claim.decimals == 0 else claim.value
        if claim.key not in recomputed:
            why = missing.get(claim.key) or missing.get(claim.key.split("/", 1)[0] + "/*") or \
                "nothing in the artifact recomputes it"
            report.not_checked("d", claim.key, claim.where, f"{claim.text}: {why}", claimed=shown_claim)
            continue
        value, origin = recomputed[claim.key]
        report.compare("d", claim.key, claim.where, shown_claim, claim.shown(value), claim.matches(value),
                       f"{claim.text}; recomputed from {origin}")
    for item in unparsed:
        report.not_checked("d", "unparsed claim", item.where, f"{item.text}: no rule reads this claim")
