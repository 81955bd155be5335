"""Generic helpers over loaded transformers objects that the adapters use: the text part of a
config, a module reached by a dotted path, a parameter cut to some rows. None of it differs by
family, so it stays out of the adapter base (:mod:`moeprune.arch.base`)."""

from __future__ import annotations

from typing import Any


def text_config_object(config_or_model: Any) -> Any:
    """The text part of a loaded transformers config (or of a model's config): the one spelling of
    "get the text config" for objects, as ``ModelSpec.text_config`` is for ``config.json`` dicts."""
    config = getattr(config_or_model, "config", config_or_model)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def dotted_attribute(module: Any, dotted: str) -> Any:
    """``module.a.b`` for ``dotted`` = "a.b" (None where a step is missing)."""
    for step in dotted.split("."):
        module = getattr(module, step, None)
    return module


def keep_rows(module: Any, attribute: str, rows: Any) -> None:
    """Keep ``rows`` of ``module.<attribute>`` (a dotted path reaches into a submodule: ``wg.weight``),
    in place: a parameter stays a (frozen) parameter, a buffer or plain tensor a tensor."""
    from torch import nn

    owner_path, _, attribute = attribute.rpartition(".")
    module = dotted_attribute(module, owner_path) if owner_path else module
    value = getattr(module, attribute)
    sliced = value.data[rows].clone()
    if isinstance(value, nn.Parameter):
        setattr(module, attribute, nn.Parameter(sliced, requires_grad=False))
    else:
        setattr(module, attribute, sliced)


__all__ = ["dotted_attribute", "keep_rows", "text_config_object"]
