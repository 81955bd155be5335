"""The recording chat-completions model: lm-eval's ``local-chat-completions`` with every answered
request appended to a partial log as it arrives, with the ``finish_reason`` and reasoning length
that lm-eval's own sample log drops (kept as evidence, and kept when an eval fails midway)."""

from __future__ import annotations

import contextvars
import json
import threading
from pathlib import Path
from typing import Any

PARTIAL_LOG_NAME = "samples.partial.jsonl"

_RAW_OUTPUTS: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "moeprune_raw_outputs", default=None
)


class PartialLog:
    """Append-only JSONL of responses as they arrive (kept when a run fails)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._handle = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._handle.write(line + "\n")
            self._handle.flush()  # a crash must not lose what was already answered
            self.count += 1

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def recording_model_class() -> type:
    """Subclass of lm-eval's LocalChatCompletion that logs each answered request.

    Built lazily so importing moeprune.eval does not import lm-eval.
    """
    from lm_eval.models.openai_completions import LocalChatCompletion

    class RecordingChatCompletion(LocalChatCompletion):
        def __init__(self, *, partial_log: PartialLog, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.partial_log = partial_log
            self._origin: dict[str, list[tuple[str, int]]] = {}

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            # Map each prompt to (task, doc_id) so the partial log says which question it was.
            for request in requests:
                prompt = request.args[0]
                key = getattr(prompt, "prompt", prompt)
                self._origin.setdefault(str(key), []).append((request.task_name, request.doc_id))
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

        def _record(self, messages: Any, outputs: Any) -> None:
            message = messages[0] if isinstance(messages, (list, tuple)) and messages else messages
            key = str(getattr(message, "prompt", message))
            origin = self._origin.get(key, [(None, None)])
            choices = outputs.get("choices") if isinstance(outputs, dict) else None
            choice = (choices or [{}])[0] or {}
            reply = choice.get("message") or {}
            content = reply.get("content")
            self.partial_log.write(
                {
                    "task": origin[0][0],
                    "doc_ids": [doc_id for _, doc_id in origin],
                    "prompt": key,
                    "response": content,
                    "reasoning_chars": len(reply.get("reasoning_content") or ""),
                    "finish_reason": choice.get("finish_reason"),
                    "completion_tokens": ((outputs.get("usage") if isinstance(outputs, dict) else None)
                                          or {}).get("completion_tokens"),
                }
            )

        def parse_generations(self, outputs: Any, **kwargs: Any) -> list[str]:
            slot = _RAW_OUTPUTS.get()
            if slot is not None:
                slot["outputs"] = outputs
            return super().parse_generations(outputs=outputs, **kwargs)

        async def amodel_call(self, session: Any, sem: Any, messages: Any, **kwargs: Any) -> Any:
            slot: dict[str, Any] = {}
            token = _RAW_OUTPUTS.set(slot)
            try:
                answers = await super().amodel_call(session, sem, messages, **kwargs)
            finally:
                _RAW_OUTPUTS.reset(token)
            self._record(messages, slot.get("outputs"))
            return answers

        def model_call(self, messages: Any, **kwargs: Any) -> Any:
            outputs = super().model_call(messages, **kwargs)
            if outputs is not None:
                self._record(messages, outputs)
            return outputs

    return RecordingChatCompletion
