"""Phase 2, layer-streamed: the replay with one decoder layer in memory at a time.

The whole-model replay (:mod:`moeprune.profile.replay`) needs every weight of the model on the
device. Each decoder layer's input is the previous layer's output, so the same statistics can be
measured holding one layer at a time plus the hidden states of every calibration sequence:

1. The model is built on the ``meta`` device from its config with its own transformers class
   (nothing is allocated). Only the modules a text forward needs outside the decoder layers (the
   "shell": embeddings, rotary tables, final norm, per-layer-input embeddings) are materialised
   from the checkpoint.
2. **Embed once.** For each replay batch (exactly :func:`~moeprune.profile.replay.make_batches`,
   the whole-model replay's batches), the body's own ``forward`` runs with every decoder layer
   replaced by a recorder that keeps the arguments the model passes to that layer (the hidden
   states entering layer 0, attention masks per layer type, rotary position embeddings,
   per-layer inputs, KV-sharing state, ...) and returns its input unchanged. So masks, padding,
   sliding windows and rotary come from transformers' code, not from ours. The shell is freed.
3. **For each decoder layer in order:** read only its tensors through the lazy checkpoint reader
   (:class:`moeprune.io.checkpoint.Checkpoint`), put them into that layer's module, run every
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
here) are replayed as direct reads into each part's slice, so no extra copy is made.

Every tensor op is the one the whole-model forward performs on the same inputs, and each
layer's accumulators receive the batches in the same order, so on the same device the
statistics are bit-identical to the whole-model replay's (the tests check it).

Non-persistent buffers (rotary inverse frequencies, embedding scales) are not in checkpoints;
they are filled by the model's own ``_init_weights``, as ``from_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.errors import MoepruneError
from moeprune.io.checkpoint import Checkpoint, TensorInfo
from moeprune.io.loading_plan import TensorAssembly, loading_plan
from moeprune.profile.allocator import return_freed_memory
from moeprune.patching import Patches
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
    """The model cannot be replayed layer by layer (or its checkpoint does not match its class)."""


# safetensors dtype strings -> torch dtypes
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


# --- building modules from the checkpoint -----------------------------------------------------


def read_tensor_into(checkpoint: Checkpoint, info: TensorInfo, target: torch.Tensor) -> None:
    """Fill ``target`` with the checkpoint tensor ``info`` (cast to target's dtype and device,
    exactly as ``tensor.to(dtype)``). Raises StreamedReplayError on a dtype or shape mismatch."""
    dtype = _DTYPES.get(info.dtype)
    if dtype is None:
        raise StreamedReplayError(f"{info.shard}: tensor '{info.name}' has dtype {info.dtype}, which streamed replay cannot read")
    if tuple(target.shape) != tuple(info.shape):
        raise StreamedReplayError(
            f"{info.shard}: tensor '{info.name}' has shape {list(info.shape)}, the model's class expects "
            f"{list(target.shape)}; the checkpoint does not match its config.json"
        )
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(info.shape, dtype=dtype)
    view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
    if view.nbytes != info.nbytes:
        raise StreamedReplayError(f"{info.shard}: tensor '{info.name}' holds {info.nbytes} bytes, expected {view.nbytes}")
    fd = checkpoint.fd(info.shard)
    done = 0
    while done < info.nbytes:
        read = os.preadv(fd, [view[done:]], info.data_offset + done)
        if read <= 0:
            raise StreamedReplayError(f"{info.shard}: file ended early while reading '{info.name}'")
        done += read
    if not direct:
        target.copy_(buffer)


def read_source(
    checkpoint: Checkpoint, source: TensorAssembly, slot: torch.Tensor, device: torch.device, model: Any = None
) -> torch.Tensor:
    """The value of the in-memory tensor ``slot`` (a meta tensor: shape and dtype), read from the
    checkpoint tensors ``source`` names and nothing else.

    One on-disk tensor is read straight into a new tensor on ``device``. Parts that transformers'
    converter only stacks and concatenates (per-expert gate / up / down) are each read straight
    into their slice (:meth:`TensorAssembly.placements`), cast to the slot's dtype as
    ``from_pretrained`` casts them: no second copy of the tensor. Any other converter runs itself
    (:meth:`TensorAssembly.assemble`) on the CPU. Raises StreamedReplayError when a tensor is
    missing or the parts do not fit the model's shape.
    """
    for name in source.names:
        if name not in checkpoint:
            raise StreamedReplayError(f"{checkpoint.directory}: no tensor '{name}' (part of {source.target})")
    if source.converter is None:
        new = torch.empty_like(slot, device=device)
        read_tensor_into(checkpoint, checkpoint[source.names[0]], new)
        return new
    counts = {pattern: len(names) for pattern, names in source.groups}
    wanted = list(source.converter.source_patterns)
    if sorted(counts) != sorted(wanted) or len(set(counts.values())) != 1:
        found = ", ".join(f"{counts.get(pattern, 0)} x '{pattern}'" for pattern in wanted)
        raise StreamedReplayError(
            f"{checkpoint.directory}: '{source.target}' is assembled from the same number of tensors of each of "
            f"{wanted}; the checkpoint has {found} (a tensor is missing or extra)"
        )
    placements = source.placements({name: checkpoint[name].shape for name in source.names})
    if placements is not None:
        # Stack / concatenate only: each part is read straight into its slice of the tensor.
        new = torch.empty_like(slot, device=device)
        filled = 0
        for place in placements:
            if place.index >= new.shape[0]:
                raise StreamedReplayError(
                    f"{checkpoint.directory}: '{source.target}' has {new.shape[0]} experts in the model's class, "
                    f"but the checkpoint has {place.name}; the checkpoint does not match its config.json"
                )
            target = new[place.index]
            if place.axis is not None and place.offset + place.size > target.shape[place.axis]:
                raise StreamedReplayError(
                    f"{checkpoint.directory}: the parts of '{source.target}' ({source.names[0]}, ...) are wider than "
                    f"its {list(new.shape)} in the model's class; the checkpoint does not match its config.json"
                )
            if place.axis is not None:
                target = target.narrow(place.axis, place.offset, place.size)
            read_tensor_into(checkpoint, checkpoint[place.name], target)
            filled += target.numel()
        if filled != new.numel():
            raise StreamedReplayError(
                f"{checkpoint.directory}: '{source.target}' {list(new.shape)} is not covered by its "
                f"{len(placements)} checkpoint tensors ({source.names[0]}, ...); the checkpoint does not match "
                "its config.json"
            )
        return new
    parts = {}
    for name in source.names:
        info = checkpoint[name]
        parts[name] = torch.empty(info.shape, dtype=slot.dtype)
        read_tensor_into(checkpoint, info, parts[name])
    try:
        value = source.assemble(parts, model)
    except Exception as exc:  # transformers' ops raise plain errors on mismatched parts
        raise StreamedReplayError(
            f"{checkpoint.directory}: cannot assemble '{source.target}' from {len(source.names)} tensors "
            f"({source.names[0]}, ...): {exc}"
        ) from None
    del parts
    if tuple(value.shape) != tuple(slot.shape) or value.dtype != slot.dtype:
        raise StreamedReplayError(
            f"{checkpoint.directory}: '{source.target}' assembled from {len(source.names)} tensors "
            f"({source.names[0]}, ...) has shape {list(value.shape)} {value.dtype}, the model's class expects "
            f"{list(slot.shape)} {slot.dtype}; the checkpoint does not match its config.json"
        )
    return value.to(device).contiguous()


def _slots(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str, bool, bool]]:
    """(full name, owner module, attribute, is_parameter, persistent) of every tensor slot under ``module``."""
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for attr, param in owner._parameters.items():
            if param is not None:
                yield (f"{prefix}.{attr}" if prefix else attr), owner, attr, True, True
        for attr, buffer in owner._buffers.items():
            if buffer is not None:
                persistent = attr not in owner._non_persistent_buffers_set
                yield (f"{prefix}.{attr}" if prefix else attr), owner, attr, False, persistent


def _init_owner(model: torch.nn.Module, path: str) -> Any:
    """The nearest transformers PreTrainedModel at or above ``path`` (its ``_init_weights`` applies)."""
    from transformers import PreTrainedModel

    owner: Any = model
    module: Any = model
    for part in [p for p in path.split(".") if p]:
        module = getattr(module, part)
        if isinstance(module, PreTrainedModel):
            owner = module
    return owner


@dataclass
class _Built:
    """Tensor slots materialised for one module tree (so they can be sent back to ``meta``)."""

    slots: list[tuple[torch.nn.Module, str, bool]] = field(default_factory=list)
    nbytes: int = 0

    def release(self) -> None:
        for owner, attr, is_param in self.slots:
            if is_param:
                old = owner._parameters[attr]
                owner._parameters[attr] = torch.nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)
            else:
                owner._buffers[attr] = torch.empty_like(owner._buffers[attr], device="meta")
        self.slots.clear()
        self.nbytes = 0


def materialize(
    model: torch.nn.Module,
    path: str,
    checkpoint: Checkpoint,
    device: torch.device,
    skip: Sequence[str] = (),
    sources: Mapping[str, TensorAssembly] | None = None,
) -> _Built:
    """Give every tensor under module ``path`` of the meta-built ``model`` its value on ``device``:
    persistent ones from the checkpoint, non-persistent buffers from the model's own init.

    ``sources`` (transformers' plan, :func:`~moeprune.io.loading_plan.loading_plan`, when None)
    says which checkpoint tensors make each one: only those are read. Modules under any path in
    ``skip`` stay on ``meta``. Raises StreamedReplayError naming a tensor the checkpoint lacks.
    """
    from transformers import initialization

    if sources is None:
        sources = loading_plan(model, checkpoint.names())
    module = model.get_submodule(path)
    built = _Built()
    init_modules: list[str] = []
    skip_prefixes = tuple(s + "." for s in skip)
    for relative, owner, attr, is_param, persistent in list(_slots(module)):
        full = f"{path}.{relative}" if path else relative
        if full.startswith(skip_prefixes):
            continue
        old = owner._parameters[attr] if is_param else owner._buffers[attr]
        if old.device.type != "meta":
            continue  # tied to an already materialised tensor
        if persistent:
            source = sources.get(full)
            if source is None:
                raise StreamedReplayError(
                    f"{checkpoint.directory}: no tensor '{full}' (nor tensors transformers assembles into it) for "
                    f"{type(owner).__name__}.{attr}; the checkpoint does not match the model class of its config.json"
                )
            new = read_source(checkpoint, source, old, device, model)
            new._is_hf_initialized = True
        else:
            new = torch.empty_like(old, device=device)
        if not persistent:
            owner_path = full.rsplit(".", 1)[0]
            if owner_path not in init_modules:
                init_modules.append(owner_path)
        if is_param:
            owner._parameters[attr] = torch.nn.Parameter(new, requires_grad=False)
            owner._parameters[attr]._is_hf_initialized = bool(persistent)
        else:
            owner._buffers[attr] = new
        built.slots.append((owner, attr, is_param))
        built.nbytes += new.numel() * new.element_size()
    if init_modules:
        with torch.no_grad(), initialization.guard_torch_init_functions():
            for owner_path in init_modules:
                _init_owner(model, owner_path)._init_weights(model.get_submodule(owner_path))
    return built


def meta_model(model_dir: Path, dtype: str) -> torch.nn.Module:
    """The model of ``model_dir`` built from its config with its own transformers class, on ``meta``."""
    from moeprune.arch import transformers_config, transformers_model_class
    from moeprune.profile.loading import ModelLoadError

    try:
        config = transformers_config(model_dir)
        cls = transformers_model_class(config)
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=getattr(torch, dtype))
            else:
                model = cls.from_config(config, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot build the model from its config ({exc})") from None
    _keep_in_fp32(model, getattr(torch, dtype))
    return model.eval()


def _keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the tensors that ``from_pretrained`` keeps in float32 (the class's dtype plan:
    ``_keep_in_fp32_modules[_strict]``, e.g. DeepSeek-V3's ``e_score_correction_bias`` in a bf16
    load) float32 slots too, so streamed replay routes with the same values as the whole model."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    alternation, group_pattern, _ = build_glob_alternation(list(plan))
    for module_name, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for key, tensor in store.items():
                match = alternation.search(f"{module_name}.{key}" if module_name else key) if tensor is not None else None
                if match is not None:
                    kept = tensor.to(plan[group_pattern[match.lastgroup]])
                    is_parameter = isinstance(tensor, torch.nn.Parameter)
                    store[key] = torch.nn.Parameter(kept, requires_grad=False) if is_parameter else kept


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


def _layer_by_layer(
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
        _layer_by_layer(model, arch, checkpoint, batches, device, stats)
    ) as passes:
        return execute_replay(model, batches, domains, passes, capture=capture, on_tokens=on_tokens)
