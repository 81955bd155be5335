"""Model families: one adapter per Mixture-of-Experts architecture, chosen from ``model_type``.

``inspect(model_dir)`` binds a model's :class:`ModelSpec` (its adapter and every fact of its
config and safetensors headers; :mod:`moeprune.arch.spec`): the one reader of ``config.json``.
``arch_for_config(config)`` picks the adapter of a ``config.json`` dict, ``arch_for_model(model)``
that of a loaded transformers model, ``arch_for_gguf(name)`` that of a GGUF architecture name.
See :mod:`moeprune.arch.base` for what an adapter knows.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moeprune.arch.base import ArchError, MoeArch
from moeprune.arch.modules import text_config_object
from moeprune.arch.deepseek import DeepseekV2, DeepseekV3, Glm4Moe
from moeprune.arch.dots1 import Dots1
from moeprune.arch.gemma4 import Gemma4
from moeprune.arch.glm4_moe_lite import Glm4MoeLite
from moeprune.arch.glm_moe_dsa import GlmMoeDsa
from moeprune.arch.gpt_oss import GptOss
from moeprune.arch.hunyuan_v1_moe import HunyuanV1Moe
from moeprune.arch.minimax_m2 import MiniMaxM2
from moeprune.arch.mixtral import Mixtral
from moeprune.arch.olmoe import Olmoe
from moeprune.arch.qwen3_5_moe import Qwen35Moe
from moeprune.arch.qwen3_next import Qwen3Next
from moeprune.arch.qwen_moe import Qwen2Moe, Qwen3Moe

ADAPTERS: tuple[MoeArch, ...] = (
    Gemma4(), Qwen3Moe(), Qwen2Moe(), Mixtral(), Olmoe(), DeepseekV3(), Glm4Moe(), DeepseekV2(), GptOss(),
    Qwen35Moe(), Qwen3Next(), MiniMaxM2(), HunyuanV1Moe(), GlmMoeDsa(), Glm4MoeLite(), Dots1(),
)


def _by_model_type() -> dict[str, MoeArch]:
    return {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}


def supported_model_types() -> list[str]:
    return sorted(_by_model_type())


def model_type_of(config: Mapping[str, Any]) -> str | None:
    """``model_type`` of a config dict: the top level's, else a nested text config's."""
    value = config.get("model_type")
    if isinstance(value, str):
        return value
    nested = config.get("text_config")
    if isinstance(nested, Mapping) and isinstance(nested.get("model_type"), str):
        return nested["model_type"]
    return None


def arch_for_config(config: Mapping[str, Any], source: Path | str = "config.json") -> MoeArch:
    """The adapter for ``config`` (a ``config.json`` dict).

    A config without ``model_type`` (hand-written test configs) is read with the Gemma 4 adapter
    when it nests a ``text_config``, the layout this project started with.
    """
    model_type = model_type_of(config)
    if model_type is None:
        if isinstance(config.get("text_config"), Mapping):
            return _by_model_type()["gemma4"]
        raise ArchError(f"{source}: no model_type; cannot tell the model family (supported: "
                        f"{', '.join(supported_model_types())})")
    adapter = _by_model_type().get(model_type)
    if adapter is None:
        raise ArchError(
            f"{source}: model_type '{model_type}' is not a supported MoE family (supported: "
            f"{', '.join(supported_model_types())}); add an adapter under src/moeprune/arch/"
        )
    return adapter


def arch_for_dir(model_dir: Path) -> MoeArch:
    """The adapter of the model in ``model_dir`` (its :func:`inspect` spec's)."""
    return inspect(model_dir).adapter


def arch_for_model(model: Any) -> MoeArch:
    """The adapter for a loaded transformers model (its config's ``model_type``)."""
    config = model.config
    types = [getattr(config, "model_type", None), getattr(text_config_object(config), "model_type", None)]
    for model_type in types:
        adapter = _by_model_type().get(model_type) if model_type else None
        if adapter is not None:
            return adapter
    raise ArchError(
        f"model {type(model).__name__} (model_type {types[0]!r}) is not a supported MoE family "
        f"(supported: {', '.join(supported_model_types())})"
    )


def arch_for_gguf(gguf_arch: str | None) -> MoeArch | None:
    """The adapter whose llama.cpp architecture name is ``gguf_arch`` (None if none)."""
    for adapter in ADAPTERS:
        if adapter.gguf_arch == gguf_arch:
            return adapter
    return None


from moeprune.arch.spec import (  # noqa: E402 - spec binds through arch_for_config above
    ModelSpec,
    context_length,
    inspect,
    read_config,
    transformers_config,
    transformers_model_class,
)

__all__ = ["ADAPTERS", "ArchError", "ModelSpec", "MoeArch", "arch_for_config", "arch_for_dir", "arch_for_gguf",
           "arch_for_model", "context_length", "inspect", "model_type_of", "read_config",
           "supported_model_types", "text_config_object", "transformers_config", "transformers_model_class"]
