"""The adapter protocol: what moeprune needs to know about one Mixture-of-Experts architecture.

An adapter (:class:`MoeArch`) is the only place that knows a family's names. It answers, for
the three views moeprune has of a model:

- **the config** (``config.json`` as a dict): expert count, top-k, which decoder layers are MoE,
  how to write a new expert count, and the family's constraints on a drop map;
- **the checkpoint on disk** (tensor names of the Hub layout that ``save_pretrained`` writes):
  which tensors are indexed by expert (fused ``[E, ...]`` tensors sliced on the expert axis, or
  one tensor per expert renumbered), which router tensors are sliced (weight rows, biases,
  correction biases, per-expert scales) and which are never touched (shared experts);
- **the model in memory** (transformers 5 modules, experts fused as ``[E, ...]`` parameters):
  the router and experts module of each MoE layer, how the router turns logits into each routed
  pair's weight, how to slice the modules, and how to build and feed one decoder layer;

plus the GGUF architecture name and keys that the converted file must carry.

Subclasses set class attributes and override the few methods whose answer differs. Everything
here is pure bookkeeping over dicts, names and modules; I/O stays with the callers. What is the
same for every family lives beside it: the on-disk tensor vocabulary and its matching in
:mod:`moeprune.arch.patterns`, helpers over transformers objects in :mod:`moeprune.arch.modules`,
transformers' loading plan and module building in :mod:`moeprune.io`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from moeprune.arch.modules import dotted_attribute, keep_rows, text_config_object
from moeprune.arch.patterns import (
    EXPERT,
    EXPERTS,
    RECALIBRATED_ROLES,
    TOWER_MARKERS,
    ExpertTensor,
    TensorPattern,
    compile_patterns,
    match_expert_tensor,
    required_labels,
)
from moeprune.errors import MoepruneError
from moeprune.patching import Patches


class ArchError(MoepruneError):
    """A model, config or drop map this architecture adapter cannot handle."""


# Routing kinds (how each routed pair's weight is made from the router's logits).
SOFTMAX_TOPK = "softmax-then-top-k"  # softmax over all experts, top-k, optionally renormalised
TOPK_SOFTMAX = "top-k-then-softmax"  # top-k logits, softmax over the k
SIGMOID_GROUPED = "sigmoid-correction-bias-grouped"  # sigmoid scores, + correction bias for choice, grouped top-k
SIGMOID_BIASED = "sigmoid-correction-bias"  # sigmoid scores, + correction bias for choice, top-k, renormalised


@dataclass(frozen=True)
class MoeModules:
    """One decoder layer's routed-experts block in memory."""

    layer_index: int
    router: Any  # the module whose forward returns the routing
    experts: Any  # the fused experts module: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
    block: Any  # the module holding router and experts (decoder layer or its mlp)

    @property
    def num_experts(self) -> int:
        """The routed experts the module holds now (after an in-memory prune, the kept ones)."""
        return int(self.experts.num_experts)


