"""Building a transformers model's modules from its safetensors shards, one module tree at a time.

The model is built on the ``meta`` device from its config with its own transformers class
(:func:`meta_model`: nothing is allocated), then any submodule is given its values
(:func:`materialize`): persistent tensors read from the checkpoint through transformers' own
weight-loading plan (:func:`moeprune.io.loading_plan.loading_plan`), non-persistent buffers
(rotary inverse frequencies, embedding scales: not in checkpoints) filled by the model's own
``_init_weights``, as ``from_pretrained`` does. :meth:`_Built.release` sends them back to
``meta``. Only that module's tensors are read, so a model larger than memory can be run one
decoder layer at a time (:mod:`moeprune.profile.streamed`).

This is generic loading, the same for every family: it lives beside the checkpoint reader, not
with the profiler or the family adapters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeprune.io.checkpoint import Checkpoint, CheckpointError, TensorInfo
from moeprune.io.loading_plan import TensorAssembly, loading_plan

# safetensors dtype strings -> torch dtypes
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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


def read_tensor_into(checkpoint: Checkpoint, info: TensorInfo, target: torch.Tensor) -> None:
    """Fill ``target`` with the checkpoint tensor ``info`` (cast to target's dtype and device,
    exactly as ``tensor.to(dtype)``). Raises CheckpointError on a dtype or shape mismatch."""
    dtype = SAFETENSORS_DTYPES.get(info.dtype)
    if dtype is None:
        raise CheckpointError(f"{info.shard}: tensor '{info.name}' has dtype {info.dtype}, which cannot be read into a module")
    if tuple(target.shape) != tuple(info.shape):
        raise CheckpointError(
            f"{info.shard}: tensor '{info.name}' has shape {list(info.shape)}, the model's class expects "
            f"{list(target.shape)}; the checkpoint does not match its config.json"
        )
    direct = target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
    buffer = target if direct else torch.empty(info.shape, dtype=dtype)
    view = memoryview(buffer.reshape(-1).view(torch.uint8).numpy())
    if view.nbytes != info.nbytes:
        raise CheckpointError(f"{info.shard}: tensor '{info.name}' holds {info.nbytes} bytes, expected {view.nbytes}")
    fd = checkpoint.fd(info.shard)
    done = 0
    while done < info.nbytes:
        read = os.preadv(fd, [view[done:]], info.data_offset + done)
        if read <= 0:
            raise CheckpointError(f"{info.shard}: file ended early while reading '{info.name}'")
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
    (:meth:`TensorAssembly.assemble`) on the CPU. Raises CheckpointError when a tensor is
    missing or the parts do not fit the model's shape.
    """
    for name in source.names:
        if name not in checkpoint:
            raise CheckpointError(f"{checkpoint.directory}: no tensor '{name}' (part of {source.target})")
    if source.converter is None:
        new = torch.empty_like(slot, device=device)
        read_tensor_into(checkpoint, checkpoint[source.names[0]], new)
        return new
    counts = {pattern: len(names) for pattern, names in source.groups}
    wanted = list(source.converter.source_patterns)
    if sorted(counts) != sorted(wanted) or len(set(counts.values())) != 1:
        found = ", ".join(f"{counts.get(pattern, 0)} x '{pattern}'" for pattern in wanted)
        raise CheckpointError(
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
                raise CheckpointError(
                    f"{checkpoint.directory}: '{source.target}' has {new.shape[0]} experts in the model's class, "
                    f"but the checkpoint has {place.name}; the checkpoint does not match its config.json"
                )
            target = new[place.index]
            if place.axis is not None and place.offset + place.size > target.shape[place.axis]:
                raise CheckpointError(
                    f"{checkpoint.directory}: the parts of '{source.target}' ({source.names[0]}, ...) are wider than "
                    f"its {list(new.shape)} in the model's class; the checkpoint does not match its config.json"
                )
            if place.axis is not None:
                target = target.narrow(place.axis, place.offset, place.size)
            read_tensor_into(checkpoint, checkpoint[place.name], target)
            filled += target.numel()
        if filled != new.numel():
            raise CheckpointError(
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
        raise CheckpointError(
            f"{checkpoint.directory}: cannot assemble '{source.target}' from {len(source.names)} tensors "
            f"({source.names[0]}, ...): {exc}"
        ) from None
    del parts
    if tuple(value.shape) != tuple(slot.shape) or value.dtype != slot.dtype:
        raise CheckpointError(
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
    ``skip`` stay on ``meta``. Raises CheckpointError naming a tensor the checkpoint lacks.
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
                raise CheckpointError(
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
    """The model of ``model_dir`` built from its config with its own transformers class, on ``meta``
    (tensors the class keeps in float32 in a ``dtype`` load have float32 slots, see
    :func:`_keep_in_fp32`). Raises CheckpointError when the config cannot be built."""
    from moeprune.arch import transformers_config, transformers_model_class

    try:
        config = transformers_config(model_dir)
        cls = transformers_model_class(config)
        with torch.device("meta"):
            if hasattr(cls, "_from_config"):
                model = cls._from_config(config, dtype=getattr(torch, dtype))
            else:
                model = cls.from_config(config, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: cannot build the model from its config ({exc})") from None
    _keep_in_fp32(model, getattr(torch, dtype))
    return model.eval()


def _keep_in_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Give the tensors that ``from_pretrained`` keeps in float32 (the class's dtype plan:
    ``_keep_in_fp32_modules[_strict]``, e.g. DeepSeek-V3's ``e_score_correction_bias`` in a bf16
    load) float32 slots too, so a model built here routes with the same values as one ``from_pretrained`` loads."""
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


__all__ = ["materialize", "meta_model", "read_source", "read_tensor_into"]
