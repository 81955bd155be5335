"""Phase 2: replay each stored sequence in one forward pass with the MoE layers instrumented.

Sequences are batched with right padding (positions of real tokens stay 0..n-1, and causal
attention never lets a real token see padding); padding tokens get domain -1 and are never counted.
Each row of a batch is one whole sequence, so the per-sequence statistic closes at each forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moeprune.profile.generate import SequenceError
from moeprune.profile.hooks import ContributionRecorder, instrument_moe
from moeprune.profile.parallel import World, check_share_sizes


@dataclass
class ReplayResult:
    """Accumulated statistics of a replay: arrays are ``[domains, layers, experts]``."""

    layers: list[int]
    domains: list[str]
    contribution_sum: np.ndarray
    routed_count: np.ndarray
    router_prob_sum: np.ndarray
    sequence_norm_sum: np.ndarray
    max_activation_norm: np.ndarray  # each expert's largest output element: reduced by max, not summed
    domain_num_tokens: dict[str, int]
    num_sequences: int
    elapsed_s: float
    recorder: ContributionRecorder


def check_sequence_lengths(
    sequences: Sequence[dict[str, Any]], context_tokens: int | None, source: Path | str = "sequences"
) -> None:
    """Raise SequenceError naming the sequence (and line) longer than the model's context."""
    if context_tokens is None:
        return
    for index, record in enumerate(sequences):
        length = len(record["input_ids"])
        if length > context_tokens:
            line = record.get("_line", index + 1)
            raise SequenceError(
                f"{source}:{line}: sequence '{record['id']}' has {length} tokens, more than the model's "
                f"context of {context_tokens}; lower calibration.max_new_tokens or shorten the prompt"
            )


@dataclass
class Batch:
    """One forward's worth of stored sequences, right-padded to the longest."""

    records: list[dict[str, Any]]
    input_ids: Any  # torch.long [batch, width]
    attention_mask: Any  # torch.long [batch, width], 1 = real token
    token_domain: Any  # torch.long [batch, width], domain index, -1 = padding

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def check_sequences(
    sequences: Sequence[dict[str, Any]], domains: Sequence[str], context_tokens: int | None, source: Path | str
) -> None:
    """Raise SequenceError naming the first sequence with an unknown domain or too many tokens."""
    known = set(domains)
    for index, record in enumerate(sequences):
        if record["domain"] not in known:
            line = record.get("_line", index + 1)
            raise SequenceError(f"{source}:{line}: domain '{record['domain']}' is not one of {list(domains)}")
    check_sequence_lengths(sequences, context_tokens, source)


def make_batches(sequences: Sequence[dict[str, Any]], domains: Sequence[str], batch_size: int) -> list[Batch]:
    """The replay's batches: similar lengths together (less padding), right padding, padding domain -1.

    Both replay modes (whole-model and layer-streamed) run exactly these batches in this order.
    """
    import torch

    domain_index = {domain: i for i, domain in enumerate(domains)}
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        records = [sequences[i] for i in order[start : start + batch_size]]
        width = max(len(record["input_ids"]) for record in records)
        input_ids = torch.zeros((len(records), width), dtype=torch.long)
        attention_mask = torch.zeros((len(records), width), dtype=torch.long)
        token_domain = torch.full((len(records), width), -1, dtype=torch.long)
        for row, record in enumerate(records):
            ids = record["input_ids"]
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
            token_domain[row, : len(ids)] = domain_index[record["domain"]]
        batches.append(Batch(records, input_ids, attention_mask, token_domain))
    return batches


def domain_tokens(batches: Sequence[Batch], domains: Sequence[str]) -> dict[str, int]:
    """Real (non-padding) tokens per domain over the batches."""
    counts = {domain: 0 for domain in domains}
    for batch in batches:
        for record in batch.records:
            counts[record["domain"]] += len(record["input_ids"])
    return counts


def prepare_batches(
    sequences: Sequence[dict[str, Any]],
    domains: Sequence[str],
    batch_size: int,
    context_tokens: int | None,
    source: Path | str,
    world: World | None = None,
) -> list[Batch]:
    """The checked sequences' batches (:func:`check_sequences`, :func:`make_batches`), for either mode.

    Every rank of a data-parallel ``world`` checks every sequence, forms every batch, and keeps its
    share of the batches (:mod:`moeprune.profile.parallel`).
    """
    check_sequences(sequences, domains, context_tokens, source)
    batches = make_batches(sequences, domains, batch_size)
    if world is None:
        return batches
    check_share_sizes(len(batches), world, "replay batches")
    return world.share(batches)


