"""The seed's artifact layout, and the audit checks (a)-(c) on it.

The seed (``Gemma 4 A4B 109-Expert``) publishes, beside ``config.json`` and the safetensors
shards:

- ``expert_drop_metadata.json``: ``base_model``, ``method``, ``original_experts``,
  ``target_experts``, ``per_layer_keep`` / ``per_layer_drop`` keyed by the layer number as a
  string;
- ``gpqa_results/`` as lm-eval writes it: ``results_<date>.json`` (possibly under a folder named
  after the model) and ``samples_<task>_<date>.jsonl``;
- ``README.md``: the card (claims are read by :mod:`moeprune.audit.claims`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.audit.report import AuditReport
from moeprune.errors import MoepruneError

SEED_DROP_METADATA = "expert_drop_metadata.json"
SEED_RESULTS_DIR = "gpqa_results"


class AuditError(MoepruneError):
    """An artifact the audit cannot read at all (neither layout, unreadable files)."""


@dataclass
class SeedDropMap:
    """``expert_drop_metadata.json`` of the seed, as read (nothing inferred)."""

    path: Path
    raw: dict[str, Any]
    base_model: Any
    method: Any
    original_experts: Any
    target_experts: Any
    keep: dict[int, list[int]]
    drop: dict[int, list[int]]
    problems: list[str] = field(default_factory=list)


def is_seed_layout(root: Path) -> bool:
    drop_map = root / SEED_DROP_METADATA
    if not drop_map.is_file() or (root / "manifest.json").is_file():
        return False
    try:
        data = json.loads(drop_map.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # reported as unreadable by the checks
    return isinstance(data, dict) and ("per_layer_keep" in data or "per_layer_drop" in data)


def read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise AuditError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise AuditError(f"{path}: expected a JSON object")
    return data


def _layer_lists(value: Any, field_name: str, path: Path, problems: list[str]) -> dict[int, list[int]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{path.name}: {field_name} must be an object keyed by layer number")
        return {}
    out: dict[int, list[int]] = {}
    for key, indices in value.items():
        if not str(key).isdigit():
            problems.append(f"{path.name}: {field_name} key {key!r} is not a layer number")
            continue
        if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            problems.append(f"{path.name}: {field_name}[{key!r}] must be a list of expert indices")
            continue
        out[int(key)] = list(indices)
    return dict(sorted(out.items()))


def read_seed_drop_map(root: Path) -> SeedDropMap:
    path = root / SEED_DROP_METADATA
    raw = read_json_object(path)
    problems: list[str] = []
    keep = _layer_lists(raw.get("per_layer_keep"), "per_layer_keep", path, problems)
    drop = _layer_lists(raw.get("per_layer_drop"), "per_layer_drop", path, problems)
    for name in ("original_experts", "target_experts"):
        value = raw.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(f"{path.name}: {name} = {value!r} is not a positive integer")
    original = raw.get("original_experts")
    if isinstance(original, int) and not isinstance(original, bool) and original >= 1:
        problems += out_of_range(keep, drop, original, f"original_experts = {original}", path.name)
    return SeedDropMap(path, raw, raw.get("base_model"), raw.get("method"), raw.get("original_experts"),
                       raw.get("target_experts"), keep, drop, problems)


def out_of_range(keep: dict[int, list[int]], drop: dict[int, list[int]], num_experts: int, why: str,
                 source: str) -> list[str]:
    """One line per layer list that names an expert outside ``0..num_experts-1`` (``why`` says whose count)."""
    lines = []
    for field_name, lists in (("per_layer_keep", keep), ("per_layer_drop", drop)):
        for layer, indices in sorted(lists.items()):
            bad = [i for i in indices if not 0 <= i < num_experts]
            if bad:
                lines.append(f"{source}: {field_name}['{layer}'] (layer {layer}) names expert index "
                             f"{', '.join(map(str, bad))}, outside 0..{num_experts - 1} ({why})")
    return lines


def moeprune_drop_map(seed: SeedDropMap, top_k: int | None) -> Any:
    """The seed's map as moeprune's typed drop map, for the prune planner and verifier.

    It carries only what the seed states (keep/drop per layer, the counts, the method): the
    seed's file has no retained fractions, hashes or strategy fields, so moeprune's drop-map
    schema does not apply to it; check (a) validates what it does state.
    """
    from moeprune.dropmap.types import DropMap

    layers = sorted(set(seed.keep) | set(seed.drop))
    original = seed.original_experts if isinstance(seed.original_experts, int) else 0
    keep = {layer: sorted(seed.keep[layer]) if layer in seed.keep else
            sorted(set(range(original)) - set(seed.drop.get(layer, []))) for layer in layers}
    counts = {len(v) for v in keep.values()}
    data = {
        "num_experts": original,
        "top_k": top_k or 0,
        "num_experts_kept": next(iter(counts)) if len(counts) == 1 else None,
        "uniform": len(counts) == 1,
        "strategy": {"name": str(seed.method)},
        "base_model": {"id": str(seed.base_model)},
        "layers": [{"layer": layer, "keep": keep[layer], "drop": sorted(set(range(original)) - set(keep[layer]))}
                   for layer in layers],
    }
    return DropMap(data, seed.path, _validated=True)


# --- (a) the drop metadata against config.json and the tensor shapes ---------------------------
def check_drop_metadata(report: AuditReport, root: Path, seed: SeedDropMap) -> None:
    from moeprune.arch import ArchError, inspect
    from moeprune.arch.base import EXPERT
    from moeprune.io.checkpoint import Checkpoint
    from moeprune.prune.surgery import moe_expert_tensors

    target = SEED_DROP_METADATA
    for problem in seed.problems:
        report.failed("a", "drop metadata is well formed", target, problem)
    try:
        spec = inspect(root, "model's config.json", AuditError)
    except AuditError as exc:
        report.failed("a", "config.json", "config.json", str(exc))
        return
    except ArchError as exc:
        report.failed("a", "model family", "config.json", str(exc))
        return
    arch = spec.adapter
    config_experts = spec.num_experts_stated
    top_k = spec.top_k
    original, kept = seed.original_experts, seed.target_experts
    report.compare("a", "config num_experts = target_experts", f"config.json: {spec.num_experts_key}", kept,
                   config_experts,
                   config_experts == kept, f"{target} target_experts")
    if isinstance(top_k, int) and isinstance(kept, int):
        report.compare("a", "top-k routing fits the kept experts", f"config.json: {spec.top_k_key}",
                       f"<= {kept}", top_k, top_k <= kept)
    # Each layer: keep + drop is a partition of 0..original-1 with target_experts kept.
    bad_layers = []
    for layer in sorted(set(seed.keep) | set(seed.drop)):
        keep, drop = seed.keep.get(layer), seed.drop.get(layer)
        if keep is not None and len(keep) != len(set(keep)):
            bad_layers.append(f"layer {layer}: per_layer_keep repeats an expert")
        if keep is not None and kept is not None and len(keep) != kept:
            bad_layers.append(f"layer {layer}: per_layer_keep has {len(keep)} experts, target_experts = {kept}")
        if keep is not None and drop is not None and isinstance(original, int):
            if sorted(keep + drop) != list(range(original)):
                bad_layers.append(f"layer {layer}: per_layer_keep + per_layer_drop is not a partition of "
                                  f"0..{original - 1}")
        elif drop is not None and isinstance(original, int) and isinstance(kept, int) and len(drop) != original - kept:
            bad_layers.append(f"layer {layer}: per_layer_drop has {len(drop)} experts, expected "
                              f"original_experts - target_experts = {original - kept}")
    if bad_layers:
        for line in bad_layers:
            report.failed("a", "per-layer keep/drop lists", target, f"{target}: {line}")
    else:
        report.passed("a", "per-layer keep/drop lists", target,
                      f"{len(seed.keep or seed.drop)} layers, {kept} of {original} experts kept in each")
    # The shapes: every expert-indexed tensor has target_experts rows, in the layers the map covers.
    try:
        with Checkpoint.open(root) as checkpoint:
            expert_tensors = moe_expert_tensors(checkpoint, arch)
            shapes = {name: checkpoint[name].shape for name, t in expert_tensors.items() if t.role != EXPERT}
    except MoepruneError as exc:
        report.failed("a", "expert tensor shapes", "model safetensors", str(exc))
        return
    # A per-expert layout (mlp.experts.{i}.gate_proj...) counts tensors, a fused one rows.
    per_expert: dict[tuple[int, str], set[int]] = {}
    for name, t in expert_tensors.items():
        if t.role == EXPERT:
            per_expert.setdefault((t.layer, t.label), set()).add(int(t.expert))
    tensor_layers = sorted({t.layer for t in expert_tensors.values()})
    map_layers = sorted(set(seed.keep) | set(seed.drop))
    report.compare("a", "drop metadata covers the MoE layers of the weights", target, map_layers, tensor_layers,
                   map_layers == tensor_layers, "layers in per_layer_keep/drop vs layers with expert tensors")
    wrong = [f"{name}: {shapes[name][0] if shapes[name] else None} rows" for name in sorted(shapes)
             if not shapes[name] or shapes[name][0] != kept]
    wrong += [f"layer {layer} {label}: {len(experts)} experts" for (layer, label), experts in sorted(per_expert.items())
              if len(experts) != kept]
    first = ", ".join(wrong[:4]) + (f" and {len(wrong) - 4} more" if len(wrong) > 4 else "")
    report.compare("a", "expert tensors hold target_experts rows", "model safetensors",
                   kept, first if wrong else kept, not wrong, f"{len(expert_tensors)} expert-indexed tensors")


# --- (b) bit-exact against the base ---------------------------------------------------------------
def check_against_base(report: AuditReport, root: Path, seed: SeedDropMap, base_dir: Path | None) -> None:
    from moeprune.prune.verify import verify_prune

    if base_dir is None:
        report.not_checked("b", "kept experts and other tensors bit-exact vs the base", "model safetensors",
                           "pass --base BASE (the base model directory) to check every byte")
        return
    from moeprune.arch import ArchError, inspect

    try:
        base = inspect(base_dir, "base model's config.json", AuditError)
    except (AuditError, ArchError) as exc:
        report.failed("b", "base model", str(base_dir), str(exc))
        return
    base_experts = base.num_experts_stated
    report.compare("b", "base num_experts = original_experts", "config.json of --base", seed.original_experts,
                   base_experts, base_experts == seed.original_experts, f"{SEED_DROP_METADATA} original_experts")
    if isinstance(base_experts, int):
        outside = out_of_range(seed.keep, seed.drop, base_experts, f"the base has {base_experts} experts",
                               SEED_DROP_METADATA)
        for line in outside:
            report.failed("b", "kept experts and other tensors bit-exact vs the base", SEED_DROP_METADATA, line)
        if outside:
            return
    try:
        result = verify_prune(base_dir, root, drop_map=moeprune_drop_map(seed, base.top_k),
                              drop_map_path=seed.path)
    except (MoepruneError, ValueError, IndexError, KeyError) as exc:
        report.failed("b", "kept experts and other tensors bit-exact vs the base", "model safetensors", str(exc))
        return
    if result.ok:
        report.passed("b", "kept experts and other tensors bit-exact vs the base", "model safetensors",
                      f"{result.tensors_checked} base tensors: {result.identical_tensors} identical, "
                      f"{result.expert_slices_checked} kept expert slices, {result.router_rows_checked} router rows, "
                      f"{result.router_scales_checked} scales; {result.bytes_compared} bytes compared")
    else:
        for problem in result.problems[:20]:
            report.failed("b", "bit-exact vs the base", "model safetensors", problem)
        if len(result.problems) > 20:
            report.failed("b", "bit-exact vs the base", "model safetensors", f"... and {len(result.problems) - 20} more")


# --- (c) eval numbers from the sample logs ------------------------------------------------------
@dataclass
class EvalRecomputation:
    """What the sample logs give for one task (feeds the card claims of (d))."""

    task: str
    sample_log: Path
    results_file: Path | None
    scores: dict[str, dict[str, dict[str, Any]]]
    error_analysis: dict[str, Any]


def find_lm_eval_outputs(results_dir: Path) -> tuple[list[Path], dict[str, list[Path]]]:
    """lm-eval's ``results_*.json`` files and ``samples_<task>_*.jsonl`` logs below ``results_dir``."""
    results = sorted(results_dir.rglob("results_*.json"))
    samples: dict[str, list[Path]] = {}
    for path in sorted(results_dir.rglob("samples_*.jsonl")):
        # lm-eval names it samples_<task>_<date>.jsonl, e.g. samples_gpqa_diamond_cot_zeroshot_2026-04-08T11-02-33.123456
        task = re.sub(r"_\d{4}-\d{2}-\d{2}T[\d.\-]+$", "", path.stem.removeprefix("samples_"))
        samples.setdefault(task, []).append(path)
    return results, samples


