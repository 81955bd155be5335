"""Memory plan of the profile stage: each phase's peak memory on the chosen device, before running.

:func:`plan_memory` is pure: it takes what the checkpoint headers and config say about the model
(:class:`ModelFacts`), the sequence lengths and the recipe's settings, and the memory the device
has, and returns one estimate per phase. :func:`plan_for_recipe` gathers those inputs for a
recipe (headers only, no tensor is read) and is what ``invoke check`` runs.

The estimates, in bytes (``w`` = bytes per weight in ``model.dtype``):

- weights: every checkpoint tensor at ``w`` (whole model: vision / audio towers included, as
  ``from_pretrained`` loads them); streamed replay holds the larger of the shell (embeddings,
  final norm) and the largest decoder layer;
- KV cache of transformers generation: ``batch x (prompt + new) x layers x 2 x kv_heads x head_dim x w``;
- working memory of one forward over ``batch x width`` tokens: float32 hidden-sized temporaries
  (x8), the dense MLP and routed-expert intermediates, and eager attention scores
  ``batch x heads x width^2`` in float32 (sdpa on CPU falls back to them);
- streamed replay keeps every batch's hidden states (``tokens x hidden x w``) and the captured layer
  inputs (a boolean mask ``width^2`` per batch row and attention type, rotary tables);
- llama-server: the GGUF (memory-mapped; the ``n_gpu_layers`` share goes to the GPU) plus an f16
  KV cache of the context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError

GIB = 1024**3
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FIXED_OVERHEAD_BYTES = 600 * 1024**2  # Python, torch and transformers themselves


class MemoryPlanError(MoepruneError):
    """The recipe's profile plan does not fit the device."""


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about a model (from its config and safetensors headers)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    top_k: int
    vocab_size: int
    layer_bytes: tuple[int, ...]  # per decoder layer, at the load dtype
    shell_bytes: int  # embeddings, norms, per-layer-input tables: what a text forward needs besides the layers
    unused_bytes: int  # vision / audio towers, untied LM head


