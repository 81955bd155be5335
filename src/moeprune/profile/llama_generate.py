"""Phase 1 through llama-server: greedy continuations from a base-model GGUF (``profile.generate``).

Generation is what llama.cpp does best (any GGUF type, partial GPU offload on any card), and
phase 1 needs nothing but the generated token ids. The prompts are rendered exactly as in the
transformers path (:func:`moeprune.profile.generate.render_prompt_ids`: the HF tokenizer's chat
template, thinking switch included) and sent to ``POST /completion`` as token ids, so both paths
continue the same prompt tokens. The server returns the generated ids (``return_tokens``); they are
cut after the first end-of-sequence token as in the transformers path and recorded as they are.

Checks, each failing with the prompt (id and line) named:

- the GGUF's tokenizer turns the rendered prompt text into the HF tokenizer's ids (``/tokenize``),
  and the server evaluated exactly those prompt tokens;
- every generated id re-tokenizes identically with the HF tokenizer: the text llama-server gives
  the token (``/detokenize``), encoded by the HF tokenizer, is that one id again, and the HF
  tokenizer's decoding of the response equals llama-server's. So the ids phase 2 replays are the
  tokens llama.cpp generated, in the HF model's vocabulary.

A model may generate a sequence that is not the HF tokenizer's own (canonical) tokenization of its
text, e.g. a loop of ``" = "`` tokens that the tokenizer would split as ``" ", "=", "  "``. Those
are still the generated tokens, which is what the replay must see (the transformers path records
them just the same); each record says whether it is canonical and the stage warns about those
that are not.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.profile.generate import CalibrationPrompt, SequenceError, render_prompt_ids, sequence_record

# llama.cpp's KV cache is allocated in cells of this many tokens; the context is rounded up to it.
_CTX_ROUND_TOKENS = 256


class GenerationError(MoepruneError):
    """llama-server's phase-1 output cannot be used."""


