"""Issue 22: verify re-derives the drop map from the profile statistics, and follows the chain of
custody from the published safetensors to the scored samples.

Every forgery is made on a copy of a run with the project's own commands (``invoke dropmap``,
``prune``, ``card``, ``manifest``), as a forger would, then checked with ``invoke verify`` /
``invoke audit`` in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fakerun import make_fake_run, regenerate_outputs
from invoke_cli import invoke

from moeprune.profile.stats import load_stats
from moeprune.demo import MODEL_DIR as DEMO_BASE

ROOT = Path(__file__).resolve().parents[1]


WIDE = {"COLUMNS": "3000"}  # verify's table on one line per check


def _ran(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}"


def _copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs"))
    return target


def _failed_lines(stdout: str) -> list[str]:
    """The lines of verify's table (printed wide) that belong to a FAILED row, with what follows them."""
    lines = stdout.splitlines()
    start = [i for i, line in enumerate(lines) if "FAILED" in line]
    return [line for i in start for line in lines[i:i + 12]]


def _retained(stats_row: np.ndarray, keep: list[int]) -> float:
    return math.fsum(stats_row[keep].tolist()) / math.fsum(stats_row.tolist())


def _forge_layer0_drop_largest(run: Path) -> tuple[float, float]:
    """The issue's forgery: layer 0 drops its largest expert (another is kept in its place, so the
    count stays uniform), ``retained_fraction`` left as it was. Returns (stated, true) retention."""
    path = run / "expert_drop_metadata.json"
    drop_map = json.loads(path.read_text())
    stats = load_stats(run / "profile" / "stats.safetensors")
    row = np.asarray(stats.totals["contribution_sum"][0], dtype=np.float64)
    entry = drop_map["layers"][0]
    assert entry["layer"] == stats.layers[0]
    largest = int(np.argmax(row))
    assert largest in entry["keep"]
    instead = entry["drop"][0]
    entry["keep"] = sorted(set(entry["keep"]) - {largest} | {instead})
    entry["drop"] = sorted(set(entry["drop"]) - {instead} | {largest})
    path.write_text(json.dumps(drop_map, indent=2))
    true = _retained(row, entry["keep"])
    assert true < drop_map["strategy"]["retention_threshold"] < entry["retained_fraction"]
    return entry["retained_fraction"], true


def _rebuild(run: Path, *steps: str) -> None:
    for step in steps:
        done = invoke(*step.split(), env={**WIDE, "MOEPRUNE_RUNS_DIR": str(run.parent)}, timeout=1800)
        assert done.returncode == 0, f"invoke {step}: {_ran(done)}"


@pytest.mark.slow
def test_forged_drop_map_fails_verify_and_audit_naming_the_layer_and_both_values(demo_run, tmp_path):
    run = _copy_run(demo_run, tmp_path)
    stated, true = _forge_layer0_drop_largest(run)
    _rebuild(run, "prune", "card", "manifest")
    card = json.loads((run / "card" / "card_numbers.json").read_text())["numbers"]
    assert card["retention.L0"]["value"] == stated  # the card states the forged retention

    done = invoke("verify", str(run), "--base", str(DEMO_BASE), env=WIDE, in_process=True)
    assert done.returncode == 1, _ran(done)
    failed = "\n".join(_failed_lines(done.stdout))
    assert "drop map re-derived" in failed, _ran(done)
    (line,) = [x for x in failed.splitlines() if "layer 0: retained_fraction" in x]
    assert f"{100 * stated:.2f}%" in line and f"{100 * true:.2f}%" in line, line
    assert "card_numbers.json: 'retention.L0'" in failed
    # The GGUFs and the eval still come from the old weights: the chain of custody names them.
    assert "gguf:demo-F32.gguf: does not descend from the published safetensors" in failed, _ran(done)

    out = tmp_path / "audit.json"
    audited = invoke("audit", str(run), "--base", str(DEMO_BASE), "--json", str(out), env=WIDE, in_process=True)
    assert audited.returncode == 1, _ran(audited)
    rows = [r for r in json.loads(out.read_text())["checks"] if r["status"] == "fail"]
    rederived = next(r for r in rows if r["check"] == "drop map re-derived")
    assert "layer 0: retained_fraction" in rederived["detail"]
    assert f"{100 * stated:.2f}%" in rederived["detail"] and f"{100 * true:.2f}%" in rederived["detail"]