@dataclass(frozen=True)
class PhaseEstimate:
    name: str
    device: str
    peak_bytes: int
    budget_bytes: int
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def line(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (
            f"{self.name} on {self.device}: {self.peak_bytes / GIB:.2f} GiB of {self.budget_bytes / GIB:.2f} GiB "
            f"({verdict}; GiB: {parts})"
        )


@dataclass(frozen=True)
class MemoryPlan:
    phases: tuple[PhaseEstimate, ...]
    replay: str
    streamed_alternative: PhaseEstimate | None = None

    @property
    def ok(self) -> bool:
        return all(p.fits for p in self.phases)

    def lines(self) -> list[str]:
        return [phase.line() for phase in self.phases]

    def failure(self) -> str | None:
        """The refusal message (None when every phase fits)."""
        bad = [p for p in self.phases if not p.fits]
        if not bad:
            return None
        message = "memory plan: " + "; ".join(p.line() for p in bad)
        hints = []
        if self.replay == "whole" and any(p.name.startswith("phase 2") for p in bad):
            alt = self.streamed_alternative
            if alt is not None:
                hints.append(
                    f'set profile.replay = "streamed" (one layer at a time: {alt.peak_bytes / GIB:.2f} GiB, '
                    f"{'fits' if alt.fits else 'does not fit either'})"
                )
        if any(p.name.startswith("phase 1 (transformers") for p in bad):
            hints.append('set profile.generate = "llama-server" with a GGUF of the base model (partial GPU offload)')
        if any(p.name.startswith("phase 1 (llama-server") for p in bad):
            hints.append("lower profile.generate_n_gpu_layers or use a smaller GGUF type")
        if hints:
            message += "; " + "; ".join(hints)
        return message


def _working_bytes(facts: ModelFacts, batch: int, width: int, dtype_bytes: int) -> int:
    tokens = batch * width
    hidden_temps = tokens * facts.hidden_size * 4 * 8
    mlp = tokens * facts.intermediate_size * 3 * max(dtype_bytes, 4)
    experts = tokens * facts.top_k * facts.moe_intermediate_size * 3 * max(dtype_bytes, 4)
    scores = batch * facts.num_attention_heads * width * width * 4
    return hidden_temps + mlp + experts + scores


def plan_memory(
    facts: ModelFacts,
    *,
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    dtype: str,
    replay: str,
    generate: str,
    device: str,
    budget_bytes: int,
    gguf_bytes: int | None = None,
    n_gpu_layers: int = 0,
    host_budget_bytes: int | None = None,
    generate_needed: bool = True,
) -> MemoryPlan:
    """One estimate per profile phase (see the module docstring for the model of each)."""
    w = _DTYPE_BYTES[dtype]
    lengths = sorted(length + max_new_tokens for length in prompt_lengths) or [max_new_tokens]
    batches = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    widest = max(batches, key=lambda b: len(b) * max(b) ** 2)
    batch, width = len(widest), max(widest)
    whole_weights = sum(facts.layer_bytes) + facts.shell_bytes + facts.unused_bytes
    phases = []

    if generate_needed and generate == "transformers":
        kv = batch * width * facts.num_layers * 2 * facts.num_key_value_heads * facts.head_dim * w
        parts = {"weights": whole_weights, "kv_cache": kv, "working": _working_bytes(facts, batch, width, w),
                 "runtime": _FIXED_OVERHEAD_BYTES}
        phases.append(PhaseEstimate("phase 1 (transformers generate)", device, sum(parts.values()), budget_bytes, parts))
    elif generate_needed and generate == "llama-server":
        context = max(lengths) + 1
        kv = context * facts.num_layers * 2 * facts.num_key_value_heads * facts.head_dim * 2
        model = gguf_bytes or 0
        share = min(max(n_gpu_layers, 0), facts.num_layers) / facts.num_layers if device != "cpu" else 0.0
        on_device = int(model * share) + (kv if share else 0)
        on_host = model - int(model * share) + (0 if share else kv) + _FIXED_OVERHEAD_BYTES
        if device != "cpu":
            phases.append(PhaseEstimate("phase 1 (llama-server, GPU part)", device, on_device, budget_bytes,
                                        {"gguf_offloaded": int(model * share), "kv_cache": kv if share else 0}))
        host = host_budget_bytes if host_budget_bytes is not None else budget_bytes
        phases.append(PhaseEstimate("phase 1 (llama-server, host part)", "cpu", on_host, host,
                                    {"gguf_mapped": model - int(model * share), "kv_cache": 0 if share else kv,
                                     "runtime": _FIXED_OVERHEAD_BYTES}))

    whole_parts = {"weights": whole_weights, "working": _working_bytes(facts, batch, width, w),
                   "runtime": _FIXED_OVERHEAD_BYTES}
    whole = PhaseEstimate("phase 2 (whole-model replay)", device, sum(whole_parts.values()), budget_bytes, whole_parts)
    hidden = sum(len(b) * max(b) for b in batches) * facts.hidden_size * w
    captured = sum(len(b) * max(b) ** 2 * 2 + len(b) * max(b) * facts.head_dim * 2 * 4 * 2 for b in batches)
    streamed_parts = {
        "one_layer_or_shell": max(max(facts.layer_bytes, default=0), facts.shell_bytes),
        "hidden_states": hidden,
        "layer_inputs": captured,
        "working": _working_bytes(facts, batch, width, w),
        "runtime": _FIXED_OVERHEAD_BYTES,
    }
    streamed = PhaseEstimate("phase 2 (streamed replay)", device, sum(streamed_parts.values()), budget_bytes,
                             streamed_parts)
    phases.append(streamed if replay == "streamed" else whole)
    return MemoryPlan(phases=tuple(phases), replay=replay, streamed_alternative=streamed)


# --- gathering the inputs -----------------------------------------------------------------------


def model_facts(model_dir: Path, dtype: str) -> ModelFacts:
    """Facts from the model's :class:`~moeprune.arch.ModelSpec`: its config and safetensors
    headers (no tensor data read)."""
    from moeprune.arch import ArchError, inspect

    spec = inspect(model_dir)
    try:
        sizes = spec.load_sizes()
    except ArchError as exc:
        raise MemoryPlanError(str(exc)) from None
    w = _DTYPE_BYTES[dtype]
    heads = spec.text_int("num_attention_heads") or 1
    hidden = spec.required_int("hidden_size")
    return ModelFacts(
        num_layers=len(sizes.layers),
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=spec.text_int("num_key_value_heads") or heads,
        head_dim=max(spec.text_int("head_dim") or hidden // heads, spec.text_int("global_head_dim") or 0),
        intermediate_size=spec.text_int("intermediate_size") or 0,
        moe_intermediate_size=spec.text_int("moe_intermediate_size") or spec.text_int("intermediate_size") or 0,
        top_k=spec.top_k or 0,
        vocab_size=spec.text_int("vocab_size") or 0,
        layer_bytes=tuple(layer.bytes_at(w) for layer in sizes.layers),
        shell_bytes=sizes.shell.bytes_at(w),
        unused_bytes=sizes.unused.bytes_at(w),
    )


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise MemoryPlanError("/proc/meminfo has no MemAvailable")


def chosen_device(device_map: str) -> str:
    """'cpu' or 'cuda:N': where the profile's phases run for this device_map."""
    if device_map == "cpu":
        return "cpu"
    if device_map.startswith("cuda"):
        return device_map if ":" in device_map else "cuda:0"
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def device_budget_bytes(device: str) -> int:
    if device == "cpu":
        return available_ram_bytes()
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def _prompt_lengths(recipe: Any, model_dir: Path) -> list[int]:
    """Token counts of the rendered calibration prompts (the phase-1 file's when it exists)."""
    from moeprune.layout import RunLayout
    from moeprune.profile.generate import load_calibration, read_sequences, render_prompt_ids
    from moeprune.profile.loading import load_tokenizer

    sequences = RunLayout.for_recipe(recipe.name).sequences_path
    if sequences.is_file():
        try:
            return [r["prompt_len"] for r in read_sequences(sequences)]
        except MoepruneError:
            pass
    calibration = recipe.calibration
    prompts = load_calibration(recipe.prompts_path, calibration.domains, calibration.prompts_per_domain)
    tokenizer = load_tokenizer(model_dir)
    return [len(render_prompt_ids(tokenizer, p.prompt, calibration.enable_thinking)) for p in prompts]


def plan_for_recipe(recipe: Any) -> MemoryPlan | None:
    """The memory plan of ``recipe``'s profile stage, or None when the base model is not on disk."""
    model_dir = recipe.base_dir
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    profile = recipe.profile
    device = chosen_device(profile.device_map)
    budget = profile.memory_limit_bytes or device_budget_bytes(device)
    gguf = recipe.generate_gguf_path
    return plan_memory(
        model_facts(model_dir, recipe.model.dtype),
        prompt_lengths=_prompt_lengths(recipe, model_dir),
        max_new_tokens=recipe.calibration.max_new_tokens,
        batch_size=recipe.calibration.batch_size,
        dtype=recipe.model.dtype,
        replay=profile.replay,
        generate=profile.generate,
        device=device,
        budget_bytes=budget,
        gguf_bytes=gguf.stat().st_size if gguf is not None and gguf.is_file() else None,
        n_gpu_layers=profile.generate_n_gpu_layers,
        host_budget_bytes=profile.memory_limit_bytes or available_ram_bytes(),
    )


def check_memory_plan(recipe: Any) -> list[str]:
    """The plan's lines for ``invoke check``; raises MemoryPlanError when a phase cannot fit."""
    plan = plan_for_recipe(recipe)
    if plan is None:
        return ["memory plan: skipped (the base model is not on disk yet)"]
    failure = plan.failure()
    if failure is not None:
        raise MemoryPlanError(f"{recipe.source_path}: {failure}")
    return ["memory plan: " + line for line in plan.lines()]
