"""Issue 15: the holes verify had, each closed and driven by a test.

A consistent forgery of one sample score, a deleted GGUF file of a local run, manifest paths that
leave the artifact, malformed inputs, a mistyped local path taken for a Hub id, and code or pickle
files passing without a word.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fakerun import TASK, make_fake_run, regenerate_outputs
from invoke_cli import invoke

from moeprune.layout import RunLayout
from moeprune.verify import VerifyError, verify

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("holes") / "work")


@pytest.fixture(params=["fake", pytest.param("demo", marks=pytest.mark.slow)])
def run_copy(request, fake_run, tmp_path) -> Path:
    source = fake_run.layout.root if request.param == "fake" else request.getfixturevalue("demo_run")
    target = tmp_path / "runs" / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("logs"))
    return target


def failures(report) -> str:
    return "\n".join(f"{c.name} {c.target}: {c.detail}" for c in report.failures)


def test_consistent_forgery_of_one_sample_score_fails_naming_the_sample(run_copy):
    from moeprune.eval.results import task_scores
    from moeprune.eval.samples import read_sample_log, write_sample_log

    log = run_copy / "eval" / "pruned" / f"samples_{TASK}.jsonl"
    records = read_sample_log(log)
    victim = next(r for r in records if r["filter"] == "flexible-extract" and r["exact_match"] == 0.0)
    victim["exact_match"] = 1.0  # a wrong answer scored right; everything else made to agree
    write_sample_log(log, records)
    run_json = run_copy / "eval" / "pruned" / "run.json"
    run = json.loads(run_json.read_text())
    run["tasks"][TASK]["reported"] = {f: {m: {"value": s["value"], "stderr": s["stderr"]} for m, s in ms.items()}
                                      for f, ms in task_scores(records).items()}
    run_json.write_text(json.dumps(run, indent=2))
    card_before = (run_copy / "card" / "README.md").read_text()
    regenerate_outputs(run_copy)
    assert (run_copy / "card" / "README.md").read_text() != card_before  # the card now shows the forged score

    report = verify(str(run_copy))
    assert not report.ok
    failed = {c.name for c in report.failures}
    assert failed == {"re-score samples"}, failures(report)  # every other check is fooled
    detail = report.failures[0].detail
    assert f"pruned/{TASK} doc_id {victim['doc_id']} (flexible-extract): exact_match = 1.0 in the log" in detail
    assert "gives 0" in detail


def test_rescore_passes_on_an_honest_run(run_copy):
    report = verify(str(run_copy))
    assert report.ok, failures(report)
    row = next(c for c in report.checks if c.name == "re-score samples")
    assert row.ok and "samples re-scored" in row.detail


def test_edited_task_filter_in_the_recorded_config_fails(run_copy):
    path = run_copy / "eval" / "base" / "lm_eval_results.json"
    data = json.loads(path.read_text())
    data["configs"][TASK]["filter_list"][1]["filter"][0]["regex_pattern"] = "(.)"
    path.write_text(json.dumps(data))
    regenerate_outputs(run_copy)
    detail = failures(verify(str(run_copy)))
    assert "base/lm_eval_results.json: task 'demo_mcq': the recorded filter_list" in detail


def test_deleted_gguf_file_of_a_local_run_fails(run_copy):
    gguf = next(p for p in sorted((run_copy / "gguf").glob("*.gguf")) if not p.name.startswith("base"))
    gguf.unlink()
    report = verify(str(run_copy))
    assert not report.ok
    assert f"gguf:{gguf.name}: listed in the manifest but missing" in failures(report)
    assert "not downloaded" not in failures(report)


@pytest.mark.parametrize("bad_path", ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "sub//x"])
def test_manifest_paths_that_escape_are_refused_and_never_read(run_copy, bad_path, tmp_path):
    from moeprune.schemas import SchemaError, validate

    outside = run_copy.parent / "outside.txt"
    outside.write_text("secret outside the artifact\n")
    manifest_path = run_copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"repo": "model", "path": bad_path, "size_bytes": 28, "sha256": "0" * 64})
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="path"):
        validate("manifest", manifest)
    report = verify(str(run_copy))
    assert not report.ok
    detail = failures(report)
    assert f"model:{bad_path}: manifest path" in detail and "refused (never read)" in detail
    assert "28 bytes" not in detail and "size" not in detail.split(bad_path)[-1].split("\n")[0]


@pytest.mark.parametrize("context", [5, None, ["x"], {"repo_ref": {"nested": 1}}, {"license": 3}])
def test_crafted_card_numbers_context_is_a_failed_row_not_a_traceback(run_copy, context):
    path = run_copy / "card" / "card_numbers.json"
    data = json.loads(path.read_text())
    data["context"] = context
    path.write_text(json.dumps(data))
    report = verify(str(run_copy))  # must not raise
    assert not report.ok
    assert any(c.target in ("card_numbers.json", "README.md") or "card_numbers.json" in c.detail
               for c in report.failures), failures(report)


@pytest.mark.parametrize("damage", [
    lambda d: d.update(numbers=[1, 2]),
    lambda d: d["numbers"].update({next(iter(d["numbers"])): "not an object"}),
    lambda d: d.update(facts="x"),
])
def test_crafted_card_numbers_values_are_failed_rows(run_copy, damage):
    path = run_copy / "card" / "card_numbers.json"
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    report = verify(str(run_copy))
    assert not report.ok


@pytest.mark.parametrize("content", ["{not json", "[]", '{"files": "x"}', '{"files": [{"repo": "model"}]}',
                                     '{"files": [{"repo": "model", "path": "a", "size_bytes": "9", "sha256": "x"}]}'])
def test_malformed_manifest_is_a_clear_error(run_copy, content):
    (run_copy / "manifest.json").write_text(content)
    with pytest.raises(VerifyError, match="manifest.json"):
        verify(str(run_copy))


def test_malformed_sample_log_and_run_record_are_failed_rows(run_copy):
    (run_copy / "eval" / "base" / "run.json").write_text('{"tasks": 3}')
    (run_copy / "eval" / "pruned" / f"samples_{TASK}.jsonl").write_text("[1]\n")
    report = verify(str(run_copy))
    assert not report.ok
    assert {"recompute from sample logs", "re-score samples"} <= {c.name for c in report.failures}


def test_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from moeprune.hub import is_hub_repo_id, looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for target in ("runs/demoo", "./demo", "/nowhere/at/all", "~/nothing-here", "runs/x/y", "demo/"):
        with pytest.raises(VerifyError, match="no such local directory"):
            verify(target)
    assert looks_like_local_path("runs/demoo") and not is_hub_repo_id("runs/demoo")
    assert is_hub_repo_id("google/gemma-4-26b-a4b-it") and not looks_like_local_path("google/gemma-4-26b-a4b-it")
    assert not is_hub_repo_id("a/b/c") and not is_hub_repo_id("me/bad--name")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(VerifyError, match="not a directory"):
        verify("afile")


def test_code_and_pickle_files_are_listed_as_warnings(run_copy, repo_root=REPO_ROOT):
    from moeprune.manifest import write_manifest

    pruned = run_copy / "pruned"
    (pruned / "modeling_custom.py").write_text("import os\nos.system('echo pwned')\n")
    (pruned / "optimizer.pt").write_bytes(b"\x80\x04not really a pickle")
    config = json.loads((pruned / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomModel"}
    (pruned / "config.json").write_text(json.dumps(config, indent=2))
    manifest = json.loads((run_copy / "manifest.json").read_text())
    write_manifest(RunLayout(run_copy), manifest["recipe"],
                   {"repo_ids": manifest["repo_ids"], "llamacpp": manifest["llamacpp"]})
    report = verify(str(run_copy))
    warning = next(c for c in report.checks if c.name == "code / pickle files")
    assert warning.warning and warning.ok is None
    assert "modeling_custom.py: code file" in warning.detail
    assert "optimizer.pt: pickle-capable format" in warning.detail
    assert "config.json: auto_map names custom code (modeling_custom.CustomModel)" in warning.detail
    assert warning not in report.failures

    env = {**os.environ, "COLUMNS": "250"}
    result = invoke("verify", str(run_copy), cwd=repo_root, env=env, inherit_env=False)
    assert "warning" in result.stdout and "modeling_custom.py" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_clean_artifact_has_no_code_warning(run_copy):
    row = next(c for c in verify(str(run_copy)).checks if c.name == "code / pickle files")
    assert row.ok and not row.warning
