"""Instrumentation of MoE layers: each routed expert's weighted output norm, measured in the forward itself.

For the duration of :func:`instrument_moe`, every MoE layer's experts module runs
:func:`_instrumented_experts_forward` instead of its own forward. That function computes each
routed (token, expert) output once, exactly as the model's experts implementation does (grouped
matmuls over tokens sorted by expert, ``act(gate) * up``, down projection, times the routing weight
the router produced), records ``||w_te * E_e(x_t)||_2`` and then sums the top-k outputs per token.
The router's probabilities come from a forward hook on the router (the family adapter reads them
from the router's outputs). Nothing is recomputed,
so profiling costs one norm per routed pair on top of a plain forward.

Norms are taken from the float32 product (the product of a bf16 expert output and the fp32
routing weight is fp32 in the model too) with a float32 sum of squares, falling back to float64 for
any row whose squares would overflow, and are accumulated in float64: a bf16 model can neither
overflow nor round away the measurement. Padding tokens never count: the caller sets, before each
forward, the domain index of every token of the batch, -1 for padding.

Besides the per-token sum, the recorder measures the seed's statistic (omnimergekit
``expert_contribution_v2.py``) in the same pass: per (sequence, expert) the float64 sum of squared
weighted-output norms, square-rooted when the sequence ends (every forward holds whole sequences:
one row of the batch is one sequence) and summed over sequences,
``sequence_norm_sum[e] = sum_seq sqrt(sum_{t in seq} ||w_te * E_e(x_t)||^2)``. The seed summed
its squares in bf16, which a later card of its author reports overflowed; here they are float64.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moeprune.arch.base import MoeModules
from moeprune.errors import MoepruneError
from moeprune.patching import Patches


class NoMoeLayersError(MoepruneError):
    """The model has no MoE layer this profiler can instrument."""


def find_moe_layers(model: torch.nn.Module) -> list[MoeModules]:
    """Every decoder layer with a router and routed experts (the family adapter finds them), in layer order.

    Raises NoMoeLayersError when there is none.
    """
    from moeprune.arch import ArchError, arch_for_model

    try:
        modules = arch_for_model(model).moe_modules(model)
    except ArchError as exc:
        raise NoMoeLayersError(str(exc)) from None
    if not modules:
        raise NoMoeLayersError(
            f"model {type(model).__name__} has no MoE layers (no decoder layer with a router and "
            "routed experts, e.g. a dense configuration of an MoE family): there is nothing to profile; "
            "point model.base at a Mixture-of-Experts checkpoint"
        )
    return sorted(modules, key=lambda layer: layer.layer_index)


@dataclass
class _LayerAccumulator:
    """Float64 sums for one layer, ``[num_domains, num_experts]``, kept on the layer's device."""

    contribution_sum: torch.Tensor
    routed_count: torch.Tensor
    router_prob_sum: torch.Tensor
    sequence_norm_sum: torch.Tensor
    max_activation_norm: torch.Tensor  # running max of ||E_e(x_t)||_inf (moeprune.profile.stats)
    # The current forward's per-(sequence, domain, expert) float64 sums of squares, flattened;
    # square-rooted into sequence_norm_sum when the forward's sequences end.
    open_squares: torch.Tensor | None = None


@dataclass
class Capture:
    """Per routed (token, expert) pair of one forward, for tests and debugging (``capture=True``)."""

    token_index: torch.Tensor  # [S] position in the flattened batch
    expert_index: torch.Tensor  # [S]
    weight: torch.Tensor  # [S] routing weight applied by the model
    norm: torch.Tensor  # [S] float64 ||w * E(x)||
    weighted_output: torch.Tensor  # [S, hidden] the weighted expert output added to the residual branch


