"""Per-sample logs of lm-evaluation-harness: JSONL reading and writing.

lm-eval logs one record per (document, filter): ``doc_id``, ``doc``, ``target``,
``arguments``, ``resps`` (``[[text]]`` for a generation task), ``filtered_resps``
(``["(B)"]``), ``filter`` (e.g. ``"flexible-extract"``), ``metrics`` (names) and one key per
metric (``"exact_match": 1.0``), plus ``doc_hash`` / ``prompt_hash`` / ``target_hash``. Its own
writer names the file ``samples_<task>_<timestamp>.jsonl``; ours writes
``samples_<task>.jsonl``. Both are read here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_file
from moeprune.errors import MoepruneError


class SampleLogError(MoepruneError):
    """A per-sample log that is missing or cannot be read."""


def sample_log_name(task: str) -> str:
    """File name of our per-sample log of one task."""
    return f"samples_{task}.jsonl"


def _default(value: Any) -> Any:
    # lm-eval keeps numpy scalars and other objects in docs; its own writer stringifies them.
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_sample_log(path: Path, records: Iterable[Mapping[str, Any]]) -> int:
    """Write records as JSONL atomically (one JSON object per line); return the line count."""
    count = 0
    with atomic_file(Path(path)) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False, default=_default, sort_keys=True))
            handle.write("\n")
            count += 1
    if not Path(path).is_file():  # never trust a writer that only logs failures
        raise SampleLogError(f"{path}: sample log was not written")
    return count


def read_sample_log(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL sample log; raise SampleLogError naming the file and line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise SampleLogError(f"{path}: sample log not found; run `invoke eval` to produce it")
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SampleLogError(f"{path}:{line_no}: not valid JSON: {exc}") from None
            if not isinstance(record, dict):
                raise SampleLogError(f"{path}:{line_no}: expected a JSON object per line")
            records.append(record)
    return records


def find_sample_logs(directory: Path, task: str) -> list[Path]:
    """Sample logs of ``task`` in ``directory``: ours (``samples_<task>.jsonl``) or lm-eval's
    (``samples_<task>_<timestamp>.jsonl``), sorted by name."""
    directory = Path(directory)
    exact = directory / sample_log_name(task)
    if exact.is_file():
        return [exact]
    return sorted(directory.glob(f"samples_{task}_*.jsonl"))


def records_for_filter(records: Iterable[Mapping[str, Any]], filter_name: str) -> list[dict[str, Any]]:
    """The records of one filter, sorted by ``doc_id``; duplicates are an error."""
    chosen: dict[int, dict[str, Any]] = {}
    for record in records:
        if record.get("filter") != filter_name:
            continue
        doc_id = record["doc_id"]
        if doc_id in chosen:
            raise SampleLogError(f"doc_id {doc_id} appears twice for filter '{filter_name}'")
        chosen[doc_id] = dict(record)
    return [chosen[key] for key in sorted(chosen)]


def filters_in(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Filter names present in a log, in first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        seen.setdefault(str(record.get("filter")), None)
    return list(seen)


def metric_names(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metric names of a log (the ``metrics`` field of lm-eval's records), first-seen order."""
    seen: dict[str, None] = {}
    for record in records:
        for name in record.get("metrics", []):
            seen.setdefault(name, None)
    return list(seen)


def with_finish_reasons(
    records: Iterable[Mapping[str, Any]], responses: Iterable[Mapping[str, Any]], task: str
) -> list[dict[str, Any]]:
    """lm-eval's sample records of ``task``, each given the server's ``finish_reason`` and
    ``completion_tokens`` from our response log (lm-eval drops both; the loop canary needs the
    first to count responses cut off at the generation budget).

    A record is matched by (task, doc_id) and by its response text; one with no match is left
    without the keys, so the canary reports truncation as not recorded instead of guessing.
    """
    from moeprune.eval.analysis import FINISH_REASON_KEY, response_text

    by_doc: dict[int, list[Mapping[str, Any]]] = {}
    for reply in responses:
        if reply.get("task") == task:
            for doc_id in reply.get("doc_ids") or []:
                by_doc.setdefault(doc_id, []).append(reply)
    out = []
    for record in records:
        record = dict(record)
        text = response_text(record)
        match = next((r for r in by_doc.get(record.get("doc_id"), []) if (r.get("response") or "") == text), None)
        if match is not None:
            record[FINISH_REASON_KEY] = match.get("finish_reason")
            record["completion_tokens"] = match.get("completion_tokens")
        out.append(record)
    return out
