"""Phase 2, layer-streamed: the replay with one decoder layer in memory at a time.

The whole-model replay (:mod:`moeprune.profile.replay`) needs every weight of the model on the
device. Each decoder layer's input is the previous layer's output, so the same statistics can be
measured holding one layer at a time plus the hidden states of every calibration sequence:

1. The model is built on the ``meta`` device from its config with its own transformers class
   (nothing is allocated; :func:`moeprune.io.materialize.meta_model`). Only the modules a text
   forward needs outside the decoder layers (the "shell": embeddings, rotary tables, final norm,
   per-layer-input embeddings) are materialised from the checkpoint
   (:func:`moeprune.io.materialize.materialize`).
2. **Embed once.** For each replay batch (exactly :func:`~moeprune.profile.replay.make_batches`,
   the whole-model replay's batches), the body's own ``forward`` runs with every decoder layer
   replaced by a recorder that keeps the arguments the model passes to that layer (the hidden
   states entering layer 0, attention masks per layer type, rotary position embeddings,
   per-layer inputs, KV-sharing state, ...) and returns its input unchanged. So masks, padding,
   sliding windows and rotary come from transformers' code, not from ours. The shell is freed.
3. **For each decoder layer in order:** materialise that layer's module from only its tensors
   (through the lazy checkpoint reader, :class:`moeprune.io.checkpoint.Checkpoint`), run every
   batch's hidden states through it under the profiler's instrumentation, keep the outputs as the
   next layer's inputs, and free the layer. Each layer is one pass of the replay executor
   (:func:`moeprune.profile.replay.execute_replay`), which drives the same recorder with the same
   per-batch token domains as the whole-model replay, whose single pass is the whole body.
   The C allocator is told to give freed memory back to the kernel
   (:func:`moeprune.profile.allocator.return_freed_memory`), so the resident size stays one layer
   plus the activations instead of creeping up from layer to layer.

Which on-disk tensors make each in-memory one is :func:`moeprune.io.loading_plan.loading_plan`:
transformers' own weight-loading plan (its conversion mapping), so a family saved with one tensor per expert
(``mlp.experts.{i}.gate_proj.weight``, ...) gets its fused ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]`` stacked by transformers' own converters from only that layer's tensors,
exactly as ``from_pretrained`` builds them. Stack-and-concatenate converters (all the families
here) are replayed as direct reads into each part's slice, so no extra copy is made. Non-persistent
buffers (rotary inverse frequencies, embedding scales) are not in checkpoints; they are filled by
the model's own ``_init_weights``, as ``from_pretrained`` does.

Every tensor op is the one the whole-model forward performs on the same inputs, and each
layer's accumulators receive the batches in the same order, so on the same device the
statistics are bit-identical to the whole-model replay's (the tests check it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import Checkpoint
from moeprune.io.loading_plan import loading_plan
from moeprune.io.materialize import materialize, meta_model
from moeprune.patching import Patches
from moeprune.profile.allocator import return_freed_memory
from moeprune.profile.parallel import World
from moeprune.profile.replay import (
    Batch,
    BatchPass,
    ReplayResult,
    execute_replay,
    forward_batch,
    prepare_batches,
)


class StreamedReplayError(MoepruneError):
    """The model cannot be replayed layer by layer (a checkpoint that does not match its class is
    a :class:`~moeprune.io.checkpoint.CheckpointError`, from :mod:`moeprune.io.materialize`)."""


# --- capturing each layer's inputs ------------------------------------------------------------


class _LayerInputs(torch.nn.Module):
    """Stands in for decoder layer ``index`` during the embedding pass: records the arguments the
    model passes and returns the hidden states unchanged. Attribute reads the model's forward makes
    on the layer (e.g. ``attention_type``) are answered by the real layer."""

    def __init__(self, index: int, layer: torch.nn.Module, sink: _Capture) -> None:
        super().__init__()
        self.index = index
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_sink", sink)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._sink.record(self.index, hidden_states, args, kwargs)
        return hidden_states


@dataclass
class _Capture:
    """What one batch's embedding pass recorded: the hidden states entering layer 0 and, per layer,
    the other arguments of its call."""

    num_layers: int
    hidden: torch.Tensor | None = None
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    _last: torch.Tensor | None = None

    def record(self, index: int, hidden_states: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if index != len(self.calls):
            raise StreamedReplayError(
                f"decoder layer {index} was called out of order (after {len(self.calls)} layers): streamed "
                "replay needs the layers to run once each, in order; use profile.replay = \"whole\""
            )
        if index == 0:
            self.hidden = hidden_states
        elif not _same_tensor(hidden_states, self._last):
            raise StreamedReplayError(
                f"the model changes the hidden states between decoder layers {index - 1} and {index}: streamed "
                "replay cannot reproduce that; use profile.replay = \"whole\""
            )
        self._last = hidden_states
        self.calls.append((args, kwargs))


def _same_tensor(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and (
        a is b
        or (a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype)
    )


def _embed_batches(
    body: torch.nn.Module, layers: torch.nn.ModuleList, batches: Sequence[Batch], device: torch.device
) -> list[_Capture]:
    """Run the body's forward for each batch with recorders standing in for the decoder layers."""
    captures = []
    for batch in batches:
        capture = _Capture(num_layers=len(layers))
        with Patches() as patches:
            for index, layer in enumerate(list(layers)):
                patches.set_item(layers, index, _LayerInputs(index, layer, capture))
            forward_batch(body, batch, device)
        if len(capture.calls) != len(layers) or capture.hidden is None:
            raise StreamedReplayError(
                f"the body's forward called {len(capture.calls)} of {len(layers)} decoder layers; "
                "use profile.replay = \"whole\""
            )
        if capture.hidden.device.type == "meta":
            raise StreamedReplayError("the embedding pass produced meta tensors: a module it needs was not loaded")
        capture._last = None
        captures.append(capture)
    return captures