@pytest.mark.slow
def test_gguf_from_other_weights_fails_naming_the_file(demo_run, tmp_path):
    """A legitimate new drop map, re-pruned, card and manifest rebuilt, but the GGUFs (and the eval
    on them) left from the old weights: every old check agrees, the chain does not."""
    record = json.loads((demo_run / "gguf" / "demo-F32.gguf.json").read_text())
    pruned = demo_run / "pruned"
    assert record["source_files"] == {name: hashlib.sha256((pruned / name).read_bytes()).hexdigest()
                                      for name in record["source_files"]}
    assert {p.name for p in pruned.glob("*.safetensors")} <= set(record["source_files"])
    clean = invoke("verify", str(demo_run), "--base", str(DEMO_BASE), env=WIDE, in_process=True)
    assert clean.returncode == 0, _ran(clean)
    # The demo model is stored in bf16 and converted to f32: a lossless cast, compared expert for expert.
    assert "GGUF experts = safetensors" in clean.stdout and "every expert; after the converter's cast BF16->F32" \
        in clean.stdout, _ran(clean)

    run = _copy_run(demo_run, tmp_path)
    kept = json.loads((run / "expert_drop_metadata.json").read_text())["num_experts_kept"]
    _rebuild(run, f"dropmap --strategy uniform-count --keep-count {kept}  --criterion frequency",
             "prune", "card", "manifest")
    assert json.loads((run / "expert_drop_metadata.json").read_text())["layers"] != \
        json.loads((demo_run / "expert_drop_metadata.json").read_text())["layers"]
    done = invoke("verify", str(run), "--base", str(DEMO_BASE), env=WIDE, in_process=True)
    assert done.returncode == 1, _ran(done)
    failed = "\n".join(_failed_lines(done.stdout))
    assert "drop map re-derived" not in failed  # the new drop map itself is honest
    assert "gguf:demo-F32.gguf: does not descend from the published safetensors" in failed, _ran(done)
    assert re.search(r"gguf:demo-F32\.gguf: blk\.\d+\.ffn_(gate_up|down)_exps\.weight experts \[[\d, ]+\] differ "
                     r"from model\.language_model\.layers\.\d+\.experts", failed), _ran(done)


# --- fast: the fake run ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("custody") / "work")


@pytest.fixture
def fake_copy(fake_run, tmp_path) -> Path:
    return _copy_run(fake_run.layout.root, tmp_path)


def test_fake_run_verifies_with_its_chain_whole(fake_run):
    done = invoke("verify", str(fake_run.layout.root), "--base", str(fake_run.base_dir), env=WIDE, in_process=True)
    assert done.returncode == 0, _ran(done)
    assert "drop map re-derived" in done.stdout and "chain of custody" in done.stdout


def test_eval_of_a_gguf_that_does_not_descend_fails(fake_copy, fake_run):
    """The pruned model's eval is pointed at another published GGUF (the base's bytes under a pruned
    name): it is in the manifest and evaluated, so the old checks pass; it descends from nothing."""
    gguf = fake_copy / "gguf"
    forged = gguf / "fake-Q5_K_M.gguf"
    shutil.copy2(gguf / "base-Q4_K_M.gguf", forged)
    record = json.loads((gguf / "base-Q4_K_M.gguf.json").read_text()) | {"file": forged.name, "qtype": "Q5_K_M"}
    (gguf / "fake-Q5_K_M.gguf.json").write_text(json.dumps(record))
    run_json = fake_copy / "eval" / "pruned" / "run.json"
    run = json.loads(run_json.read_text())
    run["gguf"] |= {"path": "gguf/fake-Q5_K_M.gguf", "sha256": hashlib.sha256(forged.read_bytes()).hexdigest(),
                    "size_bytes": forged.stat().st_size}
    run_json.write_text(json.dumps(run, indent=2))
    regenerate_outputs(fake_copy)

    done = invoke("verify", str(fake_copy), "--base", str(fake_run.base_dir), env=WIDE, in_process=True)
    assert done.returncode == 1, _ran(done)
    failed = "\n".join(_failed_lines(done.stdout))
    assert "gguf:fake-Q5_K_M.gguf: quantized from a GGUF with sha256" in failed, _ran(done)
    assert "eval/pruned/run.json: served fake-Q5_K_M.gguf, which does not descend" in failed, _ran(done)


