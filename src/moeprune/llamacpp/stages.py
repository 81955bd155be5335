"""The llama.cpp stages of a run: build, convert, quantize, serve.

Every file name in ``runs/<name>/gguf/`` comes from :class:`moeprune.layout.RunLayout`
(``gguf_path``, ``imatrix_path``); the manifest asks the layout which of them are the base's.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moeprune.errors import MoepruneError
from moeprune.layout import Model, RunLayout
from moeprune.llamacpp.build import LlamaCppBuild, ensure_llamacpp
from moeprune.llamacpp.convert import convert_to_gguf
from moeprune.llamacpp.quantize import calibration_text, compute_imatrix, quantize_gguf
from moeprune.llamacpp.server import LlamaServer
from moeprune.recipe import Recipe

Which = Model


def gguf_path(recipe: Recipe, which: Which, gguf_type: str, layout: RunLayout | None = None) -> Path:
    """Where the ``which`` model's GGUF of ``gguf_type`` (e.g. "Q4_K_M", "bf16") lives."""
    return (layout or RunLayout.for_recipe(recipe.name)).gguf_path(which, gguf_type)


def _hf_dir(recipe: Recipe, which: Which, layout: RunLayout) -> Path:
    if which != "base":
        from moeprune.recalibrate import run_checkpoint

        return run_checkpoint(recipe, layout, which)
    from moeprune.base_model import resolve_base

    return resolve_base(recipe).local_dir


def build_stage(recipe: Recipe, say: Callable[[str], None] = print,
                jobs: int | None = None) -> tuple[LlamaCppBuild, float]:
    """Ensure the pinned llama.cpp build (``jobs`` compile jobs if it builds); return it and the
    seconds this call took."""
    started = time.monotonic()
    build = ensure_llamacpp(recipe.llamacpp, jobs=jobs, say=say)
    return build, time.monotonic() - started


def convert_stage(
    recipe: Recipe,
    which: Which = "pruned",
    hf_dir: Path | None = None,
    out_path: Path | None = None,
    *,
    layout: RunLayout | None = None,
    build: LlamaCppBuild | None = None,
) -> dict[str, Any]:
    """Convert the pruned (or base) checkpoint to GGUF with the recipe's outtype."""
    layout = layout or RunLayout.for_recipe(recipe.name)
    hf_dir = hf_dir or _hf_dir(recipe, which, layout)
    if not (hf_dir / "config.json").is_file():
        hint = "check model.base" if which == "base" else "run `invoke prune` first"
        raise MoepruneError(f"{hf_dir}: no Hugging Face checkpoint there (config.json missing); {hint}")
    outtype = recipe.quantize.convert_outtype
    out_path = out_path or gguf_path(recipe, which, outtype, layout)
    build = build or ensure_llamacpp(recipe.llamacpp)
    return convert_to_gguf(
        build, hf_dir, out_path, outtype,
        model_name=None if which == "base" else recipe.model.name,
        log_path=layout.log_path(f"convert-{out_path.stem}"),
    )


def mmproj_stage(recipe: Recipe, hf_dir: Path, *, layout: RunLayout | None = None,
                 build: LlamaCppBuild | None = None) -> dict[str, Any] | None:
    """Convert the base's vision projector at quantize.convert_outtype (the record), or None when
    the base has no vision tower (then nothing is written)."""
    from moeprune.llamacpp.mmproj import convert_mmproj, has_vision_tower

    if not has_vision_tower(hf_dir):
        return None
    layout = layout or RunLayout.for_recipe(recipe.name)
    out_path = layout.mmproj_path(recipe.quantize.convert_outtype)
    return convert_mmproj(build or ensure_llamacpp(recipe.llamacpp), hf_dir, out_path, recipe.quantize.convert_outtype,
                          log_path=layout.log_path(f"convert-{out_path.stem}"))


def quantize_stage(
    recipe: Recipe,
    which: Which = "pruned",
    *,
    layout: RunLayout | None = None,
    build: LlamaCppBuild | None = None,
) -> list[dict[str, Any]]:
    """Quantize the converted GGUF to every type in quantize.types (with an imatrix if asked)."""
    layout = layout or RunLayout.for_recipe(recipe.name)
    source = gguf_path(recipe, which, recipe.quantize.convert_outtype, layout)
    if not source.is_file():
        raise MoepruneError(f"{source}: converted GGUF not found; run `invoke convert` first")
    build = build or ensure_llamacpp(recipe.llamacpp)
    imatrix = None
    if recipe.quantize.imatrix:
        text = calibration_text(recipe.prompts_path, layout.imatrix_calibration_path)
        imatrix = layout.imatrix_path(which, recipe.quantize.convert_outtype)
        compute_imatrix(
            build, source, text, imatrix, threads=recipe.serve.threads,
            log_path=layout.log_path(f"imatrix-{source.stem}"),
        )
    records = []
    for qtype in recipe.quantize.types:
        out_path = gguf_path(recipe, which, qtype, layout)
        records.append(
            quantize_gguf(
                build, source, out_path, qtype, imatrix=imatrix, threads=recipe.serve.threads,
                log_path=layout.log_path(f"quantize-{out_path.stem}"),
            )
        )
    return records


def mmproj_flags(recipe: Recipe, layout: RunLayout) -> list[str]:
    """``--mmproj FILE`` when the run has a vision projector (then the served model takes images)."""
    projector = layout.mmproj_path(recipe.quantize.convert_outtype)
    return ["--mmproj", str(projector)] if projector.is_file() else []


def serve_stage(
    recipe: Recipe,
    which: Which = "pruned",
    gguf_type: str | None = None,
    port: int | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve a GGUF in the foreground until Ctrl-C (or SIGTERM); the server is always stopped."""
    layout = RunLayout.for_recipe(recipe.name)
    path = gguf_path(recipe, which, gguf_type or recipe.quantize.eval_type, layout)
    build = ensure_llamacpp(recipe.llamacpp)
    log_path = layout.log_path(f"serve-{path.stem}")
    # SIGTERM and SIGINT -> KeyboardInterrupt, so `with` cleans up the same way as for Ctrl-C
    # (SIGINT too: a shell starts background jobs with SIGINT ignored).
    previous = {sig: signal.signal(sig, signal.default_int_handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with LlamaServer(build, path, recipe.serve, log_path, port=port, extra_flags=mmproj_flags(recipe, layout)) as server:
            say(f"llama-server ready: {server.base_url}/v1 (OpenAI API), web UI off; log: {log_path}")
            say(f"flags: {' '.join(server.flags)}")
            say("Ctrl-C stops it.")
            while True:
                server.check_alive()
                time.sleep(1.0)
    except KeyboardInterrupt:
        say("stopped.")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