class MoeArch:
    """Base adapter. A family sets the class attributes and overrides what differs."""

    name: ClassVar[str]  # short id, e.g. "gemma4"
    family: ClassVar[str]  # display name, e.g. "Gemma 4"
    model_types: ClassVar[tuple[str, ...]]  # config.json model_type values (top level or text config)
    transformers_causal_lm: ClassVar[str]  # transformers class name that loads the checkpoint for text generation

    # config keys (of the text config)
    num_experts_key: ClassVar[str] = "num_experts"
    num_experts_aliases: ClassVar[tuple[str, ...]] = ()  # other spellings transformers writes for the same count
    top_k_key: ClassVar[str] = "num_experts_per_tok"
    expert_intermediate_key: ClassVar[str] = "moe_intermediate_size"
    dense_intermediate_key: ClassVar[str | None] = "intermediate_size"
    text_config_key: ClassVar[str | None] = None  # nested text config (multimodal families)

    # on disk: the family states its router's tensors (weight rows, biases, correction biases,
    # scales); its expert tensors come from transformers' conversion mapping (see
    # moeprune.arch.conversion), or from ``own_expert_patterns`` where transformers has none.
    router_patterns: ClassVar[tuple[TensorPattern, ...]] = ()
    own_expert_patterns: ClassVar[tuple[TensorPattern, ...]] = ()
    conversion_types: ClassVar[tuple[str, ...] | None] = None  # keys of the conversion mapping (default: model_types)
    experts_module_re: ClassVar[str] = r"(?:^|\.)layers\.\d+\.(?:mlp\.)?experts\."  # anything here is expert-indexed
    never_sliced_re: ClassVar[str | None] = None  # shared experts and gates: copied byte for byte
    layer_prefix: ClassVar[str] = "model.layers."  # decoder layers of the text model

    # in memory
    routing: ClassVar[str] = SOFTMAX_TOPK
    router_attribute: ClassVar[str] = "gate"
    experts_attribute: ClassVar[str] = "experts"
    block_attribute: ClassVar[str | None] = "mlp"  # None: router/experts sit on the decoder layer itself
    # names of the router's parameters/buffers indexed by expert (sliced in memory), with the axis 0
    router_expert_params: ClassVar[tuple[str, ...]] = ("weight",)
    expert_params: ClassVar[tuple[str, ...]] = ("gate_up_proj", "down_proj")
    # recalibrate.objective = "model-kl" replaces the router's forward with a relaxed top-k written for
    # this family's router (moeprune.recalibrate.model_fit.RelaxedTopK); False: only "layer-mse"
    relaxed_top_k_router: ClassVar[bool] = False

    # GGUF (pinned convert_hf_to_gguf.py)
    gguf_arch: ClassVar[str]
    gguf_required_tensors: ClassVar[tuple[tuple[str, str], ...]] = ()  # (regex, what it is), sized [E]
    # (on-disk label of a fused EXPERTS pattern, GGUF tensor name with {layer}) for the expert tensors
    # the pinned converter writes unchanged ([E, ...] in the same element order): ``invoke verify``
    # compares them with the safetensors bit for bit. Empty: not declared for this family (not compared).
    gguf_expert_tensors: ClassVar[tuple[tuple[str, str], ...]] = ()
    gguf_convert_args: ClassVar[tuple[str, ...]] = ()  # extra convert_hf_to_gguf.py arguments the family needs

    # card and docs wording
    router_sentence: ClassVar[str] = "The router keeps only the rows of retained experts"

    # ---- config ---------------------------------------------------------------------------------

    def text_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The part of ``config`` that describes the decoder (a nested text config, or the config)."""
        if self.text_config_key:
            nested = config.get(self.text_config_key)
            if isinstance(nested, dict):
                return nested  # type: ignore[return-value]
        return config  # type: ignore[return-value]

    def count_key(self, config: Mapping[str, Any]) -> str:
        """The key that holds the expert count in this config (the primary name or an alias)."""
        text = self.text_config(config)
        for key in (self.num_experts_key, *self.num_experts_aliases):
            if key in text:
                return key
        return self.num_experts_key

    def num_experts(self, config: Mapping[str, Any], source: Path | str = "config.json") -> int:
        value = self.text_config(config).get(self.count_key(config))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ArchError(f"{source}: no integer {self.config_key_path(self.num_experts_key)}; not an MoE model")
        return value

    def raw_num_experts(self, config: Mapping[str, Any]) -> Any:
        """The stated expert count, unchecked (None if absent)."""
        return self.text_config(config).get(self.count_key(config))

    def top_k(self, config: Mapping[str, Any]) -> int | None:
        value = self.text_config(config).get(self.top_k_key)
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    def num_layers(self, config: Mapping[str, Any]) -> int | None:
        value = self.text_config(config).get("num_hidden_layers")
        return int(value) if isinstance(value, int) else None

    def dense_reason(self, config: Mapping[str, Any]) -> str | None:
        """Why a config of this family has no routed experts at all (None: it has some)."""
        return None

    def is_moe_layer(self, config: Mapping[str, Any], layer: int) -> bool:
        """Whether decoder layer ``layer`` has routed experts (default: every layer)."""
        return True

    def moe_layers(self, config: Mapping[str, Any]) -> list[int]:
        """Indices of the decoder layers with routed experts."""
        return [i for i in range(self.num_layers(config) or 0) if self.is_moe_layer(config, i)]

    def with_num_experts(self, config: Mapping[str, Any], num_experts: int) -> dict[str, Any]:
        """A copy of ``config`` that states ``num_experts`` routed experts per MoE layer."""
        updated = json.loads(json.dumps(config))
        self.text_config(updated)[self.count_key(config)] = num_experts
        return updated

    def config_key_path(self, key: str) -> str:
        return f"{self.text_config_key}.{key}" if self.text_config_key else key

    def check_drop_map(self, drop_map: Any, config: Mapping[str, Any], source: Path | str) -> None:
        """Refuse a drop map that breaks a constraint of this family (default: none)."""

    def routing_groups(self, config: Mapping[str, Any]) -> tuple[int, int, int]:
        """(n_group, topk_group, fewest experts a group may keep) of a router that chooses within
        contiguous expert groups; (1, 1, 1) for one that does not (the default)."""
        return 1, 1, 1

    def gguf_key(self, key: str) -> str:
        return f"{self.gguf_arch}.{key}"

    # ---- checkpoint on disk -----------------------------------------------------------------------

    @property
    def expert_patterns(self) -> tuple[TensorPattern, ...]:
        """Every expert-indexed tensor pattern: the experts' (derived once), then the router's."""
        cached = self.__dict__.get("_expert_patterns")
        if cached is None:
            from moeprune.arch.conversion import expert_patterns_for

            experts = expert_patterns_for(self.family, self.conversion_types or self.model_types,
                                          self.own_expert_patterns)
            cached = experts + self.router_patterns
            self.__dict__["_expert_patterns"] = cached
        return cached

    def _compiled(self) -> list[tuple[TensorPattern, re.Pattern[str]]]:
        cached = self.__dict__.get("_compiled_patterns")
        if cached is None:
            cached = compile_patterns(self.expert_patterns)
            self.__dict__["_compiled_patterns"] = cached
        return cached

    def classify_tensor(self, name: str) -> ExpertTensor | None:
        """The expert-indexed tensor ``name`` is, or None for a tensor copied unchanged.

        Raises ArchError for a tensor under an experts module that no pattern knows (a quantized
        scale, an unknown split): it must never be copied unsliced.
        """
        if any(marker in name for marker in TOWER_MARKERS):
            return None
        if self.never_sliced_re and re.search(self.never_sliced_re, name):
            return None
        found = match_expert_tensor(name, self._compiled())
        if found is not None:
            return found
        if re.search(self.experts_module_re, name):
            raise ArchError(f"unsupported expert tensor '{name}' ({self.unsupported_hint()})")
        return None

    def recalibrated_tensors(self, names: Sequence[str], layer: int) -> list[str]:
        """The on-disk router tensors of MoE layer ``layer`` among ``names`` that a router
        recalibration may change (:data:`RECALIBRATED_ROLES`: router rows, router biases, per-expert
        scales such as Gemma 4's ``per_expert_scale``); every other tensor it must leave bit-exact."""
        found = []
        for name in names:
            tensor = self.classify_tensor(name)
            if tensor is not None and tensor.layer == layer and tensor.role in RECALIBRATED_ROLES:
                found.append(name)
        return sorted(found)

    def unsupported_hint(self) -> str:
        fused = [p.label for p in self.expert_patterns if p.role in (EXPERTS, EXPERT)]
        return (f"only {self.family} {', '.join(fused)} in bf16/fp are supported; quantized or "
                "differently split checkpoints must be converted first")

    def required_labels(self, layout_roles: set[str]) -> list[str]:
        """Labels every MoE layer must have, given the roles found (fused and per-expert alternatives)."""
        return required_labels(self.expert_patterns, layout_roles)

    # ---- model in memory ---------------------------------------------------------------------------

    def decoder_layers(self, model: Any) -> Sequence[Any]:
        """The text decoder's layer list (``nn.ModuleList``)."""
        return self.text_model(model).layers

    def text_model(self, model: Any) -> Any:
        """The module with ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb`` (no LM head)."""
        inner = getattr(model, "model", model)
        return getattr(inner, "language_model", inner)

    def moe_block(self, layer: Any) -> Any | None:
        return layer if self.block_attribute is None else getattr(layer, self.block_attribute, None)

    def moe_modules(self, model: Any) -> list[MoeModules]:
        """Every MoE layer's router and experts, in layer order (empty for a dense model)."""
        found = []
        for index, layer in enumerate(self.decoder_layers(model)):
            block = self.moe_block(layer)
            router = getattr(block, self.router_attribute, None) if block is not None else None
            experts = getattr(block, self.experts_attribute, None) if block is not None else None
            if router is None or experts is None or not hasattr(experts, "num_experts"):
                continue
            layer_index = getattr(layer, "layer_idx", None)
            found.append(MoeModules(int(index if layer_index is None else layer_index), router, experts, block))
        return found

    def router_probabilities(self, router: Any, outputs: Any) -> Any:
        """Per-token router distribution over all experts ``[T, E]`` (float32) from the router's outputs."""
        import torch

        logits = outputs[0]
        if self.routing == SIGMOID_GROUPED:
            return torch.sigmoid(logits.float())
        return torch.softmax(logits.float(), dim=-1)

    def experts_unsupported(self, experts: Any) -> str | None:
        """Why the profiler cannot compute this experts module's routed outputs exactly (None: it can)."""
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False) or getattr(
            experts, "_is_expert_parallel", False
        ):
            return "experts with biases, transposed weights or expert parallelism are not supported by the profiler"
        return None

    def experts_dtype(self, experts: Any) -> Any:
        """Dtype of the fused expert weights."""
        return experts.gate_up_proj.dtype

    def expert_outputs_sorted(self, experts: Any, hidden_sorted: Any, counts: Any, use_grouped: bool) -> Any:
        """Unweighted expert outputs for tokens sorted by expert (``counts[e]`` rows for expert e).

        Computes exactly what the fused experts module of transformers 5 computes for each routed
        pair (``gate_up_proj`` [E, 2I, H], ``act(gate) * up`` or the module's ``_apply_gate``,
        ``down_proj`` [E, H, I]), with the same kernels.
        """
        import torch
        import torch.nn.functional as F

        gate_up_proj = experts.gate_up_proj
        down_proj = experts.down_proj
        apply_gate = getattr(experts, "_apply_gate", None)

        def gate(projected: torch.Tensor) -> torch.Tensor:
            if apply_gate is not None:
                return apply_gate(projected)
            gate_part, up_part = projected.chunk(2, dim=-1)
            return experts.act_fn(gate_part) * up_part

        if use_grouped:
            # The same kernel and operand layout as transformers' grouped_mm experts implementation.
            offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
            projected = F.grouped_mm(hidden_sorted.to(gate_up_proj.dtype), gate_up_proj.transpose(-2, -1), offs=offsets)
            projected = gate(projected)
            return F.grouped_mm(projected, down_proj.transpose(-2, -1), offs=offsets)

        # One matmul pair per routed expert over its contiguous block of tokens (the eager algorithm).
        output = hidden_sorted.new_empty((hidden_sorted.shape[0], down_proj.shape[1]), dtype=down_proj.dtype)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            block = hidden_sorted[start : start + count].to(gate_up_proj.dtype)
            projected = gate(F.linear(block, gate_up_proj[expert]))
            output[start : start + count] = F.linear(projected, down_proj[expert])
            start += count
        return output

    def route(self, router: Any, logits: Any, allowed: Any | None = None) -> tuple[Any, Any]:
        """(top_k_weights, top_k_index) from router ``logits`` ``[T, E]`` exactly as the family does.

        ``allowed`` (bool ``[E]``) masks experts out of the choice: the routing of the pruned model.
        """
        import torch

        top_k = int(router.top_k)
        if self.routing == SOFTMAX_TOPK:
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            values, index = torch.topk(probs, top_k, dim=-1)
            if getattr(router, "norm_topk_prob", True):
                values = values / values.sum(dim=-1, keepdim=True)
            return values.to(logits.dtype), index
        if self.routing == TOPK_SOFTMAX:
            if allowed is not None:
                logits = logits.masked_fill(~allowed, float("-inf"))
            values, index = torch.topk(logits, top_k, dim=-1)
            return torch.softmax(values, dim=1, dtype=values.dtype), index
        raise ArchError(f"{self.family}: routing '{self.routing}' has no generic implementation")

    @contextlib.contextmanager
    def masked_routing(self, model: Any, drop_by_layer: Mapping[int, Sequence[int]]) -> Iterator[None]:
        """Within the block, the router of each listed layer can never choose its dropped experts."""
        with Patches() as patches:
            for modules in self.moe_modules(model):
                dropped = list(drop_by_layer.get(modules.layer_index, []))
                if dropped:
                    self.mask_router(patches, modules, dropped)
            yield

    def mask_router(self, patches: Patches, modules: MoeModules, dropped: Sequence[int]) -> None:
        """Patch (through ``patches``) one MoE layer's router so it never chooses ``dropped``: by
        default its forward re-routes its logits with those experts masked (:meth:`route`)."""
        import torch

        router = modules.router
        allowed = torch.ones(modules.num_experts, dtype=torch.bool)
        allowed[list(dropped)] = False

        def wrap(original):
            # ``extra``: what the block passes the router besides the hidden states (MiniMax-M2's bias)
            def forward(hidden_states, *extra):
                outputs = original(hidden_states, *extra)
                weights, index = self.route(router, outputs[0], allowed.to(outputs[0].device), *extra)
                return outputs[0], weights, index

            return forward

        patches.wrap_forward(router, wrap)

    def prune_in_memory(self, model: Any, keep_by_layer: Mapping[int, Sequence[int]]) -> None:
        """Keep only ``keep_by_layer[L]`` experts of every MoE layer L, in place (as the prune stage on disk)."""
        import torch

        layers = {m.layer_index: m for m in self.moe_modules(model)}
        if sorted(keep_by_layer) != sorted(layers):
            raise ArchError(
                f"keep lists cover layers {sorted(keep_by_layer)} but the model's MoE layers are {sorted(layers)}"
            )
        counts = {len(keep) for keep in keep_by_layer.values()}
        if len(counts) != 1:
            raise ArchError(f"layers keep different counts {sorted(counts)}; transformers needs one count")
        kept = counts.pop()
        for index, modules in layers.items():
            rows = torch.tensor(sorted(int(i) for i in keep_by_layer[index]), dtype=torch.long)
            self._slice_modules(modules, rows, kept)
        self._set_config_count(model, kept)
        for modules in layers.values():
            block_config = getattr(modules.block, "config", None)
            if block_config is not None:
                setattr(block_config, self.num_experts_key, kept)

    def _slice_modules(self, modules: MoeModules, rows: Any, kept: int) -> None:
        for attribute in self.expert_params:
            if dotted_attribute(modules.experts, attribute) is not None:
                keep_rows(modules.experts, attribute, rows)
        modules.experts.num_experts = kept
        for attribute in self.router_expert_params:
            if dotted_attribute(modules.router, attribute) is not None:
                keep_rows(modules.router, attribute, rows)
        if hasattr(modules.router, "num_experts"):
            modules.router.num_experts = kept

    def _set_config_count(self, model: Any, kept: int) -> None:
        config = model.config
        text = text_config_object(config)
        setattr(text, self.num_experts_key, kept)

    def model_num_experts(self, model: Any) -> int:
        config = model.config
        text = text_config_object(config)
        return int(getattr(text, self.num_experts_key))

    def model_top_k(self, model: Any) -> int | None:
        config = model.config
        text = text_config_object(config)
        value = getattr(text, self.top_k_key, None)
        return int(value) if value is not None else None

    def embed_inputs(self, model: Any, input_ids: Any) -> Any:
        """Input embeddings of ``input_ids`` as the text model computes them (scaling included)."""
        return self.text_model(model).embed_tokens(input_ids)

    # ---- layer-streamed replay (profile.replay = "streamed", moeprune.profile.streamed) ---------------

    def replay_body_path(self, model: Any) -> str:
        """Attribute path of the module whose forward the replay calls (the model without its LM head)."""
        return "model" if getattr(model, "model", None) is not None else ""

    def decoder_layers_path(self, model: Any) -> str:
        """Attribute path, from ``model``, of :meth:`decoder_layers`."""
        layers = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is layers:
                return name
        raise ArchError(f"{type(model).__name__}: the decoder layers are not a submodule of the model")

    def streamed_unused_modules(self, model: Any) -> tuple[str, ...]:
        """Attribute paths of modules a text-only forward never runs (multimodal towers, the LM head):
        streamed replay leaves them unloaded."""
        body = self.replay_body_path(model)
        inner = getattr(model, body) if body else model
        unused = [
            f"{body}.{name}" if body else name
            for name, _child in inner.named_children()
            if any(word in name for word in ("vision", "audio", "video"))
        ]
        if getattr(model, "lm_head", None) is not None:
            unused.append("lm_head")
        return tuple(unused)

    def layer_tensor_prefix(self, layer_index: int) -> str:
        """On-disk name prefix of decoder layer ``layer_index``'s tensors."""
        return f"{self.layer_prefix}{layer_index}."


__all__ = [
    "ArchError",
    "MoeArch",
    "MoeModules",
    "SIGMOID_BIASED",
    "SIGMOID_GROUPED",
    "SOFTMAX_TOPK",
    "TOPK_SOFTMAX",
]
