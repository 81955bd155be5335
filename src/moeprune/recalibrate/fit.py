"""Fitting one MoE layer's kept router parameters against an objective (no I/O).

The pruned block is the family's own router (kept rows) and experts (kept slices) modules. Its
experts never change, so each kept expert's output on every token is computed once
(:func:`expert_outputs`, the family's experts forward with a one-expert routing of weight 1), and
each step only recombines them with the router's weights (:func:`combine`). The objective (see
:mod:`moeprune.recalibrate.stage`) is the mean squared error of the decoder layer's output with the
pruned block to the base layer's output, on the base layer's inputs: so the norms the family
applies after its experts count as they do in the model. :func:`fit_layer` runs Adam (full batch,
fixed order) on the training tokens and stops early on the held-out ones. The values kept are
the best held-out ones after rounding to the checkpoint's dtype; if rounding leaves no held-out
gain, the pruned router is kept unchanged, so the recalibration never makes the held-out fit worse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class FitSettings:
    """The optimiser's settings (the recipe's ``[recalibrate]``)."""

    max_steps: int
    learning_rate: float
    patience_steps: int


class Objective(Protocol):
    """The loss of the current parameters on the training or held-out tokens."""

    def loss(self, part: str, backward: bool) -> float:
        """Mean loss on ``part`` ("train" or "holdout"); with ``backward``, its gradient is
        accumulated into the parameters."""


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


def fit_layer(parameters: Mapping[str, torch.nn.Parameter], objective: Objective, settings: FitSettings,
              storage_dtype: Mapping[str, torch.dtype]) -> LayerFit:
    """Fit ``parameters`` (float32, named as in ``storage_dtype``) in place, then leave them at the
    chosen values; returns those values in their checkpoint dtypes."""

    def measure(part: str) -> float:
        with torch.no_grad():
            return objective.loss(part, backward=False)

    initial = {name: p.detach().clone() for name, p in parameters.items()}
    train_before, holdout_before = measure("train"), measure("holdout")
    best, best_loss, best_step, since, steps = initial, holdout_before, 0, 0, 0
    for p in parameters.values():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(list(parameters.values()), lr=settings.learning_rate)
    for step in range(1, settings.max_steps + 1):
        optimizer.zero_grad(set_to_none=True)
        objective.loss("train", backward=True)
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
