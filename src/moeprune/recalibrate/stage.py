"""The recalibrate stage: the pruned checkpoint with refitted router tensors, and its record.

For each decoder layer in turn, one layer in memory (the streamed replay's passes,
:func:`moeprune.profile.streamed.layer_by_layer`, over the profile's own ``sequences.jsonl`` and
batches), the base layer runs every batch; hooks keep the layer's call, its output and what its
block passes the experts. The pruned block is a copy of that router and experts sliced to the drop
map's kept experts (the base's kept rows: what verify-prune proves the pruned checkpoint holds).
:func:`moeprune.recalibrate.fit.fit_layer` fits the router tensors the family adapter names
(:meth:`MoeArch.recalibrated_tensors`) so the layer's output with the pruned block matches the base
layer's output on the base layer's inputs. The hidden states then go on through the base layer, so
every layer sees the base model's inputs, as in the profile.

That is the ``layer-mse`` objective (the default). With ``recalibrate.objective = "model-kl"``
(:func:`fit_routers_model_kl`, :mod:`moeprune.recalibrate.model_fit`) every router tensor is
fitted at once against the base's logits on ``recalibrate.text``, the base and the pruned model in
memory together; the record then holds the text's path and sha256 and the fit's held-out KL.

The output is the pruned checkpoint's shards copied byte for byte except the refitted router
tensors, written atomically with ``recalibrate.json`` (per layer each new tensor's sha256, the
held-out loss before and after, the steps, the settings). It is deterministic: fixed held-out
sequences (seeded), fixed token order, float32 on the CPU, one thread, deterministic algorithms.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_bytes, sha256_file
from moeprune.io.checkpoint import INDEX_NAME, Checkpoint
from moeprune.io.writer import ShardedWriter
from moeprune.patching import Patches
from moeprune.recalibrate import FIT_SETTINGS, MODEL_KL, MODEL_KL_SETTINGS, RECORD_NAME
from moeprune.recalibrate.fit import FitSettings, combine, expert_outputs, fit_layer

RECORD_FORMAT = "moeprune-recalibrate/1"


class RecalibrateError(MoepruneError):
    """The recalibration cannot run on these inputs."""


@contextlib.contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One thread and deterministic algorithms while the block runs: the same inputs give the same
    bytes (reduction order does not depend on the machine's core count)."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(strict)
        torch.set_num_threads(threads)


def holdout_ids(sequences: Sequence[dict[str, Any]], fraction: float, seed: int) -> list[str]:
    """The held-out sequences' ids: a seeded permutation of the file's order, its first
    ``round(fraction * n)`` (at least one, and at least one left to train on)."""
    count = len(sequences)
    if count < 2:
        raise RecalibrateError(f"recalibrate needs at least 2 calibration sequences (one held out); the profile has {count}")
    held = min(count - 1, max(1, round(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    return sorted(str(sequences[int(i)]["id"]) for i in order[:held])


def _module_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


class _LayerTaps:
    """Hooks on one decoder layer while the base runs it: per batch, the layer's call (arguments),
    its output and what its block passes the experts."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.outputs: list[torch.Tensor] = []
        self.experts_inputs: list[torch.Tensor] = []

    def layer_call(self, _module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.calls.append((args, kwargs))

    def layer_output(self, _module: Any, _args: Any, output: Any) -> None:
        self.outputs.append(output.detach())

    def experts_call(self, _module: Any, inputs: tuple[Any, ...], _output: Any) -> None:
        self.experts_inputs.append(inputs[0].detach())


class _Recombined(torch.nn.Module):
    """Stands in for the experts module: the kept experts' precomputed outputs on this batch's
    tokens (:func:`expert_outputs`), recombined with the routing it is given."""

    def __init__(self, outputs: torch.Tensor) -> None:
        super().__init__()
        self.outputs = outputs
        self.num_experts = outputs.shape[1]

    def forward(self, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return combine(self.outputs, weights, index).to(hidden.dtype)


class _LayerObjective:
    """Mean squared error of the decoder layer's output with the pruned block (trainable router,
    kept experts) to the base layer's output, on the base layer's inputs, over the real tokens of
    the training or held-out sequences; batch by batch in replay order."""

    def __init__(self, arch: Any, layer: Any, modules: Any, router: Any, experts: Any, taps: _LayerTaps,
                 masks: dict[str, list[torch.Tensor]]) -> None:
        self.arch, self.layer, self.block, self.router = arch, layer, modules.block, router
        self.taps, self.masks = taps, masks
        with torch.no_grad():
            self.expert_outputs = [expert_outputs(experts, x.reshape(-1, x.shape[-1])) for x in taps.experts_inputs]
        self.counts = {part: int(sum(int(m.sum()) for m in masks[part])) for part in masks}

    def loss(self, part: str, backward: bool) -> float:
        count = self.counts[part] * self.taps.outputs[0].shape[-1]
        total = 0.0
        for (args, kwargs), target, outputs, mask in zip(self.taps.calls, self.taps.outputs, self.expert_outputs,
                                                         self.masks[part], strict=True):
            if not bool(mask.any()):
                continue
            with Patches() as patches:
                patches.set_attribute(self.block, self.arch.router_attribute, self.router)
                patches.set_attribute(self.block, self.arch.experts_attribute, _Recombined(outputs))
                output = self.layer(*args, **kwargs)
            difference = output.reshape(-1, output.shape[-1])[mask] - target.reshape(-1, target.shape[-1])[mask]
            batch_loss = (difference.double() ** 2).sum() / count
            if backward:
                batch_loss.backward()
            total += float(batch_loss.detach())
        return total


def _pruned_block(arch: Any, modules: Any, keep: Sequence[int]) -> tuple[Any, Any]:
    """Copies of one layer's router and experts holding only the kept experts (the pruned block)."""
    from moeprune.arch.base import MoeModules

    router, experts = copy.deepcopy(modules.router), copy.deepcopy(modules.experts)
    rows = torch.tensor(sorted(int(i) for i in keep), dtype=torch.long)
    arch._slice_modules(MoeModules(modules.layer_index, router, experts, None), rows, len(keep))
    return router, experts


def _router_parameters(router: Any, router_path: str, names: Sequence[str], base: Checkpoint
                       ) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.dtype]]:
    """The router copy's parameters for the on-disk ``names`` and their checkpoint dtypes."""
    from moeprune.io.materialize import SAFETENSORS_DTYPES

    parameters, dtypes = {}, {}
    for name in names:
        if not name.startswith(router_path + "."):
            raise RecalibrateError(f"{base.directory}: router tensor '{name}' is not under the router module '{router_path}'")
        parameters[name] = router.get_parameter(name[len(router_path) + 1:])
        dtypes[name] = SAFETENSORS_DTYPES[base[name].dtype]
    return parameters, dtypes


