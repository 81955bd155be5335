"""Phase 1: the model writes its own continuation of every calibration prompt.

Each prompt goes through the model's chat template (thinking enabled where the template supports
it) and is greedily continued for ``calibration.max_new_tokens`` tokens. The result is a JSONL file,
one line per prompt::

    {"id", "domain", "prompt", "input_ids" (prompt + response), "prompt_len", "text",
     "response_text", "input_key"}

``input_key`` hashes everything the sequence depends on (model, tokenizer, prompt, settings); a
rerun keeps lines whose key is unchanged and generates only the rest.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeprune.atomic import atomic_file
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_json

SEQUENCE_FIELDS = ("id", "domain", "prompt", "input_ids", "prompt_len", "text", "response_text")


class CalibrationError(MoepruneError):
    """A calibration prompts file that cannot be used."""


class SequenceError(MoepruneError):
    """A phase-1 sequence that cannot be profiled (e.g. longer than the model's context)."""


@dataclass(frozen=True)
class CalibrationPrompt:
    """One calibration prompt and the line it came from."""

    id: str
    domain: str
    prompt: str
    line: int


def load_calibration(
    path: Path, domains: Sequence[str] | None = None, prompts_per_domain: int | None = None
) -> list[CalibrationPrompt]:
    """Read and validate a calibration JSONL file (``{"id", "domain", "prompt"}`` per line).

    Blank lines are skipped. Errors name the file and line: invalid JSON, a missing or non-string
    field, an empty prompt, a duplicate id, a domain outside ``domains``; and, when given, a domain
    without exactly ``prompts_per_domain`` prompts.
    """
    from moeprune.userfile import read_text

    path = Path(path)
    text = read_text(path, "calibration prompts file", CalibrationError)
    prompts: list[CalibrationPrompt] = []
    first_line_of: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise CalibrationError(f'{where}: expected an object {{"id", "domain", "prompt"}}, got {type(record).__name__}')
        for key in ("id", "domain", "prompt"):
            if key not in record:
                raise CalibrationError(f"{where}: missing field '{key}'")
            if not isinstance(record[key], str):
                raise CalibrationError(f"{where}: field '{key}' must be a string, got {json.dumps(record[key])}")
        unknown = sorted(set(record) - {"id", "domain", "prompt"})
        if unknown:
            raise CalibrationError(f"{where}: unknown field(s) {unknown}; allowed: id, domain, prompt")
        if not record["id"].strip():
            raise CalibrationError(f"{where}: field 'id' is empty")
        if not record["prompt"].strip():
            raise CalibrationError(f"{where}: prompt '{record['id']}' is empty; write the prompt text or remove the line")
        if record["id"] in first_line_of:
            raise CalibrationError(
                f"{where}: duplicate id '{record['id']}' (first on line {first_line_of[record['id']]})"
            )
        if domains is not None and record["domain"] not in domains:
            raise CalibrationError(
                f"{where}: domain '{record['domain']}' is not one of calibration.domains {list(domains)}"
            )
        first_line_of[record["id"]] = number
        prompts.append(CalibrationPrompt(record["id"], record["domain"], record["prompt"], number))
    if not prompts:
        raise CalibrationError(f"{path}: no prompts; add one JSON object per line")
    if domains is not None and prompts_per_domain is not None:
        counts = Counter(p.domain for p in prompts)
        wrong = {d: counts.get(d, 0) for d in domains if counts.get(d, 0) != prompts_per_domain}
        if wrong:
            raise CalibrationError(
                f"{path}: calibration.prompts_per_domain = {prompts_per_domain}, but the file has "
                + ", ".join(f"{count} '{domain}' prompt(s)" for domain, count in wrong.items())
            )
    return prompts


def template_supports_thinking(tokenizer: Any) -> bool:
    """Whether the chat template reads ``enable_thinking`` (otherwise the flag is silently ignored)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "enable_thinking" in template


def render_prompt_ids(tokenizer: Any, prompt: str, enable_thinking: bool) -> list[int]:
    """Token ids of one user turn through the chat template, ending with the generation prompt."""
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        # The template already wrote BOS and turn markers.
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def sequence_key(
    *, model_sha256: str, tokenizer_sha256: str, prompt: CalibrationPrompt, settings: dict[str, Any]
) -> str:
    """Hash of every input of one phase-1 sequence."""
    return sha256_json(
        {
            "model_sha256": model_sha256,
            "tokenizer_sha256": tokenizer_sha256,
            "id": prompt.id,
            "domain": prompt.domain,
            "prompt": prompt.prompt,
            "settings": settings,
        }
    )


def sequence_record(
    prompt: CalibrationPrompt, prompt_ids: list[int], response: list[int], tokenizer: Any, input_key: str
) -> dict[str, Any]:
    """One line of ``sequences.jsonl``: the prompt, its ids plus the response ids, and both decoded."""
    full = prompt_ids + response
    return {
        "id": prompt.id,
        "domain": prompt.domain,
        "prompt": prompt.prompt,
        "input_ids": full,
        "prompt_len": len(prompt_ids),
        "text": tokenizer.decode(full, skip_special_tokens=False),
        "response_text": tokenizer.decode(response, skip_special_tokens=False),
        "input_key": input_key,
    }


def read_sequences(path: Path) -> list[dict[str, Any]]:
    """Read a sequences JSONL file; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise SequenceError(f"{path}: sequences file not found; run phase 1 (invoke profile)")
    records = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SequenceError(f"{path}:{number}: not valid JSON ({exc.msg}); delete the file to regenerate") from None
        missing = [key for key in SEQUENCE_FIELDS if key not in record]
        if missing:
            raise SequenceError(f"{path}:{number}: missing field(s) {missing}; delete the file to regenerate")
        ids = record["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(v, int) for v in ids):
            raise SequenceError(f"{path}:{number}: 'input_ids' must be a non-empty list of ints")
        if not isinstance(record["prompt_len"], int) or not 0 < record["prompt_len"] <= len(ids):
            raise SequenceError(f"{path}:{number}: 'prompt_len' must be in 1..{len(ids)}")
        record["_line"] = number
        records.append(record)
    return records


def write_sequences(path: Path, records: list[dict[str, Any]]) -> None:
    """Write sequences JSONL atomically (one compact object per line)."""
    with atomic_file(Path(path)) as handle:
        for record in records:
            clean = {key: value for key, value in record.items() if not key.startswith("_")}
            handle.write(json.dumps(clean, ensure_ascii=False, sort_keys=True) + "\n")


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(v) for v in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def generate_sequences(
    model: Any,
    tokenizer: Any,
    prompts: list[CalibrationPrompt],
    *,
    max_new_tokens: int,
    enable_thinking: bool,
    batch_size: int,
    keys: dict[str, str],
    context_tokens: int | None,
    prompts_path: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    share: Callable[[list[int]], list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Greedy-generate a continuation of each prompt; return sequence records in prompt order.

    Raises SequenceError (naming the prompt and line) when prompt + max_new_tokens would not fit in
    ``context_tokens``. ``on_batch(n)`` is called after each batch of n prompts. ``share`` picks,
    from the batches' start positions, the ones this caller generates (a data-parallel rank's
    share, :meth:`moeprune.profile.parallel.World.share`): the batches themselves are the single
    process's, so each prompt gets the same neighbours and padding; only those prompts' records are
    returned.
    """
    import torch

    from moeprune.profile.loading import input_device

    where = str(prompts_path) if prompts_path else "calibration"
    rendered = []
    for prompt in prompts:
        ids = render_prompt_ids(tokenizer, prompt.prompt, enable_thinking)
        if context_tokens is not None and len(ids) + max_new_tokens > context_tokens:
            raise SequenceError(
                f"{where}:{prompt.line}: prompt '{prompt.id}' has {len(ids)} tokens; with "
                f"calibration.max_new_tokens = {max_new_tokens} the sequence would exceed the model's "
                f"context of {context_tokens} tokens; shorten the prompt or lower max_new_tokens"
            )
        rendered.append(ids)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    device = input_device(model)
    # Longest first keeps padding low inside each batch; output order is restored below.
    order = sorted(range(len(prompts)), key=lambda i: -len(rendered[i]))
    by_index: dict[int, dict[str, Any]] = {}
    starts = list(range(0, len(order), batch_size))
    for start in share(starts) if share is not None else starts:
        batch = order[start : start + batch_size]
        width = max(len(rendered[i]) for i in batch)
        # Left padding: every prompt ends at the same column, where generation starts.
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = rendered[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        for row, i in enumerate(batch):
            response = output[row, width:].tolist()
            # Cut after the first end-of-sequence token: what follows is padding of finished rows.
            for position, token in enumerate(response):
                if token in eos_ids:
                    response = response[: position + 1]
                    break
            by_index[i] = sequence_record(prompts[i], rendered[i], response, tokenizer, keys[prompts[i].id])
        if on_batch is not None:
            on_batch(len(batch))
    return [by_index[i] for i in range(len(prompts)) if i in by_index]