def _matches_stated(stated: float | None, recomputed: float | None) -> bool:
    if stated is None or recomputed is None:
        return stated is None and recomputed is None
    return abs(float(stated) - float(recomputed)) <= 1e-9 * max(1.0, abs(float(recomputed)))


def check_eval(report: AuditReport, root: Path) -> list[EvalRecomputation]:
    from moeprune.eval.analysis import error_analysis
    from moeprune.eval.results import _primary_metric, primary_filter, task_scores
    from moeprune.eval.records import reported_scores
    from moeprune.eval.samples import read_sample_log

    results_dir = root / SEED_RESULTS_DIR
    if not results_dir.is_dir():
        report.not_checked("c", "eval results", f"{SEED_RESULTS_DIR}/", "no lm-eval output directory in the artifact")
        return []
    results_files, samples = find_lm_eval_outputs(results_dir)
    if not samples:
        report.failed("c", "sample logs", f"{SEED_RESULTS_DIR}/", f"{SEED_RESULTS_DIR}/: no samples_<task>_*.jsonl; "
                      "the eval numbers cannot be recomputed")
        return []
    stated: dict[str, tuple[Path, dict[str, Any]]] = {}
    for path in results_files:
        try:
            data = read_json_object(path)
        except AuditError as exc:
            report.failed("c", "results file", _rel(path, root), str(exc))
            continue
        for task, entry in (data.get("results") or {}).items():
            stated[task] = (path, {"scores": reported_scores(entry), "n": (data.get("n-samples") or {}).get(task)})
    for task in sorted(set(stated) - set(samples)):
        report.not_checked("c", f"{task}: results without a sample log", _rel(stated[task][0], root),
                           f"{_rel(stated[task][0], root)} states scores for '{task}' but no samples_{task}_*.jsonl "
                           "is in the artifact: they cannot be recomputed")
    out = []
    for task, logs in sorted(samples.items()):
        log = logs[-1]
        if len(logs) > 1:
            report.not_checked("c", "sample logs", _rel(log, root),
                               f"{len(logs)} sample logs for '{task}' ({', '.join(p.name for p in logs)}): "
                               f"audited the last, {log.name}")
        try:
            records = read_sample_log(log)
            scores = task_scores(records)
            chosen = primary_filter(records)
            analysis = error_analysis(records, filter_name=chosen, metric=_primary_metric(records))
        except (MoepruneError, ValueError, KeyError) as exc:
            report.failed("c", "sample log", _rel(log, root), f"{_rel(log, root)}: {exc}")
            continue
        results_path, claims = stated.get(task, (None, None))
        if claims is None:
            report.not_checked("c", f"{task}: results file", f"{SEED_RESULTS_DIR}/",
                               f"no results_*.json states scores for '{task}'; recomputed values are shown in (d)")
        else:
            target = _rel(results_path, root)
            for filter_name in sorted(set(claims["scores"]) | set(scores)):
                for metric in sorted(set(claims["scores"].get(filter_name, {})) | set(scores.get(filter_name, {}))):
                    theirs = claims["scores"].get(filter_name, {}).get(metric)
                    ours = scores.get(filter_name, {}).get(metric)
                    label = f"{task} {metric},{filter_name}"
                    if theirs is None or ours is None:
                        report.failed("c", f"{label}", target, f"{target}: {label}: "
                                      f"{'not in the results file' if theirs is None else 'not in the sample log'} "
                                      f"({_rel(log, root)})", claimed=theirs, recomputed=ours)
                        continue
                    report.compare("c", f"{label} accuracy", target, theirs.get("value"), ours["value"],
                                   _matches_stated(theirs.get("value"), ours["value"]), f"from {_rel(log, root)}")
                    report.compare("c", f"{label} stderr", target, theirs.get("stderr"), ours["stderr"],
                                   _matches_stated(theirs.get("stderr"), ours["stderr"]), f"from {_rel(log, root)}")
            n_stated = (claims.get("n") or {}).get("effective")
            if n_stated is not None:
                report.compare("c", f"{task} questions", target, n_stated, analysis["total"],
                               n_stated == analysis["total"], f"n-samples.effective vs {_rel(log, root)}")
        out.append(EvalRecomputation(task, log, results_path, scores, analysis))
    return out


def _rel(path: Path | None, root: Path) -> str:
    if path is None:
        return "?"
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)