def tensor_bytes(value: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (row-major, little-endian)."""
    return value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def recalibrate(base_dir: Path, drop_map_path: Path, sequences_path: Path, domains: Sequence[str], batch_size: int,
                settings: dict[str, Any]) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The refitted router tensors' bytes by name, and the record's per-layer part.

    Its inputs are the base checkpoint, the drop map, the calibration sequences and the settings
    only: the pruned router starts as the base's kept rows (which verify-prune proves the pruned
    checkpoint holds), so an auditor reruns it from the same four inputs."""
    from moeprune.dropmap.io import load_drop_map

    keep_by_layer = load_drop_map(drop_map_path).keep_by_layer
    values, fitted = fit_by_objective(base_dir, keep_by_layer, sequences_path, domains, batch_size, settings,
                                      str(drop_map_path))
    new_bytes = {name: tensor_bytes(value) for name, value in values.items()}
    for layer in fitted["layers"]:
        layer["tensors"] = {name: sha256_bytes(new_bytes[name]) for name in layer.pop("tensor_names")}
    return new_bytes, fitted


def fit_by_objective(base_dir: Path, keep_by_layer: dict[int, Sequence[int]], sequences_path: Path,
                     domains: Sequence[str], batch_size: int, settings: dict[str, Any], keep_source: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The fit ``settings['objective']`` names (:func:`fit_routers_model_kl` for ``model-kl``,
    :func:`fit_routers` otherwise): the one dispatch the stage and ``compare-criteria`` share, so
    a table never shows one objective's numbers under the other's settings."""
    if settings.get("objective") == MODEL_KL:
        return fit_routers_model_kl(base_dir, keep_by_layer, settings, keep_source)
    return fit_routers(base_dir, keep_by_layer, sequences_path, domains, batch_size, settings, keep_source)


def fitter_name(settings: dict[str, Any]) -> str:
    """The function :func:`fit_by_objective` runs for ``settings``, as the docs name it."""
    fit = fit_routers_model_kl if settings.get("objective") == MODEL_KL else fit_routers
    return f"{fit.__module__}.{fit.__name__}"


def fit_routers(base_dir: Path, keep_by_layer: dict[int, Sequence[int]], sequences_path: Path, domains: Sequence[str],
                batch_size: int, settings: dict[str, Any], keep_source: str
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The refitted router tensors (checkpoint dtypes) by name for the kept experts
    ``keep_by_layer`` (named ``keep_source`` in errors), and the record's per-layer part (each
    layer's ``tensor_names``): what :func:`recalibrate` writes, and what ``compare-criteria``
    applies to a model pruned in memory."""
    from moeprune.arch import context_length
    from moeprune.profile.generate import read_sequences
    from moeprune.profile.replay import prepare_batches
    from moeprune.io.materialize import meta_model
    from moeprune.profile.streamed import StreamInfo, layer_by_layer, family_adapter

    fit = FitSettings(settings["max_steps"], settings["learning_rate"], settings["patience_steps"])
    sequences = read_sequences(sequences_path)
    held = set(holdout_ids(sequences, settings["holdout_fraction"], settings["seed"]))
    model = meta_model(base_dir, "float32")
    arch = family_adapter(model)
    batches = prepare_batches(sequences, domains, batch_size, context_length(model.config), sequences_path)
    names = _module_names(model)
    layers_path = arch.decoder_layers_path(model)
    moe_by_layer = {m.layer_index: m for m in arch.moe_modules(model)}
    _check_drop_map_layers(keep_by_layer, moe_by_layer, keep_source)
    values: dict[str, torch.Tensor] = {}
    layers: list[dict[str, Any]] = []
    cpu = torch.device("cpu")
    with deterministic_cpu(), Checkpoint.open(base_dir) as base, \
            contextlib.closing(layer_by_layer(model, arch, base, batches, cpu, StreamInfo())) as passes:
        for index, run in enumerate(passes):
            modules = moe_by_layer.get(index)
            layer = model.get_submodule(f"{layers_path}.{index}")
            taps = _LayerTaps()
            masks: dict[str, list[torch.Tensor]] = {"train": [], "holdout": []}
            with Patches() as patches, torch.no_grad():
                if modules is not None:
                    patches.forward_pre_hook(layer, taps.layer_call, with_kwargs=True)
                    patches.forward_hook(layer, taps.layer_output)
                    patches.forward_hook(modules.experts, taps.experts_call)
                for position, batch in enumerate(batches):
                    run(position, batch)
                    real = batch.attention_mask.reshape(-1).bool()
                    held_rows = torch.tensor([record["id"] in held for record in batch.records])
                    held_tokens = held_rows[:, None].expand_as(batch.attention_mask).reshape(-1)
                    masks["train"].append(real & ~held_tokens)
                    masks["holdout"].append(real & held_tokens)
            if modules is None:
                continue
            router, experts = _pruned_block(arch, modules, keep_by_layer[index])
            tensor_names = arch.recalibrated_tensors(base.names(), index)
            if not tensor_names:
                raise RecalibrateError(f"{base_dir}: MoE layer {index} has no router tensor a recalibration can fit")
            parameters, dtypes = _router_parameters(router, names[id(modules.router)], tensor_names, base)
            objective = _LayerObjective(arch, layer, modules, router, experts, taps, masks)
            result = fit_layer(parameters, objective, fit, dtypes)
            values.update((name, result.values[name]) for name in tensor_names)
            layers.append({
                "layer": index, "tensor_names": list(tensor_names), "changed": result.changed, "steps": result.steps,
                "best_step": result.best_step,
                "train_mse_before": result.train_mse_before, "train_mse_after": result.train_mse_after,
                "holdout_mse_before": result.holdout_mse_before, "holdout_mse_after": result.holdout_mse_after,
                "train_tokens": objective.counts["train"], "holdout_tokens": objective.counts["holdout"],
            })
    return values, {"holdout_sequences": sorted(held), "layers": layers}


def _check_drop_map_layers(keep_by_layer: dict[int, Sequence[int]], moe_layers: Iterable[int],
                           keep_source: str) -> None:
    """The drop map covers exactly the base model's MoE layers (both objectives refit each of them)."""
    if sorted(moe_layers) != sorted(keep_by_layer):
        raise RecalibrateError(f"{keep_source}: the drop map covers layers {sorted(keep_by_layer)}, the base model's "
                               f"MoE layers are {sorted(moe_layers)}")


def fit_routers_model_kl(base_dir: Path, keep_by_layer: dict[int, Sequence[int]], settings: dict[str, Any],
                         keep_source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`fit_routers` for ``objective = 'model-kl'`` (:mod:`moeprune.recalibrate.model_fit`):
    the base and the pruned-in-memory model loaded whole, every router tensor fitted together on
    the recorded text (its sha256 checked first, so a rerun never fits other text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.arch import inspect
    from moeprune.profile.streamed import family_adapter
    from moeprune.recalibrate.model_fit import ModelFitSettings, fit_model, pruned_in_memory, read_documents

    text = Path(settings["text"])
    if not text.is_file():
        raise RecalibrateError(f"{text}: the recalibration text is missing; recalibrate.text must name it (rerun needs "
                               "the same file)")
    if sha256_file(text) != settings["text_sha256"]:
        raise RecalibrateError(f"{text}: not the recalibration text recorded (sha256 differs from "
                               f"{settings['text_sha256'][:12]}...); pass the same file")
    fit = ModelFitSettings(settings["learning_rate"], settings["epochs"], settings["batch_sequences"],
                           settings["context_tokens"], settings["relax_tau_start"], settings["relax_tau_end"],
                           settings["validate_every_steps"], settings["holdout_fraction"], settings["seed"])
    documents = read_documents(text)
    with deterministic_cpu(), Checkpoint.open(base_dir) as checkpoint:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        arch = family_adapter(base)
        moe_layers = sorted(m.layer_index for m in arch.moe_modules(base))
        _check_drop_map_layers(keep_by_layer, moe_layers, keep_source)
        pruned = pruned_in_memory(base, arch, keep_by_layer).eval()
        names = {index: arch.recalibrated_tensors(checkpoint.names(), index) for index in moe_layers}
        module_names = _module_names(pruned)
        routers = [m.router for m in arch.moe_modules(pruned)]
        parameters, dtypes = {}, {}
        for modules in arch.moe_modules(pruned):
            if not names[modules.layer_index]:
                raise RecalibrateError(f"{base_dir}: MoE layer {modules.layer_index} has no router tensor a "
                                       "recalibration can fit")
            found, found_dtypes = _router_parameters(modules.router, module_names[id(modules.router)],
                                                     names[modules.layer_index], checkpoint)
            parameters.update(found)
            dtypes.update(found_dtypes)
        token_lists = [tokenizer(document, add_special_tokens=False)["input_ids"] for document in documents]
        top_k = inspect(base_dir, "base model's config.json").top_k
        if not top_k:
            raise RecalibrateError(f"{base_dir}: config.json states no top-k; the model-kl fit needs it")
        result = fit_model(base, pruned, parameters, routers, int(top_k), token_lists, tokenizer.bos_token_id, fit,
                           dtypes)
    values, initial = result.pop("values"), result.pop("initial")
    layers = [{"layer": index, "tensor_names": list(names[index]),
               "changed": any(not torch.equal(values[name], initial[name]) for name in names[index])}
              for index in moe_layers]
    return values, {"holdout_sequences": [], "model_fit": result, "layers": layers}


def write_recalibrated(pruned_dir: Path, out_dir: Path, new_bytes: dict[str, bytes], record: dict[str, Any],
                       max_shard_bytes: int) -> None:
    """``out_dir``: the pruned checkpoint with ``new_bytes`` in place of those tensors (every other
    tensor copied byte for byte, the same shard sizes), its other files, and the record; atomic."""
    with Checkpoint.open(pruned_dir) as pruned, ShardedWriter(out_dir, max_shard_bytes) as writer:
        for info in pruned.tensors():
            if info.name in new_bytes:
                if len(new_bytes[info.name]) != info.nbytes:
                    raise RecalibrateError(f"{pruned_dir}: refitted '{info.name}' has {len(new_bytes[info.name])} "
                                           f"bytes, the pruned tensor {info.nbytes}")
                writer.add_bytes(info.name, info.dtype, info.shape, new_bytes[info.name])
            else:
                writer.add(info.name, info.dtype, info.shape, pruned.source(info))
        weights = {path.name for path in pruned.shards} | {INDEX_NAME, RECORD_NAME}
        for path in sorted(pruned_dir.iterdir()):
            if path.is_file() and path.name not in weights:
                shutil.copyfile(path, writer.staging_dir / path.name)
        with open(writer.staging_dir / RECORD_NAME, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=2, sort_keys=True)
            handle.write("\n")


def recalibrate_checkpoint(base_dir: Path, pruned_dir: Path, sequences_path: Path, domains: Sequence[str],
                           batch_size: int, settings: dict[str, Any], out_dir: Path, max_shard_bytes: int
                           ) -> dict[str, Any]:
    """Recalibrate ``pruned_dir``'s router against ``base_dir`` and write ``out_dir``; the record."""
    started = time.monotonic()
    drop_map_path = pruned_dir / "expert_drop_metadata.json"
    new_bytes, fitted = recalibrate(base_dir, drop_map_path, sequences_path, domains, batch_size, settings)
    record = {
        "format": RECORD_FORMAT,
        "settings": dict(settings),
        "batch_size": batch_size,
        "domains": list(domains),
        "sequences_sha256": sha256_file(sequences_path),
        "drop_map_sha256": sha256_file(drop_map_path),
        **fitted,
    }
    write_recalibrated(pruned_dir, out_dir, new_bytes, record, max_shard_bytes)
    return {**record, "elapsed_s": round(time.monotonic() - started, 3)}


def recipe_settings(recipe: Any) -> dict[str, Any]:
    """The ``[recalibrate]`` values the fit reads (what the record and verify's rerun use): for
    ``model-kl`` also its own settings and the text's resolved path and sha256."""
    settings = {name: getattr(recipe.recalibrate, name) for name in FIT_SETTINGS}
    if recipe.recalibrate.objective == MODEL_KL:
        settings.update({name: getattr(recipe.recalibrate, name) for name in MODEL_KL_SETTINGS})
        text = recipe.recalibrate_text_path
        settings.update(text=str(text), text_sha256=sha256_file(text))
    return settings


def run_recalibrate(recipe: Any, layout: Any) -> dict[str, Any] | None:
    """The recalibrate stage: ``layout.recalibrated_dir`` from the run's pruned checkpoint and
    profile sequences; None (nothing written) when ``[recalibrate]`` is off."""
    if not recipe.recalibrate.enabled:
        return None
    from moeprune.prune.surgery import resolve_base_dir

    return recalibrate_checkpoint(resolve_base_dir(recipe), layout.pruned_dir, layout.sequences_path,
                                  recipe.calibration.domains, recipe.calibration.batch_size, recipe_settings(recipe),
                                  layout.recalibrated_dir, recipe.prune.max_shard_bytes)