BatchPass = Callable[[int, Batch], None]
"""Runs one batch (given with its position in the replay's batches) through the part of the model
that is resident during the pass: the whole body, or one decoder layer."""


def forward_batch(body: Any, batch: Batch, device: Any) -> Any:
    """The body's forward on one batch, as both modes call it (no KV cache; right padding masked)."""
    return body(
        input_ids=batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        use_cache=False,
    )


def drive(
    batches: Sequence[Batch],
    passes: Iterable[BatchPass],
    recorder: ContributionRecorder,
    on_tokens: Callable[[int], None] | None = None,
) -> None:
    """The replay loop of both modes: every pass runs every batch, in order, after telling the
    recorder that batch's token domains (one row = one whole sequence; padding -1).

    ``passes`` is how the model is materialised: the whole-model replay is one pass of the whole
    body; the streamed replay one pass per decoder layer, built before its pass and freed after.
    So each layer's accumulators receive the same batches in the same order either way.
    ``on_tokens(n)`` follows each (pass, batch) with the batch's real tokens.
    """
    for run in passes:
        for position, batch in enumerate(batches):
            recorder.set_token_domains(batch.token_domain)
            run(position, batch)
            if on_tokens is not None:
                on_tokens(batch.num_tokens)


def replay_result(
    recorder: ContributionRecorder, batches: Sequence[Batch], domains: Sequence[str], elapsed_s: float
) -> ReplayResult:
    """The one place a :class:`ReplayResult` is assembled: every statistic the recorder keeps."""
    contribution_sum, routed_count, router_prob_sum = recorder.arrays()
    return ReplayResult(
        layers=[layer.layer_index for layer in recorder.layers],
        domains=list(domains),
        contribution_sum=contribution_sum,
        routed_count=routed_count,
        router_prob_sum=router_prob_sum,
        sequence_norm_sum=recorder.sequence_norm_arrays(),
        max_activation_norm=recorder.max_norm_arrays(),
        domain_num_tokens=domain_tokens(batches, domains),
        num_sequences=sum(len(batch.records) for batch in batches),
        elapsed_s=elapsed_s,
        recorder=recorder,
    )


def execute_replay(
    model: Any,
    batches: Sequence[Batch],
    domains: Sequence[str],
    passes: Iterable[BatchPass],
    *,
    capture: bool = False,
    on_tokens: Callable[[int], None] | None = None,
) -> ReplayResult:
    """The replay executor of both modes: ``model``'s MoE layers instrumented (:func:`instrument_moe`,
    restored on exit), :func:`drive` over ``passes``, the statistics as a :class:`ReplayResult`."""
    import torch

    started = time.perf_counter()
    with instrument_moe(model, num_domains=len(domains), capture=capture) as recorder, torch.inference_mode():
        drive(batches, passes, recorder, on_tokens)
        return replay_result(recorder, batches, domains, time.perf_counter() - started)


def replay_body(model: Any) -> Any:
    """The module whose forward the replay calls: the model without its LM head (replay needs no
    logits, 262k-wide for Gemma 4), as the family adapter names it."""
    from moeprune.arch import arch_for_model

    return model.get_submodule(arch_for_model(model).replay_body_path(model))


def _whole_model(model: Any) -> Iterator[BatchPass]:
    """The whole-model replay's one pass: every weight resident, each batch through the whole body."""
    from moeprune.profile.loading import input_device

    body, device = replay_body(model), input_device(model)
    yield lambda _position, batch: forward_batch(body, batch, device)


def replay_sequences(
    model: Any,
    sequences: Sequence[dict[str, Any]],
    domains: Sequence[str],
    *,
    batch_size: int = 1,
    context_tokens: int | None = None,
    source: Path | str = "sequences",
    on_tokens: Callable[[int], None] | None = None,
    capture: bool = False,
    world: World | None = None,
) -> ReplayResult:
    """One instrumented forward per batch of stored sequences; returns the accumulated statistics
    (of this rank's share of the batches when ``world`` is data-parallel).

    ``sequences`` are phase-1 records (``input_ids``, ``domain``, ``id``); a sequence longer than
    ``context_tokens`` (default: the model's ``max_position_embeddings``) is refused with an error
    naming it. ``on_tokens(n)`` is called after each batch with its number of real tokens.
    """
    from moeprune.arch import context_length

    if context_tokens is None:
        context_tokens = context_length(model)
    batches = prepare_batches(sequences, domains, batch_size, context_tokens, source, world)
    return execute_replay(model, batches, domains, _whole_model(model), capture=capture, on_tokens=on_tokens)