# --- the replay -------------------------------------------------------------------------------


def stream_device(device_map: str) -> torch.device:
    """The one device streamed replay runs on: ``auto`` = the first GPU if any, else the CPU."""
    if device_map == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise StreamedReplayError(
            f"profile.device_map = '{device_map}': streamed replay runs on one device; use 'auto', 'cpu' or 'cuda:N'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StreamedReplayError(f"profile.device_map = '{device_map}': no CUDA device is available")
    return device


@dataclass
class StreamInfo:
    """What a streamed replay measured about itself: bytes of the shell (embeddings etc.), of the
    largest decoder layer and of the hidden states kept between layers; and the model's config."""

    shell_nbytes: int = 0
    max_layer_nbytes: int = 0
    hidden_nbytes: int = 0
    model: Any = None  # the model on the meta device (config, module structure)


def family_adapter(model: torch.nn.Module) -> Any:
    """The family adapter (:mod:`moeprune.arch`) that names ``model``'s parts for the streamed
    replay: its body, decoder layers and the modules a text-only forward never runs. Raises
    StreamedReplayError for a model no adapter supports."""
    from moeprune.arch import ArchError, arch_for_model

    try:
        return arch_for_model(model)
    except ArchError as exc:
        raise StreamedReplayError(f"streamed replay: {exc}; use profile.replay = \"whole\"") from None


def layer_by_layer(
    model: torch.nn.Module,
    arch: Any,
    checkpoint: Checkpoint,
    batches: Sequence[Batch],
    device: torch.device,
    stats: StreamInfo,
) -> Iterator[BatchPass]:
    """The streamed replay's passes: the shell embeds every batch once (then goes), and each
    decoder layer in turn is built from the checkpoint, runs every batch's hidden states (its
    outputs become the next layer's inputs) and is freed when its pass is over."""
    body_path, layers_path = arch.replay_body_path(model), arch.decoder_layers_path(model)
    unused = arch.streamed_unused_modules(model)
    layers = model.get_submodule(layers_path)
    sources = loading_plan(model, checkpoint.names())
    shell = materialize(model, body_path, checkpoint, device, skip=(layers_path, *unused), sources=sources)
    stats.shell_nbytes = shell.nbytes
    captures = _embed_batches(model.get_submodule(body_path), layers, batches, device)
    shell.release()
    return_freed_memory()
    hidden = [c.hidden for c in captures]
    stats.hidden_nbytes = sum(h.numel() * h.element_size() for h in hidden)
    for index, layer in enumerate(list(layers)):
        built = materialize(model, f"{layers_path}.{index}", checkpoint, device, sources=sources)
        stats.max_layer_nbytes = max(stats.max_layer_nbytes, built.nbytes)

        def run(position: int, _batch: Batch, index: int = index, layer: torch.nn.Module = layer) -> None:
            args, kwargs = captures[position].calls[index]
            output = layer(hidden[position], *args, **kwargs)
            if not isinstance(output, torch.Tensor):
                raise StreamedReplayError(
                    f"decoder layer {index} returned {type(output).__name__}, not the hidden states tensor; "
                    "use profile.replay = \"whole\""
                )
            hidden[position] = output

        yield run
        built.release()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return_freed_memory()


def replay_streamed(
    model_dir: Path,
    sequences: Sequence[dict[str, Any]],
    domains: Sequence[str],
    *,
    dtype: str = "float32",
    device_map: str = "cpu",
    batch_size: int = 1,
    context_tokens: int | None = None,
    source: Path | str = "sequences",
    on_tokens: Callable[[int], None] | None = None,
    capture: bool = False,
    stream_info: StreamInfo | None = None,
    world: World | None = None,
) -> ReplayResult:
    """The replay of :func:`moeprune.profile.replay.replay_sequences`, one decoder layer at a time.

    ``model_dir`` is the checkpoint directory (safetensors), loaded in ``dtype`` on the device of
    ``device_map``. ``on_tokens(n)`` is called after each (layer, batch) with the batch's real
    tokens, so the total is ``num_layers * tokens``. Returns the same statistics as the
    whole-model replay (of this rank's share of the batches when ``world`` is data-parallel).
    """
    from moeprune.arch import context_length

    device = stream_device(device_map)
    model = meta_model(model_dir, dtype)
    if context_tokens is None:
        context_tokens = context_length(model.config)
    batches = prepare_batches(sequences, domains, batch_size, context_tokens, source, world)
    arch = family_adapter(model)
    stats = stream_info if stream_info is not None else StreamInfo()
    stats.model = model
    return_freed_memory()
    with Checkpoint.open(model_dir) as checkpoint, contextlib.closing(
        layer_by_layer(model, arch, checkpoint, batches, device, stats)
    ) as passes:
        return execute_replay(model, batches, domains, passes, capture=capture, on_tokens=on_tokens)
