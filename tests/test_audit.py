"""`invoke audit`: the seed's layout made from the demo run (and its tampered variants), moeprune's own
layout, and the card-claim parser on text laid out like the seed card."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from invoke_cli import invoke

from moeprune.audit import AuditError, audit_directory
from moeprune.audit.claims import parse_card
from moeprune.schemas import validate
from moeprune.demo import MODEL_DIR as DEMO_BASE
from seed_layout import change_one_sample, flip_kept_expert_byte, inflate_card_claim, keep_one_more_expert, write_seed_layout

ROOT = Path(__file__).resolve().parents[1]

# Lines of the seed card (shared/reference/gemma-4-A4B-109e-model-card.txt), as laid out there.
SEED_CARD_EXCERPT = """\
| Original (128e) | This model (109e) | Delta | |
|---|---|---|---|
| Total params | 26B | 22.4B | -14% |
| Experts per layer | 128 | 109 | -19/layer |
| Top-k routing | 8 | 8 | — |
| GGUF Q4_K_M size | 16 GB | 14 GB | -12.5% |
| bf16 size | 50 GB | 42 GB | -16% |
| GPQA Diamond | 75.25% ± 3.07% | 71.72% ± 3.21% | -3.5 pp |
## Pruning Decision
| Layer | Retained % | Layer | Retained % | Layer | Retained % |
|---|---|---|---|---|---|
| L0 | 99.66% | L10 | 99.88% | L20 | 99.88% |
| L14 | 99.01% | L15 | 99.10% | L25 | 99.88% |
Worst case: Layer 14 at 99.01%. Different experts are dropped in each layer.
## Results
| Metric | Score |
|---|---|
| flexible-extract | 71.72% ± 3.21% |
| strict-match | 0.51% ± 0.51% |
198 questions, all answered (only 1 invalid extraction).
## Error Analysis
- 142 correct (71.7%)
- 55 wrong answer (27.8%) — model committed to an incorrect choice
- 1 invalid extraction (0.5%) — answer not parseable
Wrong answers are evenly distributed across choices (A: 12, B: 11, C: 16, D: 14), indicating no systematic bias.
- Median response length: 2,536 characters (~630 tokens)
- Mean: 3,840 characters (~960 tokens)
- 6 responses exceeded 20k characters (hard questions hitting the reasoning budget)
- 1 response exceeded 30k characters
- Layers: 30
- Hidden size: 2816
"""


def test_the_seed_cards_claims_are_read():
    claims, unparsed = parse_card(SEED_CARD_EXCERPT)
    got = {}
    for claim in claims:
        got.setdefault(claim.key, []).append(claim.value)
    assert got["accuracy/flexible-extract"] == [71.72, 71.72] and got["stderr/flexible-extract"] == [3.21, 3.21]
    assert got["base.accuracy/flexible-extract"] == [75.25] and got["base.stderr/flexible-extract"] == [3.07]
    assert got["accuracy/strict-match"] == [0.51]
    assert got["total_params"] == [22.4] and got["base.total_params"] == [26.0]
    assert got["experts_per_layer"] == [109] and got["top_k"] == [8] and got["base.top_k"] == [8]
    assert got["safetensors_gib"] == [42.0] and got["base.safetensors_gib"] == [50.0]
    assert got["retained/L14"] == [99.01, 99.01] and got["retained/L0"] == [99.66]
    assert (got["correct"], got["wrong"], got["invalid"], got["questions"]) == ([142], [55], [1, 1], [198])
    assert got["correct_fraction"] == [71.7]
    assert [got[f"wrong_letter/{x}"] for x in "ABCD"] == [[12], [11], [16], [14]]
    assert got["median_chars"] == [2536] and got["mean_chars"] == [3840] and got["median_tokens"] == [630]
    assert got["over_20000"] == [6] and got["over_30000"] == [1]
    assert got["num_layers"] == [30] and got["hidden_size"] == [2816]
    # The GGUF sizes and the deltas are claims no rule reads: listed, never passed.
    texts = [u.text for u in unparsed]
    assert any("GGUF Q4_K_M size" in t and "14 GB" in t for t in texts)
    assert any("-3.5 pp" in t for t in texts)


def test_claims_match_to_their_displayed_precision():
    claims, _ = parse_card(SEED_CARD_EXCERPT)
    by_key = {c.key: c for c in claims}
    assert by_key["accuracy/flexible-extract"].matches(142 / 198)  # 71.717...% shows as 71.72%
    assert not by_key["accuracy/flexible-extract"].matches(141 / 198)
    assert by_key["median_tokens"].matches(2536 / 4)  # ~630 (634)
    assert not by_key["median_tokens"].matches(3000 / 4)
    assert by_key["safetensors_gib"].matches(41.7 * 1024**3) and not by_key["safetensors_gib"].matches(44.8 * 1024**3)


# --- artifacts from the demo run -----------------------------------------------------------------
@pytest.fixture(scope="module")
def seed_artifact(demo_run, tmp_path_factory) -> Path:
    return write_seed_layout(demo_run, tmp_path_factory.mktemp("seed") / "demo-seed", DEMO_BASE)


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(artifact, target)
    return target


def _failures(report, section: str | None = None) -> list:
    return [row for row in report.rows if row.status == "fail" and (section is None or row.section == section)]


@pytest.mark.slow
def test_untouched_seed_layout_passes_through_the_command_line(seed_artifact, tmp_path):
    """`invoke audit SOURCE --base BASE --reprofile RECIPE --json OUT`, as an auditor runs it."""
    out = tmp_path / "audit.json"
    done = invoke("--search-root", str(ROOT), "audit", str(seed_artifact), "--base", str(DEMO_BASE),
                  "--reprofile", str(ROOT / "recipes" / "demo.toml"), "--json", str(out), cwd=tmp_path, timeout=1800,
                  env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path),
                       "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "MOEPRUNE_RUNS_DIR": str(tmp_path / "runs")},
                  inherit_env=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "audit passed" in done.stdout
    report = json.loads(out.read_text())
    validate("audit", report)
    assert report["layout"] == "seed" and report["ok"] and report["counts"]["fail"] == 0
    rows = report["checks"]
    by = {(r["section"], r["check"]): r for r in rows}
    assert by[("b", "kept experts and other tensors bit-exact vs the base")]["status"] == "pass"
    assert by[("e", "kept expert set")]["status"] == "pass"
    assert all(r["status"] == "pass" for r in rows if r["section"] in ("a", "b", "c"))
    passed_claims = {r["check"] for r in rows if r["section"] == "d" and r["status"] == "pass"}
    for key in ("accuracy/flexible-extract", "stderr/flexible-extract", "accuracy/strict-match", "correct", "wrong",
                "invalid", "questions", "wrong_letter/A", "median_chars", "mean_chars", "over_20000", "over_30000",
                "experts_per_layer", "top_k", "total_params", "base.total_params", "safetensors_gib", "num_layers"):
        assert key in passed_claims, key
    assert any(r["check"].startswith("retained/L") and r["status"] == "pass" for r in rows if r["section"] == "d")
    not_checked = [r for r in rows if r["status"] == "not checked"]
    assert any("82.3%" in r["detail"] for r in not_checked)  # an unparsed claim is listed, not passed
    assert any(r["check"] == "base.accuracy/flexible-extract" for r in not_checked)  # no base logs in the repo


def test_untouched_seed_layout_passes_with_base(seed_artifact):
    report = audit_directory(seed_artifact, DEMO_BASE)
    assert report.layout == "seed"
    assert report.ok, [row.detail for row in _failures(report)]
    assert any(row.section == "b" and row.status == "pass" for row in report.rows)
    # Without --reprofile the retention table is not checked (and says why).
    retained = [row for row in report.rows if row.check.startswith("retained/")]
    assert retained and all(row.status == "not checked" and "--reprofile" in row.detail for row in retained)


def test_flipped_byte_in_a_kept_expert_is_caught(seed_artifact, tmp_path):
    artifact = _copy(seed_artifact, tmp_path)
    flip_kept_expert_byte(artifact)
    report = audit_directory(artifact, DEMO_BASE)
    failures = _failures(report)
    assert failures and {row.section for row in failures} == {"b"}
    assert any("gate_up_proj" in row.detail and "differ from the base" in row.detail for row in failures)
    # Without --base nothing can see it: (b) says so instead of passing.
    unchecked = audit_directory(artifact)
    assert unchecked.ok and any(r.section == "b" and r.status == "not checked" for r in unchecked.rows)


def test_sample_changed_but_not_its_results_is_caught(seed_artifact, tmp_path):
    artifact = _copy(seed_artifact, tmp_path)
    log_name = change_one_sample(artifact)
    report = audit_directory(artifact, DEMO_BASE)
    failures = _failures(report, "c")
    flex = [row for row in failures if "exact_match,flexible-extract accuracy" in row.check]
    assert flex, [row.detail for row in _failures(report)]
    row = flex[0]
    assert row.target.endswith(f"results_{'2026-12-02T05-00-00.000000'}.json") and log_name in row.detail
    assert row.claimed > row.recomputed  # the results file still counts the answer as correct
    assert f"claimed {row.claimed!r}, recomputed {row.recomputed!r}" in row.detail


def test_inflated_card_claim_is_caught(seed_artifact, tmp_path):
    artifact = _copy(seed_artifact, tmp_path)
    inflated = inflate_card_claim(artifact)
    report = audit_directory(artifact, DEMO_BASE)
    failures = _failures(report)
    assert failures and {row.section for row in failures} == {"d"}
    (row,) = [r for r in failures if "model-index" in r.target]
    assert row.check == "accuracy/flexible-extract" and row.claimed == inflated
    assert "README.md" in row.detail and str(inflated) in row.detail and row.recomputed in row.detail


def test_drop_map_that_disagrees_with_the_shapes_is_caught(seed_artifact, tmp_path):
    artifact = _copy(seed_artifact, tmp_path)
    claimed = keep_one_more_expert(artifact)
    report = audit_directory(artifact)
    failures = _failures(report, "a")
    checks = {row.check for row in failures}
    assert {"config num_experts = target_experts", "expert tensors hold target_experts rows"} <= checks
    shapes = next(row for row in failures if row.check == "expert tensors hold target_experts rows")
    assert shapes.claimed == claimed and "rows" in str(shapes.recomputed)


def test_audit_of_a_moeprune_run_reuses_verify(demo_run, tmp_path):
    report = audit_directory(demo_run, DEMO_BASE)
    assert report.layout == "moeprune"
    assert report.ok, [row.detail for row in _failures(report)]
    assert {row.section for row in report.rows} == {"verify"}
    assert any(row.check == "recompute from sample logs" and row.status == "pass" for row in report.rows)
    # A tampered results.json of the run is caught by the same checks.
    run = tmp_path / "run"
    shutil.copytree(demo_run, run)
    results = run / "eval" / "results.json"
    data = json.loads(results.read_text())
    data["models"]["pruned"]["tasks"]["demo_mcq"]["error_analysis"]["correct"] += 1
    results.write_text(json.dumps(data))
    assert not audit_directory(run).ok


def test_neither_layout_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AuditError, match="neither layout"):
        audit_directory(tmp_path)


def test_seed_layout_audited_from_the_hub_at_a_revision(seed_artifact, tmp_path, monkeypatch):
    """SOURCE as `owner/name@revision` on a (local) Hub: the untouched commit passes, a later
    commit with an inflated claim fails."""
    import hashlib

    import huggingface_hub.constants as constants
    from hub_server import FakeHub

    from moeprune.audit import audit

    hf = tmp_path / "hf"
    for name, value in (("HF_HOME", hf), ("HF_HUB_CACHE", hf / "hub"), ("HF_TOKEN_PATH", hf / "token")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    token = "hf_testtoken_0123456789abcdefghij"
    monkeypatch.setenv("HF_TOKEN", token)
    files = {p.relative_to(seed_artifact).as_posix(): p.read_bytes() for p in seed_artifact.rglob("*") if p.is_file()}
    tampered = _copy(seed_artifact, tmp_path)
    inflate_card_claim(tampered)
    with FakeHub(token) as hub:
        repo = hub.create("seed/demo-13e")
        good = hashlib.sha1(b"good").hexdigest()
        repo.commits[good] = dict(files)
        repo.history.append(good)
        bad = hashlib.sha1(b"bad").hexdigest()
        repo.commits[bad] = dict(files) | {"README.md": (tampered / "README.md").read_bytes()}
        repo.history.append(bad)
        passed = audit(f"seed/demo-13e@{good}", DEMO_BASE, endpoint=hub.endpoint)
        assert passed.layout == "seed" and passed.ok, [row.detail for row in _failures(passed)]
        assert passed.subject == f"seed/demo-13e@{good}"
        failed = audit("seed/demo-13e", endpoint=hub.endpoint)
        assert [row.check for row in _failures(failed)] == ["accuracy/flexible-extract"]


def test_command_line_exits_1_naming_the_file_and_both_values(seed_artifact, tmp_path):
    artifact = _copy(seed_artifact, tmp_path)
    inflated = inflate_card_claim(artifact)
    out = tmp_path / "audit.json"
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "COLUMNS": "250"}
    audit_cli = ("--search-root", str(ROOT), "audit", str(artifact))
    done = invoke(*audit_cli, "--json", str(out), cwd=tmp_path, env=env, inherit_env=False)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "audit FAILED" in done.stdout
    report = json.loads(out.read_text())
    validate("audit", report)
    (row,) = [r for r in report["checks"] if r["status"] == "fail"]
    assert row["target"].startswith("README.md") and row["claimed"] == inflated
    assert f"claimed {inflated!r}, recomputed {row['recomputed']!r}" in row["detail"]
    bad = invoke(*audit_cli, "--base", str(tmp_path / "nowhere"), cwd=tmp_path, env=env, inherit_env=False)
    assert bad.returncode == 1 and "--base" in bad.stderr and "config.json" in bad.stderr


def test_out_of_range_expert_in_per_layer_keep_is_a_failed_check_with_and_without_base(seed_artifact, tmp_path):
    """Issue 22: with --base this was a traceback, without it the map passed."""
    artifact = _copy(seed_artifact, tmp_path)
    path = artifact / "expert_drop_metadata.json"
    meta = json.loads(path.read_text())
    meta["per_layer_keep"]["0"][-1] = 99  # no such expert (the demo has 16)
    del meta["per_layer_drop"]
    path.write_text(json.dumps(meta, indent=2))
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "COLUMNS": "250"}
    for extra in ([], ["--base", str(DEMO_BASE)]):
        out = tmp_path / f"audit{len(extra)}.json"
        done = invoke("--search-root", str(ROOT), "audit", str(artifact), *extra, "--json", str(out), cwd=tmp_path,
                      env=env, inherit_env=False)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout[-3000:] + done.stderr[-3000:]
        assert "audit FAILED" in done.stdout
        failed = [r for r in json.loads(out.read_text())["checks"] if r["status"] == "fail"]
        named = [r for r in failed if "per_layer_keep['0'] (layer 0) names expert index 99" in r["detail"]]
        assert named and all(r["section"] in ("a", "b") for r in named), failed
        assert any(r["section"] == "b" for r in named) == bool(extra)