def test_eval_run_record_with_a_foreign_sha256_fails(fake_copy, fake_run):
    run_json = fake_copy / "eval" / "pruned" / "run.json"
    run = json.loads(run_json.read_text())
    run["gguf"]["sha256"] = "ab" * 32
    run_json.write_text(json.dumps(run, indent=2))
    regenerate_outputs(fake_copy)
    done = invoke("verify", str(fake_copy), env=WIDE, in_process=True)
    assert done.returncode == 1, _ran(done)
    assert f"eval/pruned/run.json: the served GGUF has sha256 {'ab' * 32}, which is no pruned GGUF" \
        in "\n".join(_failed_lines(done.stdout)), _ran(done)


def test_manual_drop_map_is_measured_not_reselected(fake_copy, fake_run):
    """A hand-made map (strategy 'manual') passes when the retention it states is what the statistics
    give for its keep sets, and fails naming the layer and both values when it is not."""
    from moeprune.prune.surgery import prune_checkpoint

    path = fake_copy / "expert_drop_metadata.json"
    drop_map = json.loads(path.read_text())
    stats = load_stats(fake_copy / "profile" / "stats.safetensors")
    row = np.asarray(stats.totals["contribution_sum"][0], dtype=np.float64)
    drop_map["strategy"] |= {"name": "manual", "retention_threshold": None}
    entry = drop_map["layers"][0]
    largest, instead = int(np.argmax(row)), entry["drop"][0]
    entry["keep"] = sorted(set(entry["keep"]) - {largest} | {instead})
    entry["drop"] = sorted(set(entry["drop"]) - {instead} | {largest})
    entry["criterion_retained_fraction"] = None
    true = _retained(row, entry["keep"])
    fractions = [e["retained_fraction"] if e is not entry else true for e in drop_map["layers"]]
    worst = int(np.argmin(fractions))
    drop_map["summary"] |= {"worst_layer": drop_map["layers"][worst]["layer"], "worst_retained_fraction": fractions[worst]}

    def publish(stated: float) -> subprocess.CompletedProcess:
        entry["retained_fraction"] = stated
        path.write_text(json.dumps(drop_map, indent=2))
        shutil.rmtree(fake_copy / "pruned")
        prune_checkpoint(fake_run.base_dir, path, fake_copy / "pruned", fake_run.recipe.prune.max_shard_bytes, fsync=False)
        regenerate_outputs(fake_copy)
        return invoke("verify", str(fake_copy), env=WIDE, in_process=True)

    honest = publish(true)
    failed = "\n".join(_failed_lines(honest.stdout))
    assert "drop map re-derived" not in failed and "strategy 'manual'" in honest.stdout, _ran(honest)
    forged = publish(0.9990)
    failed = "\n".join(_failed_lines(forged.stdout))
    (line,) = [x for x in failed.splitlines() if "layer 0: retained_fraction" in x]
    assert "99.90%" in line and f"{100 * true:.2f}%" in line, _ran(forged)


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_expert_comparison_follows_the_converters_cast(llama_build_shared, tmp_path, outtype):
    """The cast rule of moeprune.gguf_match against the pinned converter itself: the demo base
    converted to f16 / bf16 matches, expert for expert; one flipped expert does not."""
    from moeprune.gguf_match import compare_gguf_experts
    from moeprune.llamacpp.convert import convert_to_gguf

    out = tmp_path / f"base-{outtype.upper()}.gguf"
    convert_to_gguf(llama_build_shared, DEMO_BASE, out, outtype)
    match = compare_gguf_experts(out, DEMO_BASE, out.name)
    assert match.problems == [] and match.compared > 0
    # The demo model is stored in bf16: bf16 is written unchanged, f16 after the converter's cast.
    assert match.how[-1] == {"bf16": "bit for bit, BF16->BF16", "f16": "after the converter's cast BF16->F16"}[outtype]

    from gguf import GGUFReader

    tensor = next(t for t in GGUFReader(str(out)).tensors if t.name == "blk.1.ffn_down_exps.weight")
    start = int(tensor.data_offset) + tensor.data[0].nbytes * 3  # expert 3's first byte
    with open(out, "r+b") as handle:
        handle.seek(start)
        byte = handle.read(1)
        handle.seek(start)
        handle.write(bytes([byte[0] ^ 0x40]))
    (problem,) = compare_gguf_experts(out, DEMO_BASE, out.name).problems
    assert problem.startswith(f"{out.name}: blk.1.ffn_down_exps.weight experts [3] differ from")
