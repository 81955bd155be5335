"""Fitting one MoE layer's kept router parameters: pure tensors in, tensors out (no I/O).

The pruned block is the family's own router (kept rows) and experts (kept slices) modules. Its
experts never change, so each kept expert's output on every token is computed once, with the
family's experts forward (a one-expert routing of weight 1), and each step only recombines them
with the router's weights: ``sum_k w_k(x) * expert_{i_k}(x)``. The loss is the mean squared error
to the base block's output (all experts, base routing), fitted on the training tokens with Adam
(full batch, fixed order) and stopped early on the held-out tokens. The values kept are the best
held-out ones after rounding to the checkpoint's dtype; if rounding leaves no held-out gain, the
pruned router is kept unchanged, so the recalibration never makes the held-out fit worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class FitSettings:
    """The optimiser's settings (the recipe's ``[recalibrate]``)."""

    max_steps: int
    learning_rate: float
    patience_steps: int


@dataclass
class LayerData:
    """One MoE layer's calibration tokens (real tokens only, in replay order), float32."""

    router_input: torch.Tensor  # [N, H] what the block passes its router
    experts_input: torch.Tensor  # [N, H] what the block passes its experts
    target: torch.Tensor  # [N, H] the base experts module's output (every expert, base routing)
    holdout: torch.Tensor  # [N] bool: token of a held-out sequence


@dataclass
class LayerFit:
    """What the fit of one layer chose (``values`` in the checkpoint's dtype) and measured."""

    values: dict[str, torch.Tensor]
    train_mse_before: float
    train_mse_after: float
    holdout_mse_before: float
    holdout_mse_after: float
    steps: int
    best_step: int
    changed: bool


def expert_outputs(experts: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``[N, E, H]``: every expert of the (pruned) experts module on every token, through the
    family's own forward with a one-expert routing of weight 1."""
    num_tokens = hidden.shape[0]
    ones = torch.ones((num_tokens, 1), dtype=hidden.dtype)
    columns = []
    for expert in range(int(experts.num_experts)):
        index = torch.full((num_tokens, 1), expert, dtype=torch.long)
        columns.append(experts(hidden, index, ones))
    return torch.stack(columns, dim=1)


def combine(outputs: torch.Tensor, weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The experts block's output from per-expert outputs ``[N, E, H]`` and a routing ``[N, k]``."""
    chosen = outputs.gather(1, index.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
    return (chosen * weights.unsqueeze(-1).to(outputs.dtype)).sum(dim=1)


def routing(router: Any, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights ``[N, k]``, expert index ``[N, k]``) from the family's router forward, which returns
    ``(logits or probabilities, weights, index)`` in transformers 5."""
    outputs = router(hidden)
    return outputs[1], outputs[2]


def mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.mean((prediction - target) ** 2)


def fit_layer(
    router: Any, parameters: Mapping[str, torch.nn.Parameter], experts: Any, data: LayerData,
    settings: FitSettings, storage_dtype: Mapping[str, torch.dtype],
) -> LayerFit:
    """Fit ``parameters`` (the router's own, float32, named as in ``storage_dtype``) in place, then
    leave them at the chosen values; returns those values in their checkpoint dtypes."""
    train = ~data.holdout
    with torch.no_grad():
        outputs = expert_outputs(experts, data.experts_input)
    parts = {
        "train": (data.router_input[train], outputs[train], data.target[train]),
        "holdout": (data.router_input[data.holdout], outputs[data.holdout], data.target[data.holdout]),
    }

    def loss(part: str) -> torch.Tensor:
        hidden, per_expert, target = parts[part]
        weights, index = routing(router, hidden)
        return mse(combine(per_expert, weights, index), target)

    def measure(part: str) -> float:
        with torch.no_grad():
            return float(loss(part))

    initial = {name: p.detach().clone() for name, p in parameters.items()}
    train_before, holdout_before = measure("train"), measure("holdout")
    best, best_loss, best_step, since, steps = initial, holdout_before, 0, 0, 0
    for p in parameters.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(parameters.values()), lr=settings.learning_rate)
    for step in range(1, settings.max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        loss("train").backward()
        optimizer.step()
        steps = step
        held = measure("holdout")
        if held < best_loss:
            best, best_loss, best_step, since = {n: p.detach().clone() for n, p in parameters.items()}, held, step, 0
        else:
            since += 1
            if since >= settings.patience_steps:
                break
    for p in parameters.values():
        p.requires_grad_(False)
    rounded = {name: value.to(storage_dtype[name]) for name, value in best.items()}
    _assign(parameters, rounded)
    holdout_after = measure("holdout")
    changed = holdout_after < holdout_before
    if not changed:  # rounding ate the gain (or there was none): the pruned router stays as it was
        rounded = {name: value.to(storage_dtype[name]) for name, value in initial.items()}
        _assign(parameters, rounded)
        holdout_after = holdout_before
    return LayerFit(rounded, train_before, measure("train"), holdout_before, holdout_after, steps, best_step, changed)


def _assign(parameters: Mapping[str, torch.nn.Parameter], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(values[name].to(p.dtype))
