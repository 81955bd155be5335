"""The profile stage: phase 1 (generate), phase 2 (replay), statistics, findings, summary."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from moeprune.arch import context_length, inspect, text_config_object
from moeprune.atomic import write_json
from moeprune.base_model import resolve_base
from moeprune.errors import MoepruneError
from moeprune.hashing import sha256_file, sha256_json
from moeprune.layout import RunLayout
from moeprune.profile import findings as findings_mod
from moeprune.profile.generate import (
    SequenceError,
    generate_sequences,
    load_calibration,
    read_sequences,
    sequence_key,
    template_supports_thinking,
    write_sequences,
)
from moeprune.profile.llama_generate import run_llama_server_generation
from moeprune.profile.parallel import (
    STAGING_ENV,
    Collectives,
    World,
    current_world,
    distributed,
    launch,
    rank_device_map,
    reduce_replay,
    staging_dir,
)
from moeprune.profile.loading import (
    load_config,
    load_model,
    load_tokenizer,
    model_sha256,
    tokenizer_sha256,
)
from moeprune.progress import phase as phase_progress
from moeprune.profile.replay import ReplayResult, replay_sequences
from moeprune.profile.streamed import StreamInfo, replay_streamed
from moeprune.profile.stats import ProfileStats, build_stats, max_activation_norm, save_stats
from moeprune.recipe import Recipe
from moeprune.schemas import validate

PROFILE_FORMAT_VERSION = 1


def _warn(warnings: list[str], message: str) -> None:
    """Record a warning for profile.json and show it now (once: on rank 0 of a data-parallel profile)."""
    warnings.append(message)
    if current_world().is_root:
        print(f"warning: {message}", file=sys.stderr)


def layer_summaries(stats: ProfileStats, share_k: int, coverage_fraction: float, top_k: int | None) -> list[dict[str, Any]]:
    """Per MoE layer: total contribution, concentration figures, unused experts."""
    contrib = stats.totals["contribution_sum"]
    counts = stats.totals["routed_count"]
    share = findings_mod.top_k_share(contrib, share_k)
    top1 = findings_mod.top_k_share(contrib, 1)
    needed = findings_mod.experts_to_reach(contrib, coverage_fraction)
    gini = findings_mod.gini(contrib)
    bottom_half = findings_mod.bottom_n_share(contrib, contrib.shape[1] // 2)
    entries = []
    for position, layer in enumerate(stats.layers):
        routed_pairs = int(counts[position].sum())
        entries.append(
            {
                "layer": int(layer),
                "contribution_total": float(contrib[position].sum()),
                "routed_pairs": routed_pairs,
                "tokens": routed_pairs // top_k if top_k else None,
                "top_expert": int(np.argmax(contrib[position])),
                "top1_share": float(top1[position]),
                "top_k_share": float(share[position]),
                "experts_to_coverage": int(needed[position]),
                "gini": float(gini[position]),
                "bottom_half_share": float(bottom_half[position]),
                "unrouted_experts": int((counts[position] == 0).sum()),
            }
        )
    return entries


def _of_share(world: World) -> str:
    """What a progress bar counts under data parallelism: rank 0's share (it alone shows bars)."""
    return f" (rank 0's share of {world.size})" if world.size > 1 else ""


def _total(units: int, world: World) -> int | None:
    """A bar's total: all units for one process; unknown for rank 0's share (the split is by batch)."""
    return units if world.size == 1 else None


