"""Temporary changes to a loaded model, undone exactly: the one patch-and-restore scheme.

Profiling instruments the experts modules, the prune checks mask the routers, and the streamed
replay stands recorders in for the decoder layers while it embeds. Each of those is a change
that must not outlive its block, also when the block raises: a model left instrumented or masked
gives wrong numbers later with no error. :class:`Patches` records each change as it is made and
undoes them all, in reverse order, when its ``with`` block ends.

A restored module is as it was, not merely equivalent: an attribute the instance did not hold
(``forward`` normally comes from its class) is deleted again, so ``module.forward`` is once more
the class's method; one it held is put back as the same object.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

_ABSENT = object()


def _own_value(owner: Any, name: str) -> Any:
    """What ``owner`` itself holds under ``name`` (an instance attribute, or a torch module's
    parameter, buffer or submodule), or _ABSENT when the name resolves through its class."""
    state = vars(owner)
    if name in state:
        return state[name]
    for store in ("_parameters", "_buffers", "_modules"):
        held = state.get(store)
        if isinstance(held, dict) and name in held:
            return held[name]
    return _ABSENT


def forward_attribute(module: Any) -> str:
    """The attribute that holds the forward a module's call runs: accelerate's dispatch hooks
    (offloaded models) replace ``forward`` and call the original through ``_old_forward``."""
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        return "_old_forward"
    return "forward"


class Patches(contextlib.ExitStack):
    """A ``with`` block's changes to modules, each undone when the block ends (also on an exception)."""

    def set_attribute(self, owner: Any, name: str, value: Any) -> None:
        """``owner.name = value`` until the block ends."""
        original = _own_value(owner, name)
        setattr(owner, name, value)

        def restore() -> None:
            if original is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

        self.callback(restore)

    def set_item(self, container: Any, index: int, value: Any) -> None:
        """``container[index] = value`` (e.g. one layer of a ``ModuleList``) until the block ends."""
        original = container[index]
        container[index] = value
        self.callback(container.__setitem__, index, original)

    def replace_forward(self, module: Any, forward: Callable[..., Any]) -> None:
        """Run ``forward`` as ``module``'s forward until the block ends (under accelerate's hooks
        too, which keep moving the inputs to the module's device)."""
        self.set_attribute(module, forward_attribute(module), forward)

    def wrap_forward(self, module: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Run ``wrap(original_forward)`` as ``module``'s forward until the block ends."""
        self.replace_forward(module, wrap(getattr(module, forward_attribute(module))))

    def forward_hook(self, module: Any, hook: Callable[..., Any]) -> None:
        """``module.register_forward_hook(hook)`` until the block ends."""
        self.callback(module.register_forward_hook(hook).remove)

    def forward_pre_hook(self, module: Any, hook: Callable[..., Any], with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook(hook, with_kwargs=...)`` until the block ends."""
        self.callback(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs).remove)


__all__ = ["Patches", "forward_attribute"]