@dataclass
class ContributionRecorder:
    """Accumulates per-(domain, layer, expert) statistics while :func:`instrument_moe` is active."""

    layers: list[MoeModules]
    num_domains: int
    capture: bool = False
    accumulators: dict[int, _LayerAccumulator] = field(default_factory=dict)
    captures: dict[int, list[Capture]] = field(default_factory=dict)
    router_probs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    _token_domain: torch.Tensor | None = None
    _token_domain_by_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    _token_sequence: torch.Tensor | None = None
    _token_sequence_by_device: dict[torch.device, torch.Tensor] = field(default_factory=dict)
    _num_sequences: int = 0

    def set_token_domains(self, token_domain: torch.Tensor, token_sequence: torch.Tensor | None = None) -> None:
        """Domain index of each token of the next forward (``[batch, seq]`` or flat); -1 = padding.

        ``token_sequence`` numbers the sequence each token belongs to (same shape); by default each
        row of a 2-D ``token_domain`` is one sequence, and a flat one is a single sequence. Every
        sequence must end within the forward (replay passes whole sequences): the sequences of the
        previous forward are closed here.
        """
        self.end_sequences()
        if token_sequence is None:
            if token_domain.ndim == 2:
                rows = torch.arange(token_domain.shape[0], dtype=torch.long)
                token_sequence = rows.unsqueeze(1).expand_as(token_domain)
            else:
                token_sequence = torch.zeros(token_domain.numel(), dtype=torch.long)
        if token_sequence.numel() != token_domain.numel():
            raise ValueError(f"token_sequence has {token_sequence.numel()} entries, token_domain {token_domain.numel()}")
        self._token_domain = token_domain.reshape(-1).to(torch.long)
        self._token_domain_by_device = {}
        self._token_sequence = token_sequence.reshape(-1).to(torch.long)
        self._token_sequence_by_device = {}
        self._num_sequences = int(self._token_sequence.max()) + 1 if self._token_sequence.numel() else 0

    def _sequences_on(self, device: torch.device) -> torch.Tensor:
        assert self._token_sequence is not None
        cached = self._token_sequence_by_device.get(device)
        if cached is None:
            cached = self._token_sequence.to(device)
            self._token_sequence_by_device[device] = cached
        return cached

    def end_sequences(self) -> None:
        """Close the current forward's sequences: add sqrt(sum of squares) per (sequence, expert)."""
        for acc in self.accumulators.values():
            if acc.open_squares is None:
                continue
            num_domains, num_experts = acc.sequence_norm_sum.shape
            per_sequence = acc.open_squares.view(-1, num_domains, num_experts).sqrt().sum(dim=0)
            acc.sequence_norm_sum += per_sequence
            acc.open_squares = None

    def _domains_on(self, device: torch.device) -> torch.Tensor:
        if self._token_domain is None:
            raise RuntimeError("set_token_domains() must be called before each instrumented forward")
        cached = self._token_domain_by_device.get(device)
        if cached is None:
            cached = self._token_domain.to(device)
            self._token_domain_by_device[device] = cached
        return cached

    def _accumulator(self, layer_index: int, num_experts: int, device: torch.device) -> _LayerAccumulator:
        acc = self.accumulators.get(layer_index)
        if acc is None:
            shape = (self.num_domains, num_experts)
            acc = _LayerAccumulator(
                contribution_sum=torch.zeros(shape, dtype=torch.float64, device=device),
                routed_count=torch.zeros(shape, dtype=torch.int64, device=device),
                router_prob_sum=torch.zeros(shape, dtype=torch.float64, device=device),
                sequence_norm_sum=torch.zeros(shape, dtype=torch.float64, device=device),
                max_activation_norm=torch.zeros(shape, dtype=torch.float64, device=device),
            )
            self.accumulators[layer_index] = acc
        return acc

    def record_experts(
        self,
        layer_index: int,
        num_experts: int,
        token_index: torch.Tensor,
        expert_index: torch.Tensor,
        norm: torch.Tensor,
        peak: torch.Tensor | None = None,
    ) -> None:
        """Add the float64 norms of routed pairs (token positions in the flattened batch); ``peak``
        (each pair's unweighted output's largest absolute element) raises the running maximum."""
        domains = self._domains_on(norm.device)
        acc = self._accumulator(layer_index, num_experts, norm.device)
        token_domain = domains[token_index]
        valid = token_domain >= 0
        flat = (token_domain * num_experts + expert_index)[valid]
        acc.contribution_sum.view(-1).index_add_(0, flat, norm[valid])
        acc.routed_count.view(-1).index_add_(0, flat, torch.ones_like(flat))
        if peak is not None:
            acc.max_activation_norm.view(-1).scatter_reduce_(0, flat, peak[valid].to(torch.float64), reduce="amax")
        # The seed's statistic: squares summed per (sequence, domain, expert) until the sequence ends.
        if acc.open_squares is None:
            acc.open_squares = torch.zeros(
                self._num_sequences * self.num_domains * num_experts, dtype=torch.float64, device=norm.device
            )
        sequence = self._sequences_on(norm.device)[token_index][valid]
        acc.open_squares.index_add_(0, sequence * (self.num_domains * num_experts) + flat, norm[valid].square())

    def record_router(self, layer_index: int, probabilities: torch.Tensor) -> None:
        """Add the softmax router probabilities ``[tokens, experts]`` of non-padding tokens."""
        domains = self._domains_on(probabilities.device)
        num_experts = probabilities.shape[-1]
        acc = self._accumulator(layer_index, num_experts, probabilities.device)
        valid = domains >= 0
        acc.router_prob_sum.index_add_(0, domains[valid], probabilities[valid].to(torch.float64))
        if self.capture:
            self.router_probs.setdefault(layer_index, []).append(probabilities.detach().clone())

    def arrays(self) -> tuple[Any, Any, Any]:
        """numpy ``[domains, layers, experts]`` arrays: contribution_sum, routed_count, router_prob_sum."""
        import numpy as np

        self.end_sequences()
        contrib, count, prob = [], [], []
        for layer in self.layers:
            # A layer no forward reached has zeros (created on the CPU: offloaded weights sit on "meta").
            acc = self._accumulator(layer.layer_index, layer.num_experts, torch.device("cpu"))
            contrib.append(acc.contribution_sum.cpu().numpy())
            count.append(acc.routed_count.cpu().numpy())
            prob.append(acc.router_prob_sum.cpu().numpy())
        return (np.stack(contrib, axis=1), np.stack(count, axis=1), np.stack(prob, axis=1))

    def max_norm_arrays(self) -> Any:
        """numpy float64 ``[domains, layers, experts]``: each expert's largest ||E_e(x_t)||_inf."""
        import numpy as np

        return np.stack([self._accumulator(layer.layer_index, layer.num_experts, torch.device("cpu"))
                         .max_activation_norm.cpu().numpy() for layer in self.layers], axis=1)

    def sequence_norm_arrays(self) -> Any:
        """numpy float64 ``[domains, layers, experts]``: sum over sequences of each sequence's norm."""
        import numpy as np

        self.end_sequences()
        return np.stack(
            [
                self._accumulator(layer.layer_index, layer.num_experts, torch.device("cpu")).sequence_norm_sum.cpu().numpy()
                for layer in self.layers
            ],
            axis=1,
        )


