"""The model's facts, read once: :func:`inspect` binds a :class:`ModelSpec` from ``config.json``
and the safetensors headers (no tensor data is read).

Every stage, check and report that needs to know the model (its family adapter, expert count and
the key that holds it, top-k, MoE layers, layer prefix, towers, transformers class, sizes) asks a
spec instead of reading ``config.json`` keys itself: one reading means one answer, and a family's
quirks (a nested text config, an alias for the expert count) are handled in one place.
``tests/test_arch_spec.py`` scans the sources so no module outside ``arch/`` and ``io/`` reads them.

Two ways in:

- :func:`inspect` for a model directory (read afresh on each call; hold the spec to ask again);
- :meth:`ModelSpec.from_config` for a config dict already in hand (a drop map checked against the
  config it was given, a config about to be written).

The header facts (:attr:`ModelSpec.checkpoint`, :meth:`ModelSpec.load_sizes`) are read on first
use: a config-only check (``invoke check`` on a Hub model not yet downloaded) never opens a shard.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from moeprune.arch.base import ArchError, MoeArch
from moeprune.arch.modules import text_config_object
from moeprune.arch.patterns import EXPERT
from moeprune.errors import MoepruneError

CONFIG_NAME = "config.json"
# Config keys of the multimodal towers a checkpoint may carry beside its text decoder.
TOWER_CONFIG_KEYS = ("vision_config", "audio_config")
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_LAYER_NAME = re.compile(r"^(.*?)layers\.(\d+)\.")


def read_config(path: Path, what: str = "model's config.json",
                error: type[MoepruneError] = ArchError) -> dict[str, Any]:
    """``config.json`` at ``path`` (a file, or a model directory holding it) as a JSON object;
    ``what`` and ``error`` make the one-line message of the caller's stage."""
    from moeprune.userfile import read_json_object

    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    return read_json_object(path, what, error)


def _int(mapping: Mapping[str, Any], key: str | None) -> int | None:
    value = mapping.get(key) if key else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def architectures(config: Mapping[str, Any]) -> Any:
    """The config's ``architectures`` entry as written (a list of class names, or anything else)."""
    return config.get("architectures")


def auto_map_refs(config: Any) -> list[list[str]]:
    """Custom-code references of each ``auto_map`` in a config (top level, then text config), each
    list sorted; a config without one gives an empty list."""
    found = []
    for holder in (config, config.get("text_config") if isinstance(config, dict) else None):
        auto_map = holder.get("auto_map") if isinstance(holder, dict) else None
        if isinstance(auto_map, dict) and auto_map:
            found.append(sorted({str(v if isinstance(v, str) else v[0] if isinstance(v, list) and v else v)
                                 for v in auto_map.values()}))
    return found


def transformers_config(model_dir: Path) -> Any:
    """The model's transformers config object (``AutoConfig``; no weights). Raises what
    transformers raises; callers turn it into their stage's one-line error."""
    import transformers

    return transformers.AutoConfig.from_pretrained(model_dir)


def transformers_model_class(config: Any) -> Any:
    """The transformers class that loads a checkpoint of the transformers ``config``: the first
    class its ``architectures`` names that transformers has, else the Auto class mapping the
    config's type (multimodal first: Gemma 4 is image-text-to-text). ArchError when none does."""
    import transformers

    for name in list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForImageTextToText, transformers.AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto
    raise ArchError(f"no transformers model class for config type {type(config).__name__}")


