"""Proof that a pruned checkpoint is exactly the base minus the dropped experts.

:func:`verify_prune` re-reads both checkpoints (streaming, bounded chunks) and checks, using the
drop map stored beside the pruned weights:

- every kept expert slice of the fused expert tensors, every kept router row (weights, biases,
  correction biases) and per-expert scale (the family adapter names them) is bit-identical to the
  base tensor's row at the kept index, in the kept order; in a per-expert layout every kept
  expert's tensors are bit-identical under their new index and no dropped expert's remain;
- every other tensor is bit-identical, with the same dtype and shape;
- no tensor is missing or extra; the index is exact (checked when the pruned checkpoint opens,
  plus ``metadata.total_size``);
- ``config.json`` equals the base config except the expert count, which equals the kept count.

A recalibrated checkpoint (``recalibrate.json`` beside its weights, :mod:`moeprune.recalibrate`)
is checked the same way, except that each router tensor the record lists must hash to the
recorded sha256 instead of equalling the base rows; given the calibration sequences, the
recalibration is rerun from the base and must give the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeprune.arch.patterns import CORRECTION_BIAS, EXPERT_SCALE, ROUTER_BIAS, ROUTER_WEIGHT
from moeprune.hashing import sha256_bytes, sha256_file
from moeprune.io.checkpoint import Checkpoint, TensorInfo
from moeprune.recalibrate import RECORD_NAME
from moeprune.prune.surgery import (
    DROP_MAP_NAME,
    PruneError,
    config_num_experts,
    load_drop_map_file,
    plan_prune,
    pruned_config,
    read_model_config,
)

_COMPARE_CHUNK_BYTES = 16 * 1024 * 1024


@dataclass
class PruneVerifyReport:
    """Outcome of :func:`verify_prune`: counts of what was checked and every problem found."""

    base_dir: str
    pruned_dir: str
    num_experts: int = 0
    num_experts_kept: int = 0
    moe_layers: list[int] = field(default_factory=list)
    tensors_checked: int = 0
    identical_tensors: int = 0
    expert_slices_checked: int = 0  # (layer, kept expert) slices of the expert tensors
    router_rows_checked: int = 0
    router_scales_checked: int = 0
    recalibrated_tensors_checked: int = 0  # router tensors matching the recalibration record's hash
    recalibration_rerun: str = ""  # what the rerun of the recalibration found ("" when not a recalibrated checkpoint)
    bytes_compared: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items()}
        data["ok"] = self.ok
        return data

    def render(self) -> str:
        """A short human-readable report."""
        lines = [
            f"verify-prune: {self.pruned_dir} against {self.base_dir}",
            f"  experts per layer: {self.num_experts} -> {self.num_experts_kept} "
            f"in {len(self.moe_layers)} MoE layers",
            f"  tensors checked: {self.tensors_checked} ({self.identical_tensors} copied tensors bit-identical)",
            f"  kept expert slices bit-identical: {self.expert_slices_checked} "
            "(expert tensors, per layer and kept expert)",
            f"  kept router rows bit-identical: {self.router_rows_checked}; "
            f"per-expert scales: {self.router_scales_checked}",
            f"  bytes compared: {self.bytes_compared}",
        ]
        if self.recalibration_rerun:
            lines.insert(-1, f"  recalibrated router tensors matching the record: {self.recalibrated_tensors_checked}; "
                             f"rerun: {self.recalibration_rerun}")
        if self.ok:
            lines.append("  result: OK - only the dropped experts differ")
        else:
            lines.append(f"  result: FAILED - {len(self.problems)} problem(s):")
            lines += [f"    - {problem}" for problem in self.problems[:50]]
            if len(self.problems) > 50:
                lines.append(f"    ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


def verify_prune(base_dir: str | Path, pruned_dir: str | Path, drop_map: dict[str, Any] | None = None,
                 drop_map_path: Path | None = None, sequences_path: Path | None = None) -> PruneVerifyReport:
    """Check ``pruned_dir`` against ``base_dir`` with the drop map stored in ``pruned_dir``.

    ``drop_map`` (with ``drop_map_path`` for messages) is given instead by ``invoke audit`` for
    artifacts whose drop map has another format (the seed's). ``sequences_path``: the calibration
    sequences a recalibrated checkpoint was fitted on; the recalibration is rerun and compared.
    """
    base_dir, pruned_dir = Path(base_dir), Path(pruned_dir)
    report = PruneVerifyReport(base_dir=str(base_dir), pruned_dir=str(pruned_dir))
    base_config_path = base_dir / "config.json"
    base_config = read_model_config(base_config_path, "model config")
    pruned_config_json = read_model_config(pruned_dir / "config.json", "pruned model config")
    if drop_map is None:
        drop_map_path = pruned_dir / DROP_MAP_NAME
        drop_map = load_drop_map_file(drop_map_path)
    drop_map_path = drop_map_path or pruned_dir / DROP_MAP_NAME
    recorded = recorded_router_hashes(pruned_dir)
    with Checkpoint.open(base_dir) as base, Checkpoint.open(pruned_dir) as pruned:
        plan = plan_prune(base, base_config, base_config_path, drop_map, drop_map_path)
        report.num_experts = plan.num_experts
        report.num_experts_kept = plan.num_experts_kept
        report.moe_layers = sorted(plan.keep_by_layer)

        expected_config = pruned_config(base_config, plan.num_experts_kept)
        if pruned_config_json != expected_config:
            kept_in_config = _safe_num_experts(pruned_config_json)
            key = plan.arch.num_experts_key if plan.arch is not None else "num_experts"
            report.problems.append(
                f"config.json: differs from the base config with {key} = {plan.num_experts_kept} "
                f"(pruned config says {key} = {kept_in_config}; differing keys: "
                f"{', '.join(_diff_keys(expected_config, pruned_config_json)) or '?'})"
            )

        expected_names = {plan.output_name(name) for name in base.names()} - {None}
        extra = sorted(set(pruned.names()) - expected_names)
        if extra:
            report.problems.append(f"pruned checkpoint has tensors the base lacks: {', '.join(extra[:5])}")
        if pruned.index is not None:
            stated = (pruned.index.get("metadata") or {}).get("total_size")
            if stated != pruned.total_nbytes:
                report.problems.append(
                    f"index metadata.total_size is {stated} but the shards hold {pruned.total_nbytes} bytes"
                )

        for info in base.tensors():
            report.tensors_checked += 1
            out_name = plan.output_name(info.name)
            if out_name is None:
                continue  # a dropped expert's tensor: its absence is checked with the extra names
            if out_name not in pruned:
                report.problems.append(f"tensor '{out_name}' is missing from the pruned checkpoint")
                continue
            got = pruned[out_name]
            expected_shape = plan.output_shape(info)
            if got.dtype != info.dtype or got.shape != expected_shape:
                report.problems.append(
                    f"tensor '{info.name}': {got.dtype} {list(got.shape)}, expected {info.dtype} {list(expected_shape)}"
                )
                continue
            layer = plan.sliced.get(info.name)
            if layer is None:
                same = _same_bytes(base, info, pruned, got, report)
                if info.name in (plan.per_expert or {}):  # a kept expert's own tensor, renumbered
                    if same:
                        report.expert_slices_checked += 1
                    else:
                        report.problems.append(f"tensor '{out_name}' differs from the base's '{info.name}'")
                elif same:
                    report.identical_tensors += 1
                else:
                    report.problems.append(f"tensor '{info.name}' differs from the base")
                continue
            if info.name in recorded:
                _check_recorded(pruned, got, recorded[info.name], report)
                continue
            role = plan.arch.classify_tensor(info.name).role if plan.arch is not None else None
            _check_rows(base, info, pruned, got, plan.keep_by_layer[layer], report, role)
        unknown = sorted(set(recorded) - set(plan.sliced))
        if unknown:
            report.problems.append(f"{pruned_dir / RECORD_NAME}: records tensors that are not router tensors of the "
                                   f"pruned checkpoint: {', '.join(unknown[:5])}")
        if recorded and not report.problems:
            report.recalibration_rerun = _rerun(base_dir, pruned_dir, pruned, sequences_path, report)
    return report


def recorded_router_hashes(pruned_dir: Path) -> dict[str, str]:
    """Router tensor name -> sha256 recorded by the recalibration (empty: not recalibrated)."""
    path = pruned_dir / RECORD_NAME
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        return {name: digest for layer in record["layers"] for name, digest in layer["tensors"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise PruneError(f"{path}: not a recalibration record (layers[].tensors); rerun the recalibrate stage") from None


def recorded_router_problems(checkpoint_dir: Path) -> tuple[int, list[str]]:
    """Each router tensor the checkpoint's recalibration record names, read from its shard and
    hashed (no base needed): how many match, and a problem naming the shard and tensor for each
    that does not (or is missing)."""
    recorded = recorded_router_hashes(checkpoint_dir)
    matched, problems = 0, []
    with Checkpoint.open(checkpoint_dir) as checkpoint:
        for name, digest in sorted(recorded.items()):
            if name not in checkpoint:
                problems.append(f"{RECORD_NAME}: records tensor '{name}', which no shard holds")
            elif sha256_bytes(checkpoint.read(checkpoint[name])) != digest:
                problems.append(f"{checkpoint[name].shard.name}: tensor '{name}' differs from the sha256 {RECORD_NAME} "
                                "records for it")
            else:
                matched += 1
    return matched, problems


def _check_recorded(pruned: Checkpoint, got: TensorInfo, digest: str, report: PruneVerifyReport) -> None:
    report.bytes_compared += got.nbytes
    if sha256_bytes(pruned.read(got)) != digest:
        report.problems.append(f"tensor '{got.name}' differs from what the recalibration recorded (sha256)")
    else:
        report.recalibrated_tensors_checked += 1


def _rerun(base_dir: Path, pruned_dir: Path, pruned: Checkpoint, sequences_path: Path | None,
           report: PruneVerifyReport) -> str:
    """Rerun the recalibration from the base and compare every router tensor's bytes."""
    from moeprune.recalibrate.stage import recalibrate

    if sequences_path is None:
        return "not rerun (no calibration sequences given)"
    record = json.loads((pruned_dir / RECORD_NAME).read_text(encoding="utf-8"))
    if sha256_file(sequences_path) != record.get("sequences_sha256"):
        report.problems.append(f"{sequences_path}: not the sequences the recalibration recorded (sha256 differs)")
        return "not rerun (other sequences)"
    new_bytes, _ = recalibrate(base_dir, pruned_dir / DROP_MAP_NAME, sequences_path, record["domains"],
                               record["batch_size"], record["settings"])
    for name, data in new_bytes.items():
        if name not in pruned or pruned.read(pruned[name]) != data:
            report.problems.append(f"tensor '{name}' differs from what the recalibration recomputes")
    return f"rerun from the base, {len(new_bytes)} router tensors compared"


def _check_rows(base: Checkpoint, info: TensorInfo, pruned: Checkpoint, got: TensorInfo,
                keep: list[int], report: PruneVerifyReport, role: str | None) -> None:
    """Row ``i`` of the pruned tensor must equal row ``keep[i]`` of the base tensor."""
    row_nbytes = info.row_nbytes()
    bad = []
    for new_row, old_row in enumerate(keep):
        ok = True
        for start in range(0, row_nbytes, _COMPARE_CHUNK_BYTES):
            length = min(_COMPARE_CHUNK_BYTES, row_nbytes - start)
            a = base.read(info, old_row * row_nbytes + start, length)
            b = pruned.read(got, new_row * row_nbytes + start, length)
            report.bytes_compared += length
            if a != b:
                ok = False
                break
        if not ok:
            bad.append(old_row)
    if bad:
        report.problems.append(
            f"tensor '{info.name}': kept expert(s) {bad[:10]} differ from the base rows (wrong slice or order)"
        )
        return
    if role in (ROUTER_WEIGHT, ROUTER_BIAS, CORRECTION_BIAS):
        report.router_rows_checked += len(keep)
    elif role == EXPERT_SCALE:
        report.router_scales_checked += len(keep)
    else:
        report.expert_slices_checked += len(keep)


def _same_bytes(base: Checkpoint, a: TensorInfo, pruned: Checkpoint, b: TensorInfo, report: PruneVerifyReport) -> bool:
    if a.nbytes != b.nbytes:
        return False
    for left, right in zip(_chunks(base, a), _chunks(pruned, b), strict=True):
        report.bytes_compared += len(left)
        if left != right:
            return False
    return True


def _chunks(checkpoint: Checkpoint, info: TensorInfo) -> Iterator[bytes]:
    for start in range(0, info.nbytes, _COMPARE_CHUNK_BYTES):
        yield checkpoint.read(info, start, min(_COMPARE_CHUNK_BYTES, info.nbytes - start))


def _safe_num_experts(config: dict[str, Any]) -> Any:
    try:
        return config_num_experts(config, "config.json")
    except Exception:
        return None


def _diff_keys(expected: dict[str, Any], got: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(expected) | set(got)):
        left, right = expected.get(key), got.get(key)
        if isinstance(left, dict) and isinstance(right, dict):
            keys += _diff_keys(left, right, f"{prefix}{key}.")
        elif json.dumps(left, sort_keys=True) != json.dumps(right, sort_keys=True):
            keys.append(f"{prefix}{key}")
    return keys