def _grouped_mm_usable(device: torch.device, dtype: torch.dtype) -> bool:
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if device.type == "cuda":
        # The CUDA kernel wants bf16 on SM80+; elsewhere the per-expert loop gives the same products.
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return device.type == "cpu"


def _row_norms(weighted: torch.Tensor) -> torch.Tensor:
    """float64 L2 norm of each row of ``weighted``.

    One float32 pass over the rows (an fp32 sum of squares of a bf16/fp32 output is accurate to
    ~1e-7 relative); rows whose squares overflow float32 are recomputed in float64, so a large
    activation can never turn into inf.
    """
    if weighted.dtype == torch.float64:
        return torch.linalg.vector_norm(weighted, dim=-1)
    norms = torch.linalg.vector_norm(weighted, dim=-1, dtype=torch.float32).to(torch.float64)
    overflow = ~torch.isfinite(norms)
    if bool(overflow.any()):
        norms[overflow] = torch.linalg.vector_norm(weighted[overflow], dim=-1, dtype=torch.float64)
    return norms


def _make_instrumented_forward(recorder: ContributionRecorder, layer: MoeModules, arch: Any):
    """The replacement forward of one experts module (bound to it with MethodType)."""
    layer_index = layer.layer_index

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        unsupported = arch.experts_unsupported(self)
        if unsupported:
            raise MoepruneError(f"layer {layer_index}: {unsupported}")
        implementation = getattr(getattr(self, "config", None), "_experts_implementation", "eager")
        num_tokens, top_k = top_k_index.shape
        num_experts = self.num_experts
        if recorder._domains_on(hidden_states.device).numel() != num_tokens:
            raise RuntimeError(
                f"layer {layer_index}: {num_tokens} tokens but token domains were set for a different "
                "batch; call set_token_domains() with this batch's mask"
            )
        expert_ids = top_k_index.reshape(-1)
        sample_weights = top_k_weights.reshape(-1)

        # Sort (token, expert) pairs by expert so each expert runs once over a contiguous block.
        expert_sorted, perm = torch.sort(expert_ids, stable=True)
        token_sorted = perm // top_k
        counts = torch.bincount(expert_sorted, minlength=num_experts)
        use_grouped = implementation == "grouped_mm" and _grouped_mm_usable(
            hidden_states.device, arch.experts_dtype(self)
        )
        expert_out = arch.expert_outputs_sorted(self, hidden_states[token_sorted], counts, use_grouped)
        peaks = expert_out.detach().abs().amax(dim=-1)  # exact in any dtype: the super-experts statistic

        # The model's own product: a bf16/fp32 expert output times the fp32 routing weight.
        weighted = expert_out * sample_weights[perm].unsqueeze(-1)
        del expert_out  # freed before the reordered copy below: one [pairs, hidden] buffer less at the peak
        norms = _row_norms(weighted)
        recorder.record_experts(layer_index, num_experts, token_sorted, expert_sorted, norms, peaks)
        if recorder.capture:
            recorder.captures.setdefault(layer_index, []).append(
                Capture(
                    token_index=token_sorted.clone(),
                    expert_index=expert_sorted.clone(),
                    weight=sample_weights[perm].detach().clone(),
                    norm=norms.detach().clone(),
                    weighted_output=weighted.detach().clone(),
                )
            )

        if implementation == "eager" or implementation is None:
            # The eager forward adds each expert's block into a model-dtype buffer.
            final = torch.zeros_like(hidden_states)
            final.index_add_(0, token_sorted, weighted.to(final.dtype))
            return final
        # grouped_mm / batched_mm: per-token sum over the top-k slots, accumulated in the product dtype.
        restored = torch.empty_like(weighted)
        restored[perm] = weighted
        return restored.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)

    return forward


@contextlib.contextmanager
def instrument_moe(
    model: torch.nn.Module, num_domains: int = 1, capture: bool = False
) -> Iterator[ContributionRecorder]:
    """Instrument every MoE layer of ``model`` and yield the recorder; restore the model on exit.

    Call ``recorder.set_token_domains(...)`` before each forward. ``capture=True`` also keeps every
    routed pair's weighted output vector (tests only: memory grows with tokens x top-k x hidden).
    """
    from moeprune.arch import arch_for_model

    layers = find_moe_layers(model)
    arch = arch_for_model(model)
    recorder = ContributionRecorder(layers=layers, num_domains=num_domains, capture=capture)
    with Patches() as patches:
        for layer in layers:
            patches.replace_forward(
                layer.experts, types.MethodType(_make_instrumented_forward(recorder, layer, arch), layer.experts)
            )

            def router_hook(module, _inputs, outputs, layer_index=layer.layer_index):
                recorder.record_router(layer_index, arch.router_probabilities(module, outputs))

            patches.forward_hook(layer.router, router_hook)
        yield recorder