def meta_tensor_shapes(config: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a checkpoint of ``config`` (a ``config.json`` mapping) stores, as (name,
    shape): the state dict of its transformers class built on the ``meta`` device (no weights),
    less the tensors tied to another, which a checkpoint stores once."""
    import torch
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        cls = transformers_model_class(hf_config)
        model = cls.from_config(hf_config) if cls.__name__.startswith("Auto") else cls._from_config(hf_config)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if hf_config.get_text_config().tie_word_embeddings else set()
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def context_length(model_or_config: Any) -> int | None:
    """Maximum sequence length of a loaded model or transformers config (the text config's
    ``max_position_embeddings``; transformers' default where ``config.json`` states none)."""
    value = getattr(text_config_object(model_or_config), "max_position_embeddings", None)
    return int(value) if value else None


@dataclass(frozen=True)
class TensorSizes:
    """Sizes of a group of tensors: elements of floating-point tensors (whose bytes depend on the
    dtype they are loaded in) and bytes of the others (kept as stored)."""

    float_numel: int = 0
    other_bytes: int = 0

    def bytes_at(self, dtype_bytes: int) -> int:
        return self.float_numel * dtype_bytes + self.other_bytes

    def plus(self, numel: int, dtype: str, nbytes: int) -> TensorSizes:
        if dtype in _FLOAT_DTYPES:
            return TensorSizes(self.float_numel + numel, self.other_bytes)
        return TensorSizes(self.float_numel, self.other_bytes + nbytes)


@dataclass(frozen=True)
class LoadSizes:
    """Where a model's tensors go when loaded: the decoder layers, the shell a text forward needs
    besides them (embeddings, norms, per-layer-input tables) and what it never runs (towers, an
    untied LM head)."""

    layer_prefix: str  # name prefix of the decoder layers in the headers, e.g. "model.language_model."
    layers: tuple[TensorSizes, ...]
    shell: TensorSizes
    unused: TensorSizes


@dataclass(frozen=True)
class CheckpointFacts:
    """Parameter and byte counts from the safetensors headers, with the expert-indexed share."""

    params: int
    tensor_bytes: int
    dtype: str  # the safetensors dtype holding most bytes
    files_bytes: int
    shards: int
    expert_params_per_layer: dict[int, int]  # layer -> params of ONE expert (all expert-indexed tensors)
    expert_bytes_per_layer: dict[int, int]
    experts_per_layer: dict[int, int]


@dataclass(frozen=True)
class ModelSpec:
    """What moeprune knows about one model, bound once from its config (and, on first use, its
    safetensors headers). ``config``/``text_config`` hand out copies: the spec is shared."""

    source: Path  # the config.json it was read from (in messages)
    model_dir: Path | None
    adapter: MoeArch
    _config: dict[str, Any] = field(repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: Path | str = CONFIG_NAME,
                    model_dir: Path | None = None) -> ModelSpec:
        """Bind a config dict; raises ArchError (one line naming ``source``) for an unknown family."""
        from moeprune.arch import arch_for_config

        adapter = arch_for_config(config, source)
        return cls(Path(source), model_dir, adapter, json.loads(json.dumps(config)))

    # ---- config ----------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self._config))

    @property
    def _text(self) -> dict[str, Any]:
        return self.adapter.text_config(self._config)

    def text_config(self) -> dict[str, Any]:
        """A copy of the decoder's config (the nested text config, or the config itself)."""
        return json.loads(json.dumps(self._text))

    def text_int(self, key: str | None) -> int | None:
        """An integer of the text config (None when absent or not an integer)."""
        return _int(self._text, key)

    def required_int(self, key: str) -> int:
        """:meth:`text_int` that must be there: ArchError naming the field otherwise."""
        value = self.text_int(key)
        if value is None:
            raise ArchError(f"{self.source}: no integer {self.adapter.config_key_path(key)}")
        return value

    @property
    def layer_types(self) -> list[Any]:
        """Per-layer attention types of the text config (empty when the family states none)."""
        return list(self._text.get("layer_types") or [])

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def model_type(self) -> str | None:
        from moeprune.arch import model_type_of

        return model_type_of(self._config)

    @property
    def transformers_class(self) -> str:
        """The transformers class that loads the checkpoint for text generation."""
        return self.adapter.transformers_causal_lm

    @property
    def architectures(self) -> Any:
        return architectures(self._config)

    @property
    def towers(self) -> tuple[str, ...]:
        """Multimodal towers the config declares (e.g. ``("vision", "audio")``)."""
        return tuple(key.removesuffix("_config") for key in TOWER_CONFIG_KEYS
                     if isinstance(self._config.get(key), dict))

    @property
    def num_experts_key(self) -> str:
        """The key holding the expert count in this config (the family's name or an alias)."""
        return self.adapter.count_key(self._config)

    @property
    def num_experts_path(self) -> str:
        """:attr:`num_experts_key` with its text-config prefix, as messages name it."""
        return self.adapter.config_key_path(self.num_experts_key)

    @property
    def num_experts_stated(self) -> Any:
        """The stated expert count, unchecked (None if absent)."""
        return self.adapter.raw_num_experts(self._config)

    @property
    def num_experts(self) -> int:
        """The expert count; ArchError (one line naming the field) when there is no positive integer."""
        return self.adapter.num_experts(self._config, self.source)

    @property
    def top_k_key(self) -> str:
        return self.adapter.top_k_key

    @property
    def top_k(self) -> int | None:
        return self.adapter.top_k(self._config)

    @property
    def num_layers(self) -> int | None:
        return self.adapter.num_layers(self._config)

    @property
    def layer_prefix(self) -> str:
        """On-disk name prefix of the text decoder's layers (the family's)."""
        return self.adapter.layer_prefix

    @cached_property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(self.adapter.moe_layers(self._config))

    @property
    def dense_reason(self) -> str | None:
        return self.adapter.dense_reason(self._config)

    def moe_shape(self) -> tuple[int, int, list[int]]:
        """(experts per layer, top-k, MoE layer indices); ArchError (one line naming the keys) for
        a config that describes no mixture of experts."""
        adapter = self.adapter
        num_experts, top_k, num_layers = self.num_experts_stated, self.top_k, self.num_layers
        if not num_experts or not top_k or not num_layers:
            where = f" in {adapter.text_config_key}" if adapter.text_config_key else ""
            raise ArchError(
                f"{self.source}: not a mixture-of-experts config (needs {adapter.num_experts_key}, "
                f"{adapter.top_k_key} and num_hidden_layers{where})"
            )
        dense = self.dense_reason
        if dense:
            raise ArchError(f"{self.source}: {dense}")
        return int(num_experts), int(top_k), list(self.moe_layers)

    def with_num_experts(self, num_experts: int) -> dict[str, Any]:
        """A copy of the config that states ``num_experts`` routed experts per MoE layer."""
        return self.adapter.with_num_experts(self._config, num_experts)

    def check_drop_map(self, drop_map: Any, source: Path | str) -> None:
        """Refuse a drop map that breaks a constraint of this family."""
        self.adapter.check_drop_map(drop_map, self._config, source)

    def routing_groups(self) -> tuple[int, int, int]:
        """(n_group, topk_group, fewest experts a group may keep); (1, 1, 1) for an ungrouped router."""
        return self.adapter.routing_groups(self._config)

    # ---- safetensors headers ------------------------------------------------------------------------

    @cached_property
    def _headers(self) -> tuple[tuple[Any, ...], tuple[Path, ...]]:
        """(every TensorInfo, the shard files): the one read of the headers."""
        from moeprune.io.checkpoint import Checkpoint

        if self.model_dir is None:
            raise ArchError(f"{self.source}: a config without its model directory has no safetensors headers")
        with Checkpoint.open(self.model_dir) as checkpoint:
            return tuple(checkpoint.tensors()), tuple(checkpoint.shards)

    def load_sizes(self) -> LoadSizes:
        """Sizes of the decoder layers, the shell and the unused towers, found from the tensor
        names: the decoder's prefix is the one (outside vision/audio) whose ``layers.N`` are
        exactly ``0 .. num_hidden_layers - 1``."""
        infos, _ = self._headers
        num_layers = self.required_int("num_hidden_layers")
        by_prefix: dict[str, set[int]] = {}
        for info in infos:
            match = _LAYER_NAME.match(info.name)
            if match and not re.search(r"vision|audio", match.group(1)):
                by_prefix.setdefault(match.group(1), set()).add(int(match.group(2)))
        prefixes = [p for p, indices in by_prefix.items() if indices == set(range(num_layers))]
        if len(prefixes) != 1:
            raise ArchError(f"{self.model_dir}: cannot tell the {num_layers} decoder layers apart in the tensor names")
        prefix = prefixes[0]
        layers = [TensorSizes()] * num_layers
        shell = unused = TensorSizes()
        for info in infos:
            numel = _numel(info.shape)
            match = _LAYER_NAME.match(info.name)
            if match and match.group(1) == prefix:
                index = int(match.group(2))
                layers[index] = layers[index].plus(numel, info.dtype, info.nbytes)
            elif re.search(r"vision|audio|^lm_head\.", info.name):
                unused = unused.plus(numel, info.dtype, info.nbytes)
            else:
                shell = shell.plus(numel, info.dtype, info.nbytes)
        return LoadSizes(prefix, tuple(layers), shell, unused)

    @cached_property
    def checkpoint(self) -> CheckpointFacts:
        """Parameter and byte counts; the adapter says which tensors are indexed by expert (a fused
        tensor holds ``shape[0]`` experts, a per-expert tensor one). ArchError for an expert tensor
        it does not know or a layer whose tensors disagree on the expert count."""
        infos, shards = self._headers
        arch = self.adapter
        params = tensor_bytes = 0
        expert_params: dict[int, int] = {}
        expert_bytes: dict[int, int] = {}
        experts: dict[int, int] = {}
        split_params: dict[int, int] = {}  # per-expert layout: layer -> params of all its experts' own tensors
        split_bytes: dict[int, int] = {}
        split_experts: dict[int, set[int]] = {}
        dtypes: dict[str, int] = {}
        for info in infos:
            numel = _numel(info.shape)
            params += numel
            tensor_bytes += info.nbytes
            dtypes[info.dtype] = dtypes.get(info.dtype, 0) + info.nbytes
            try:
                tensor = arch.classify_tensor(info.name)
            except ArchError as exc:
                raise ArchError(f"{info.shard}: {exc}") from None
            if tensor is None:
                continue
            layer = tensor.layer
            if tensor.role == EXPERT:
                split_params[layer] = split_params.get(layer, 0) + numel
                split_bytes[layer] = split_bytes.get(layer, 0) + info.nbytes
                split_experts.setdefault(layer, set()).add(int(tensor.expert))  # type: ignore[arg-type]
                continue
            count = info.shape[0]
            if experts.setdefault(layer, count) != count:
                raise ArchError(f"{info.shard}: '{info.name}' has {count} experts, other tensors of layer {layer} "
                                f"have {experts[layer]}")
            expert_params[layer] = expert_params.get(layer, 0) + numel // count
            expert_bytes[layer] = expert_bytes.get(layer, 0) + info.nbytes // count
        for layer, ids in split_experts.items():
            count = len(ids)
            if experts.setdefault(layer, count) != count:
                raise ArchError(f"{self.model_dir}: layer {layer} has per-expert tensors for {count} experts, its "
                                f"router has {experts[layer]}")
            expert_params[layer] = expert_params.get(layer, 0) + split_params[layer] // count
            expert_bytes[layer] = expert_bytes.get(layer, 0) + split_bytes[layer] // count
        return CheckpointFacts(
            params=params,
            tensor_bytes=tensor_bytes,
            dtype=max(dtypes, key=lambda k: dtypes[k]) if dtypes else "?",
            files_bytes=sum(p.stat().st_size for p in shards),
            shards=len(shards),
            expert_params_per_layer=expert_params,
            expert_bytes_per_layer=expert_bytes,
            experts_per_layer=experts,
        )


def _numel(shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= int(dim)
    return numel


def inspect(model_dir: Path | str, what: str = "model's config.json",
            error: type[MoepruneError] = ArchError) -> ModelSpec:
    """The :class:`ModelSpec` of the model in ``model_dir``, read now.

    Not cached across calls: a checkpoint rewritten in place (same inode, size and a timestamp of
    the same clock tick) would otherwise answer with its old facts. Reading ``config.json`` costs
    microseconds; a caller that asks many questions holds the spec, whose header facts are read
    once, on first use. A missing, unreadable or malformed ``config.json`` raises ``error`` (one
    line naming the file; ``what`` says whose config it is); an unsupported ``model_type`` raises
    ArchError naming it.
    """
    path = Path(model_dir) / CONFIG_NAME
    if not path.exists():
        raise error(f"{path}: {what} not found; point at a Hugging Face model directory")
    return ModelSpec.from_config(read_config(path, what, error), path, Path(model_dir))


__all__ = ["CONFIG_NAME", "CheckpointFacts", "LoadSizes", "ModelSpec", "TensorSizes", "architectures",
           "auto_map_refs", "context_length", "inspect", "meta_tensor_shapes", "read_config", "text_config_object", "transformers_config",
           "transformers_model_class"]
