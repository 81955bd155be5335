"""What an evaluation records in ``eval/<model>/run.json``: shared settings, seeds, the served
GGUF, the server's flags, lm-eval's reported scores, and the placeholders that keep this
machine's ports and paths out of the artifact (equal evaluations give equal bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeprune.hashing import sha256_file
from moeprune.layout import RunLayout
from moeprune.recipe import Recipe

MODEL_TYPE = "local-chat-completions"


def eval_settings(recipe: Recipe) -> dict[str, Any]:
    """The settings every evaluated model shares (compared across models in results.json)."""
    section = recipe.eval
    return {
        "tasks": list(section.tasks),
        "seed": section.seed,
        "random_seed": seeds_of(recipe)["random_seed"],
        "max_gen_toks": section.max_gen_toks,
        "temperature": section.temperature,
        "num_concurrent": section.num_concurrent,
        "request_timeout_s": section.request_timeout_s,
        "max_retries": section.max_retries,
        "limit": section.limit,
        "apply_chat_template": True,
        "model_type": MODEL_TYPE,
        "include_path": recipe.settings()["eval"]["include_path"],
        "bootstrap_resamples": section.bootstrap_resamples,
        # Batched slots can change greedy outputs slightly: a pair evaluated differently is refused.
        "server_parallel": recipe.serve.parallel,
        "kv_unified": recipe.serve.parallel > 1 and recipe.serve.kv_unified,
    }


def seeds_of(recipe: Recipe) -> dict[str, int]:
    """Every seed lm-eval takes: ``eval.random_seed`` (default ``eval.seed``) for Python's
    ``random`` (gpqa's choice shuffling), ``eval.seed`` for numpy, torch and few-shot sampling."""
    seed = recipe.eval.seed
    return {
        "random_seed": seed if recipe.eval.random_seed is None else recipe.eval.random_seed,
        "numpy_random_seed": seed,
        "torch_random_seed": seed,
        "fewshot_random_seed": seed,
    }


def gguf_file_type(path: Path) -> str | None:
    """``general.file_type`` of a GGUF as llama.cpp's name (e.g. MOSTLY_Q4_K_M), None if unreadable."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.file_type")
        if field is None:
            return None
        value = int(field.contents())
        return gguf.LlamaFileType(value).name
    except Exception:  # provenance nicety: a header we cannot read is recorded as unknown
        return None


def run_relative(path: Path, layout: RunLayout) -> str:
    """``path`` relative to the run directory; its name alone when outside it (no machine's path
    in an artifact)."""
    try:
        return Path(path).resolve().relative_to(layout.root.resolve()).as_posix()
    except ValueError:
        return Path(path).name


def gguf_record(path: Path, quant_type: str, layout: RunLayout) -> dict[str, Any]:
    """Path (relative to the run directory; the file name when outside it), sha256, size and quant type."""
    path = Path(path)
    return {
        "path": run_relative(path, layout),
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
        "quant_type": quant_type,
        "file_type": gguf_file_type(path),
    }


def stable_paths(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` with every substring ``old`` of its strings replaced by ``new``."""
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {key: stable_paths(item, replacements) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [stable_paths(item, replacements) for item in value]
    return value


def stable_flags(flags: list[str], gguf_path: Path) -> list[str]:
    """Server flags as recorded: the port as ``<port>``, the identity nonce as ``<nonce>``, the
    model as its file name, without ``--rpc``: the workers are recorded as the run's topology, so
    the same evaluation on one machine records the same flags."""
    out = list(flags)
    while "--rpc" in out[:-1]:
        index = out.index("--rpc")
        del out[index:index + 2]
    for index, flag in enumerate(out[:-1]):
        if flag == "--port":
            out[index + 1] = "<port>"
        elif flag in ("--alias", "-a"):
            out[index + 1] = "<nonce>"
        elif flag in ("--model", "-m"):
            out[index + 1] = Path(out[index + 1]).name
    return out


def reported_scores(task_results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """lm-eval's ``results[task]`` ({"exact_match,flexible-extract": v, "..._stderr,...": s})
    -> {filter: {metric: {"value", "stderr"}}}; "N/A" stderr -> None."""
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue  # "alias" and friends
        metric, filter_name = key.split(",", 1)
        if metric.endswith("_stderr"):
            entry = scores.setdefault(filter_name, {}).setdefault(metric.removesuffix("_stderr"), {})
            entry["stderr"] = None if value == "N/A" else float(value)
        else:
            scores.setdefault(filter_name, {}).setdefault(metric, {})["value"] = float(value)
    return scores