def completion_request(prompt_ids: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
    """The ``/completion`` body of one greedy continuation: top-1 sampling only, no prompt cache,
    no penalties (llama.cpp's defaults for them are off), generated ids returned."""
    return {
        "prompt": list(prompt_ids),
        "n_predict": max_new_tokens,
        "samplers": ["top_k"],
        "top_k": 1,
        "temperature": 0.0,
        "seed": 0,
        "cache_prompt": False,
        "return_tokens": True,
        "stream": False,
    }


def context_size(prompt_lengths: Sequence[int], max_new_tokens: int) -> int:
    """Context tokens llama-server needs for the longest prompt plus its continuation."""
    needed = max(prompt_lengths, default=0) + max_new_tokens + 1
    return max(_CTX_ROUND_TOKENS, -(-needed // _CTX_ROUND_TOKENS) * _CTX_ROUND_TOKENS)


def cut_at_eos(response: Sequence[int], eos_ids: set[int]) -> list[int]:
    """The response up to and including its first end-of-sequence token (as the transformers path)."""
    for position, token in enumerate(response):
        if token in eos_ids:
            return list(response[: position + 1])
    return list(response)


def round_trip_mismatch(tokenizer: Any, ids: Sequence[int]) -> tuple[int, list[int]] | None:
    """None when decoding ``ids`` and re-encoding the text gives ``ids`` back; else (first differing
    position, the re-encoded ids)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    again = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if again == list(ids):
        return None
    position = next((i for i, (a, b) in enumerate(zip(ids, again)) if a != b), min(len(ids), len(again)))
    return position, again


def _post(server: Any, path: str, body: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout_s)
    try:
        connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = response.read()
    except (OSError, http.client.HTTPException) as exc:
        server.check_alive()
        raise GenerationError(f"request to {server.base_url}{path} failed: {exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise GenerationError(f"{server.base_url}{path} answered HTTP {response.status}: {payload[:1000]!r}")
    return json.loads(payload)


def generate_with_server(
    server: Any,
    tokenizer: Any,
    prompts: list[CalibrationPrompt],
    *,
    max_new_tokens: int,
    enable_thinking: bool,
    keys: dict[str, str],
    eos_ids: set[int],
    context_tokens: int | None,
    prompts_path: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    timeout_s: float = 3600.0,
) -> list[dict[str, Any]]:
    """Greedy-continue every prompt on a running llama-server; return sequence records in prompt
    order (the fields of :func:`moeprune.profile.generate.generate_sequences`)."""
    where = str(prompts_path) if prompts_path else "calibration"
    records = []
    pieces: dict[int, str] = {}  # token id -> llama-server's text of it
    for prompt in prompts:
        place = f"{where}:{prompt.line}: prompt '{prompt.id}'"
        prompt_ids = render_prompt_ids(tokenizer, prompt.prompt, enable_thinking)
        if context_tokens is not None and len(prompt_ids) + max_new_tokens > context_tokens:
            raise SequenceError(
                f"{place} has {len(prompt_ids)} tokens; with calibration.max_new_tokens = {max_new_tokens} the "
                f"sequence would exceed the model's context of {context_tokens} tokens; shorten the prompt or "
                "lower max_new_tokens"
            )
        text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
        served = _post(server, "/tokenize", {"content": text, "add_special": False, "parse_special": True}, timeout_s)
        if list(served.get("tokens", [])) != prompt_ids:
            raise GenerationError(
                f"{place}: the GGUF's tokenizer reads the rendered prompt as {len(served.get('tokens', []))} "
                f"tokens, the HF tokenizer as {len(prompt_ids)} (or as other ids): the GGUF was not converted "
                "from this model's tokenizer; convert it from model.base"
            )
        answer = _post(server, "/completion", completion_request(prompt_ids, max_new_tokens), timeout_s)
        evaluated = answer.get("tokens_evaluated")
        if evaluated is not None and int(evaluated) != len(prompt_ids):
            raise GenerationError(f"{place}: llama-server evaluated {evaluated} prompt tokens, not the {len(prompt_ids)} sent")
        generated = answer.get("tokens")
        if not isinstance(generated, list) or not all(isinstance(t, int) for t in generated):
            raise GenerationError(f"{place}: llama-server returned no generated token ids (return_tokens)")
        if len(generated) > max_new_tokens:
            raise GenerationError(f"{place}: llama-server returned {len(generated)} tokens, more than n_predict = {max_new_tokens}")
        response = cut_at_eos(generated, eos_ids)
        for position, token in enumerate(response):
            if token not in pieces:
                pieces[token] = str(_post(server, "/detokenize", {"tokens": [token]}, timeout_s).get("content", ""))
            again = list(tokenizer(pieces[token], add_special_tokens=False)["input_ids"])
            if again != [token]:
                raise GenerationError(
                    f"{place}: generated token {position} (id {token}, {pieces[token]!r} in the GGUF) re-tokenizes "
                    f"with the HF tokenizer as {again}: the GGUF's vocabulary is not the HF tokenizer's; convert "
                    "the GGUF from model.base"
                )
        served_text = "".join(pieces[token] for token in response)
        if tokenizer.decode(response, skip_special_tokens=False) != served_text:
            raise GenerationError(
                f"{place}: the HF tokenizer decodes the generated ids to other text than llama-server does; "
                "the GGUF's vocabulary is not the HF tokenizer's: convert the GGUF from model.base"
            )
        record = sequence_record(prompt, prompt_ids, response, tokenizer, keys[prompt.id])
        record["canonical"] = round_trip_mismatch(tokenizer, record["input_ids"]) is None
        records.append(record)
        if on_batch is not None:
            on_batch(1)
    return records


def eos_ids_of(model_dir: Path, tokenizer: Any) -> set[int]:
    """End-of-sequence ids as the transformers path uses them: generation_config.json's, plus the
    tokenizer's."""
    ids: set[int] = set()
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(v) for v in eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def run_llama_server_generation(
    recipe: Any,
    layout: Any,
    model_dir: Path,
    tokenizer: Any,
    prompts: list[CalibrationPrompt],
    *,
    keys: dict[str, str],
    context_tokens: int | None,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start llama-server on the recipe's ``profile.generate_gguf`` and generate every prompt; return
    the sequence records and where the server ran (its ``serve.rpc`` workers, as eval records them)."""
    from moeprune.llamacpp.build import ensure_llamacpp
    from moeprune.llamacpp.rpc import topology
    from moeprune.llamacpp.server import LlamaServer

    gguf = recipe.generate_gguf_path
    if gguf is None or not gguf.is_file():
        raise GenerationError(
            f"profile.generate_gguf = {recipe.profile.generate_gguf!r}: GGUF not found ({gguf}); convert the base "
            "model first (invoke convert --which base) and name that file"
        )
    calibration = recipe.calibration
    lengths = [len(render_prompt_ids(tokenizer, p.prompt, calibration.enable_thinking)) for p in prompts]
    serve = recipe.serve.model_copy(
        update={
            "ctx_size": context_size(lengths, calibration.max_new_tokens),
            "n_gpu_layers": recipe.profile.generate_n_gpu_layers,
            "reasoning_budget": -1,  # phase 1 thinks as long as the transformers path would
            "parallel": 1,
        }
    )
    build = ensure_llamacpp(recipe.llamacpp)
    served_on = topology(serve.rpc, build.record)  # asked before the server connects: a worker serves one client
    log_path = layout.logs_dir / "profile-phase1-llama-server.log"
    with LlamaServer(build, gguf, serve, log_path) as server:
        records = generate_with_server(
            server,
            tokenizer,
            prompts,
            max_new_tokens=calibration.max_new_tokens,
            enable_thinking=calibration.enable_thinking,
            keys=keys,
            eos_ids=eos_ids_of(model_dir, tokenizer),
            context_tokens=context_tokens,
            prompts_path=recipe.prompts_path,
            on_batch=on_batch,
        )
        server.confirm_serving()  # every sequence came from the server started here
        return records, served_on