def _phase1(
    recipe: Recipe,
    layout: RunLayout,
    get_model: Callable[[], Any],
    model_dir: Path,
    model_hash: str,
    warnings: list[str],
    progress: bool,
    context_tokens: int | None,
    comm: Collectives,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Phase 1: reuse every stored sequence whose key still matches, generate the others.

    Under data parallelism each rank generates its share of the generation batches (llama-server
    generation, one server, runs on rank 0 alone); every rank gets every record, rank 0 writes
    the sequences file."""
    world = comm.world
    calibration = recipe.calibration
    prompts = load_calibration(recipe.prompts_path, calibration.domains, calibration.prompts_per_domain)
    tokenizer_hash = tokenizer_sha256(model_dir)
    settings = {
        "max_new_tokens": calibration.max_new_tokens,
        "enable_thinking": calibration.enable_thinking,
        "dtype": recipe.model.dtype,
        "greedy": True,
    }
    generator: dict[str, Any] = {"name": "transformers", "model_sha256": model_hash, "dtype": recipe.model.dtype}
    if recipe.profile.generate == "llama-server":
        gguf = recipe.generate_gguf_path
        if gguf is None or not gguf.is_file():
            raise MoepruneError(
                f"profile.generate_gguf = {recipe.profile.generate_gguf!r}: GGUF not found ({gguf}); convert the "
                "base model (invoke convert --which base) and name that file"
            )
        generator = {
            "name": "llama-server",
            "gguf": gguf.name,
            "gguf_sha256": sha256_file(gguf),
            "n_gpu_layers": recipe.profile.generate_n_gpu_layers,
        }
        # A different generator gives different sequences: it is part of every sequence's key.
        settings = {**settings, "generator": {k: v for k, v in generator.items() if k != "gguf"}}
    keys = {
        p.id: sequence_key(model_sha256=model_hash, tokenizer_sha256=tokenizer_hash, prompt=p, settings=settings)
        for p in prompts
    }
    existing: dict[str, dict[str, Any]] = {}
    if layout.sequences_path.is_file():
        try:
            existing = {r["id"]: r for r in read_sequences(layout.sequences_path)}
        except SequenceError as exc:
            _warn(warnings, f"ignoring unreadable previous sequences, regenerating all ({exc})")
    reused = {p.id: existing[p.id] for p in prompts if p.id in existing and existing[p.id].get("input_key") == keys[p.id]}
    missing = [p for p in prompts if p.id not in reused]

    thinking_supported: bool | None = None
    generated: dict[str, dict[str, Any]] = {}
    served_on: dict[str, Any] | None = None  # where llama-server generated (None: it did not run here)
    if missing:
        tokenizer = load_tokenizer(model_dir)
        thinking_supported = template_supports_thinking(tokenizer)
        if calibration.enable_thinking and not thinking_supported:
            _warn(warnings, "the chat template has no 'enable_thinking' switch: prompts were rendered without thinking")
        with phase_progress(f"phase 1: generate ({generator['name']}){_of_share(world)}", _total(len(missing), world),
                            progress) as advance:
            if generator["name"] == "llama-server":
                records, served_on = run_llama_server_generation(
                    recipe, layout, model_dir, tokenizer, missing,
                    keys=keys, context_tokens=context_tokens, on_batch=advance,
                ) if world.is_root else ([], None)
            else:
                records = generate_sequences(
                    get_model(),
                    tokenizer,
                    missing,
                    max_new_tokens=calibration.max_new_tokens,
                    enable_thinking=calibration.enable_thinking,
                    batch_size=calibration.batch_size,
                    keys=keys,
                    context_tokens=context_tokens,
                    prompts_path=recipe.prompts_path,
                    on_batch=advance,
                    share=world.share,
                )
        records = [record for part in comm.all_gather(records) for record in part]
        # The phase-1 file says, line by line, what produced each sequence.
        generated = {r["id"]: {**r, "generator": generator} for r in records}
        odd = [r["id"] for r in records if r.get("canonical") is False]
        if odd:
            _warn(
                warnings,
                f"{len(odd)} generated sequence(s) ({', '.join(odd[:5])}{', ...' if len(odd) > 5 else ''}) are not "
                "the HF tokenizer's own tokenization of their text (the model generated them so); phase 2 "
                "replays the generated ids",
            )
    sequences = [reused.get(p.id) or generated[p.id] for p in prompts]
    if world.is_root:
        write_sequences(layout.sequences_path, sequences)
    info = {
        "generated": len(missing),
        "reused": len(reused),
        "settings": settings,
        "thinking_supported": thinking_supported,
        "generator": generator,
        "tokenizer_sha256": tokenizer_hash,
        # The serve.rpc workers of the sequences generated now, like results.json's topology.
        **({"topology": served_on} if served_on is not None else {}),
    }
    return sequences, info


def profile_summary(
    *,
    recipe: Recipe,
    stats: ProfileStats,
    replay: ReplayResult,
    sequences: list[dict[str, Any]],
    hashes: dict[str, str],
    model_files: list[str],
    phase1: dict[str, Any],
    moe: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """The JSON summary (schemas/profile.schema.json) of one profiling run."""
    settings = recipe.profile
    recorded = recipe.settings()  # paths as artifacts record them (never absolute)
    per_domain_contrib = {d: stats.per_domain[d]["contribution_sum"] for d in stats.domains}
    found = findings_mod.compute_findings(
        stats.totals["contribution_sum"],
        stats.layers,
        per_domain_contrib,
        overlap_k=settings.top_overlap_k,
        share_k=settings.top_share_k,
        coverage_fraction=settings.coverage_fraction,
    )
    prompt_tokens = sum(r["prompt_len"] for r in sequences)
    total_tokens = sum(len(r["input_ids"]) for r in sequences)
    return {
        "format_version": PROFILE_FORMAT_VERSION,
        "recipe": recipe.name,
        "model": {
            "base": recorded["model"]["base"],
            "revision": recipe.model.revision,
            "dtype": recipe.model.dtype,
            "device_map": settings.device_map,
            "hashed_files": model_files,
        },
        "hashes": hashes,
        "settings": {
            "calibration": recorded["calibration"],
            "profile": recorded["profile"],
        },
        "moe": moe,
        "num_sequences": len(sequences),
        "num_tokens": stats.num_tokens,
        "num_prompt_tokens": prompt_tokens,
        "num_response_tokens": total_tokens - prompt_tokens,
        "domains": {
            domain: {
                "num_sequences": sum(1 for r in sequences if r["domain"] == domain),
                "num_tokens": stats.domain_num_tokens.get(domain, 0),
            }
            for domain in stats.domains
        },
        # Timings stay out of profile.json (equal inputs give equal bytes); they go to the log.
        "phase1": phase1,
        # What stats.safetensors holds (overall and under domain/<d>/), each float64 but routed_count.
        "statistics": sorted(stats.totals),
        "layers": layer_summaries(stats, settings.top_share_k, settings.coverage_fraction, moe.get("top_k")),
        "findings": found,
        # Per MoE layer (the order of moe.layers) and expert: the super-experts statistic.
        "max_activation_norm": max_activation_norm(replay.max_activation_norm).tolist(),
        "warnings": warnings,
    }


def run_profile(recipe: Recipe, layout: RunLayout, progress: bool = True) -> dict[str, Any]:
    """Run both profiling phases for ``recipe``; write sequences, statistics and summary under ``layout``.

    Returns the summary written to ``layout.profile_summary_path``. Started by torchrun, this
    process is one rank of a data-parallel profile (:mod:`moeprune.profile.parallel`); a single
    process whose recipe asks for ``profile.data_parallel = N > 1`` starts N loopback ranks of
    ``invoke profile`` and waits for them.
    """
    world = current_world()
    if world.size == 1 and recipe.profile.data_parallel > 1:
        return _launch_ranks(recipe, layout, progress)
    with distributed(world) as (comm, backend):
        return _run_profile(recipe, layout, progress and world.is_root, comm, backend)


def _launch_ranks(recipe: Recipe, layout: RunLayout, progress: bool) -> dict[str, Any]:
    """``invoke profile`` on ``profile.data_parallel`` loopback ranks, under this writer's lock."""
    from moeprune.runlock import child_env

    if recipe.source_path is None:
        raise MoepruneError("profile.data_parallel: the recipe has no file the ranks could read; save it first")
    argv = ["profile", "--recipe", str(recipe.source_path.resolve()), "--runner", "native"]
    layout.profile_dir.mkdir(parents=True, exist_ok=True)
    staging = layout.profile_dir / f".tmp-ranks-{os.getpid()}"
    staging.mkdir()
    env = {"MOEPRUNE_RUNS_DIR": str(layout.root.parent.resolve()), STAGING_ENV: str(staging.resolve()), **child_env()}
    try:
        launch(recipe.profile.data_parallel, argv if progress else [*argv, "--no-progress"], Path.cwd(), env)
        # Every rank ended well: the statistics, then the summary (the stage's mark of completion).
        for final in _outputs(layout):
            os.replace(staging / final.name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return json.loads(layout.profile_summary_path.read_text(encoding="utf-8"))


def _outputs(layout: RunLayout) -> tuple[Path, Path]:
    """The statistics and the summary, in the order they are written and committed."""
    return layout.profile_stats_path, layout.profile_summary_path


def _output_paths(layout: RunLayout) -> tuple[Path, Path]:
    """Where rank 0 writes the statistics and the summary: in place, or the launcher's staging."""
    staging = staging_dir()
    if staging is None:
        return _outputs(layout)
    return tuple(staging / path.name for path in _outputs(layout))  # type: ignore[return-value]


def _run_profile(
    recipe: Recipe, layout: RunLayout, progress: bool, comm: Collectives, backend: str | None
) -> dict[str, Any]:
    world: World = comm.world
    device_map = rank_device_map(recipe.profile.device_map, world)
    warnings: list[str] = []
    model_dir = resolve_base(recipe).local_dir
    model_hash, model_files = model_sha256(model_dir)
    loaded: dict[str, Any] = {}

    def whole_model() -> Any:
        """The whole model, loaded on first use (streamed replay with reused sequences never loads it)."""
        if "model" not in loaded:
            loaded["model"] = load_model(model_dir, recipe.model.dtype, device_map)
        return loaded["model"]

    config = load_config(model_dir)
    if world.is_root:
        layout.profile_dir.mkdir(parents=True, exist_ok=True)

    sequences, phase1 = _phase1(
        recipe, layout, whole_model, model_dir, model_hash, warnings, progress, context_length(config), comm
    )

    total_tokens = sum(len(r["input_ids"]) for r in sequences)
    if recipe.profile.replay == "streamed":
        loaded.clear()  # phase 1's whole model (if any) goes before the layers come one by one
        info = StreamInfo()
        num_layers = inspect(model_dir).required_int("num_hidden_layers")
        with phase_progress(f"phase 2: streamed replay (layer x tokens){_of_share(world)}",
                            _total(total_tokens * num_layers, world), progress) as advance:
            replay = replay_streamed(
                model_dir,
                sequences,
                recipe.calibration.domains,
                dtype=recipe.model.dtype,
                device_map=device_map,
                batch_size=recipe.calibration.batch_size,
                context_tokens=context_length(config),
                source=layout.sequences_path,
                on_tokens=advance,
                stream_info=info,
                world=world,
            )
        model = info.model  # the meta-device model: config and module structure, no weights
        config = model.config
    else:
        model = whole_model()
        config = model.config
        with phase_progress(f"phase 2: replay (tokens){_of_share(world)}", _total(total_tokens, world),
                            progress) as advance:
            replay = replay_sequences(
                model,
                sequences,
                recipe.calibration.domains,
                batch_size=recipe.calibration.batch_size,
                context_tokens=context_length(model),
                source=layout.sequences_path,
                on_tokens=advance,
                world=world,
            )
    # The recorder holds the model's modules: only the arrays travel to rank 0.
    parts = comm.gather_to_root(dataclasses.replace(replay, recorder=None))
    if parts is None:  # not rank 0: rank 0 writes; wait for its summary (or its failure)
        return comm.from_root(None)
    replay = reduce_replay(parts)
    summary = _write_outputs(recipe, layout, replay, sequences, phase1, warnings, model, config,
                             model_hash, model_files, world.record(backend))
    return comm.from_root(summary)


def _write_outputs(
    recipe: Recipe,
    layout: RunLayout,
    replay: ReplayResult,
    sequences: list[dict[str, Any]],
    phase1: dict[str, Any],
    warnings: list[str],
    model: Any,
    config: Any,
    model_hash: str,
    model_files: list[str],
    parallel: dict[str, Any],
) -> dict[str, Any]:
    """Rank 0 (or the single process): statistics, then the summary, each written atomically."""
    stats = build_stats(
        layers=replay.layers,
        domains=replay.domains,
        contribution_sum=replay.contribution_sum,
        routed_count=replay.routed_count,
        router_prob_sum=replay.router_prob_sum,
        sequence_norm_sum=replay.sequence_norm_sum,
        domain_num_tokens=replay.domain_num_tokens,
        model_sha256=model_hash,
    )
    if not all(np.all(np.isfinite(stats.totals[name])) for name in ("contribution_sum", "sequence_norm_sum")):
        raise MoepruneError(
            f"{layout.profile_stats_path}: non-finite expert contributions (the model produced inf/NaN); "
            "load it in float32 (model.dtype) and check the checkpoint"
        )
    stats_path, summary_path = _output_paths(layout)
    save_stats(stats, stats_path)

    from moeprune.arch import arch_for_model

    text_config = text_config_object(config)
    moe = {
        "layers": stats.layers,
        "num_experts": stats.num_experts,
        "top_k": arch_for_model(model).model_top_k(model),
        "experts_implementation": getattr(text_config, "_experts_implementation", None),
    }
    recorded = recipe.settings()
    hashes = {
        "model_sha256": model_hash,
        "tokenizer_sha256": phase1.pop("tokenizer_sha256"),
        "prompts_sha256": sha256_file(recipe.prompts_path),
        "sequences_sha256": sha256_file(layout.sequences_path),
        "stats_sha256": sha256_file(stats_path),
        "settings_sha256": sha256_json(
            {"calibration": recorded["calibration"], "profile": recorded["profile"]}
        ),
    }
    summary = profile_summary(
        recipe=recipe,
        stats=stats,
        replay=replay,
        sequences=sequences,
        hashes=hashes,
        model_files=model_files,
        phase1=phase1,
        moe=moe,
        warnings=warnings,
    )
    # The world that produced the statistics: provenance, not part of the stage's cache key.
    summary["parallel"] = parallel
    validate("profile", summary, source=layout.profile_summary_path)
    write_json(summary_path, summary)
    return summary
