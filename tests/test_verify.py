"""`verify` for auditors: passes on a complete run; each kind of tampering fails, naming what."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from fakerun import TASK, make_fake_run
from invoke_cli import invoke
from hub_server import FakeHub

from moeprune.verify import VerifyError, verify
from moeprune.demo import MODEL_DIR as DEMO_BASE

TOKEN = "hf_testtoken_0123456789abcdefghij"


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    return make_fake_run(tmp_path_factory.mktemp("verify") / "work")


REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["fake", pytest.param("demo", marks=pytest.mark.slow)])
def any_run(request, fake_run) -> tuple[Path, Path]:
    """(run directory, base checkpoint): the synthetic run, and the real demo run once it exists."""
    if request.param == "fake":
        return fake_run.layout.root, fake_run.base_dir
    return request.getfixturevalue("demo_run"), DEMO_BASE


@pytest.fixture
def run_copy(any_run, tmp_path) -> Path:
    """A private copy of the run directory that a test may tamper with."""
    target = tmp_path / "runs" / any_run[0].name
    shutil.copytree(any_run[0], target, ignore=shutil.ignore_patterns("logs"))
    return target


def failures(report) -> str:
    return "\n".join(f"{c.name} {c.target}: {c.detail}" for c in report.failures)


def test_complete_run_verifies_with_base(any_run):
    report = verify(str(any_run[0]), any_run[1])
    assert report.ok, failures(report)
    names = {c.name for c in report.checks if c.ok}
    assert {"sha256 + size", "recompute from sample logs", "drop map vs weights", "card numbers", "card text",
            "kept experts bit-exact", "base size on the card"} <= names


def test_edited_sample_answer_fails_naming_log_and_metric(run_copy):
    log = run_copy / "eval" / "pruned" / f"samples_{TASK}.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    victim = next(r for r in records if r["filter"] == "flexible-extract")
    if victim["exact_match"] == 1.0:  # make a right answer wrong, or a wrong one right
        victim["filtered_resps"], victim["exact_match"] = ["(Z)"], 0.0
    else:
        victim["filtered_resps"], victim["exact_match"] = [victim["target"]], 1.0
    log.write_text("".join(json.dumps(r) + "\n" for r in records))

    report = verify(str(run_copy))
    assert not report.ok
    text = failures(report)
    assert f"eval/pruned/samples_{TASK}.jsonl: sha256" in text or f"eval/pruned/samples_{TASK}.jsonl: size" in text
    # the recomputation names the model, task, metric and the number the log now gives
    assert f"pruned/{TASK} exact_match,flexible-extract" in text and "the sample log gives" in text


def test_one_flipped_shard_byte_fails_naming_the_shard(run_copy):
    shard = sorted((run_copy / "pruned").glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data: headers still parse
    shard.write_bytes(bytes(data))

    report = verify(str(run_copy))
    assert not report.ok
    assert f"{shard.name}: sha256" in failures(report)


def test_one_flipped_byte_in_a_kept_expert_fails_against_base(any_run, run_copy):
    from moeprune.io.checkpoint import Checkpoint

    with Checkpoint.open(run_copy / "pruned") as checkpoint:
        info = next(i for i in checkpoint.tensors() if i.name.endswith("experts.down_proj"))
    data = bytearray(info.shard.read_bytes())
    data[info.data_offset + 5] ^= 0x40
    info.shard.write_bytes(bytes(data))

    report = verify(str(run_copy), any_run[1])
    text = failures(report)
    assert "kept experts bit-exact" in text and "down_proj" in text


def test_edited_card_number_fails_naming_line_and_number(run_copy):
    readme = run_copy / "card" / "README.md"
    numbers = json.loads((run_copy / "card" / "card_numbers.json").read_text())["numbers"]
    shown = numbers["retention.worst"]["display"]  # e.g. "96.98%"
    text = readme.read_text()
    line = next(l for l in text.splitlines() if l.startswith("Worst case"))
    edited = line.replace(shown, "99.99%")
    readme.write_text(text.replace(line, edited))

    report = verify(str(run_copy))
    detail = failures(report)
    assert "README.md: sha256" in detail
    assert "README.md line" in detail and "'retention.worst' should read" in detail and shown in detail


def test_edited_card_numbers_json_fails_naming_the_key(run_copy):
    path = run_copy / "card" / "card_numbers.json"
    document = json.loads(path.read_text())
    document["numbers"]["params.pruned"]["value"] += 1
    path.write_text(json.dumps(document))
    report = verify(str(run_copy))
    assert "'params.pruned'" in failures(report)


def test_drop_map_that_disagrees_with_weights_fails(run_copy):
    path = run_copy / "expert_drop_metadata.json"
    drop_map = json.loads(path.read_text())
    layer = drop_map["layers"][0]
    layer["keep"], layer["drop"] = sorted(layer["keep"] + layer["drop"][:1]), layer["drop"][1:]
    path.write_text(json.dumps(drop_map))
    report = verify(str(run_copy))
    assert "layer 0: weights hold" in failures(report) or "expert_drop_metadata.json" in failures(report)


def test_unlisted_file_fails(run_copy):
    (run_copy / "pruned" / "extra.bin").write_bytes(b"x")
    report = verify(str(run_copy))
    assert "model:extra.bin: present but not listed" in failures(report)


def test_not_an_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(VerifyError, match="manifest.json"):
        verify(str(tmp_path))


def test_published_repo_id_verifies_from_the_hub(fake_run, tmp_path, monkeypatch):
    """Publish to a local Hub, then verify by repo id: download, re-hash, GGUF checked remotely."""
    import huggingface_hub.constants as constants

    from moeprune.publish import publish

    hf = tmp_path / "hf"
    for name, value in (("HF_HOME", hf), ("HF_HUB_CACHE", hf / "hub"), ("HF_TOKEN_PATH", hf / "token")):
        monkeypatch.setenv(name, str(value))
        monkeypatch.setattr(constants, name, str(value))  # read at import time by huggingface_hub
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # large files through LFS, not Xet
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = tmp_path / "runs" / "fake"
    shutil.copytree(fake_run.layout.root, run)
    from moeprune.layout import RunLayout

    with FakeHub(TOKEN) as hub:
        hub.lfs_threshold_bytes = 50_000  # the larger shards are LFS files
        publish(RunLayout(run), fake_run.recipe.settings(), "me/fake-pruned", "me/fake-pruned-GGUF",
                endpoint=hub.endpoint)
        report = verify("me/fake-pruned", fake_run.base_dir, endpoint=hub.endpoint)
        assert report.ok, failures(report)
        hashed = next(c for c in report.checks if c.name == "sha256 + size")
        assert "not downloaded" in hashed.detail  # only the unpublished base GGUF
        assert any(c.target == "gguf:README.md" and c.ok for c in report.checks)
        card = next(c for c in report.checks if c.name == "card numbers")
        assert "bits per weight as stated (GGUF not downloaded): base-Q4_K_M.gguf, fake-Q4_K_M.gguf, " \
               "fake-Q8_0.gguf" in card.detail

        # Tamper on the "Hub": the pruned GGUF no longer matches the manifest.
        repo = hub.repos["me/fake-pruned-GGUF"]
        files = dict(repo.commits[repo.head])
        files["fake-Q4_K_M.gguf"] = b"GGUF tampered"
        repo.commits["e" * 40] = files
        repo.history.append("e" * 40)
        report = verify("me/fake-pruned", endpoint=hub.endpoint)
        assert "gguf:fake-Q4_K_M.gguf" in failures(report)

        # A stated fallback count that the downloaded quantize record contradicts (the GGUF itself is not
        # downloaded): re-counted from the record, so it fails.
        model = hub.repos["me/fake-pruned"]
        files = dict(model.commits[model.head])
        document = json.loads(files["card_numbers.json"])
        key = "gguf.fallback.fake-Q4_K_M.gguf.Q4_K->Q5_0"
        document["numbers"][key] |= {"value": 7, "display": "7"}
        files["card_numbers.json"] = json.dumps(document).encode()
        model.commits["f" * 40] = files
        model.history.append("f" * 40)
        assert f"card_numbers.json: '{key}' = '7' (7), recomputed '1' (1)" in failures(verify("me/fake-pruned",
                                                                                              endpoint=hub.endpoint))


def test_invoke_verify_exit_code(fake_run, run_copy, repo_root):
    ok = invoke("verify", str(fake_run.layout.root), cwd=repo_root)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    (run_copy / "card" / "plots" / "gini.png").write_bytes(b"not a plot")
    bad = invoke("verify", str(run_copy), cwd=repo_root)
    assert bad.returncode == 1
    assert "plots/gini.png" in bad.stdout


def test_invoke_publish_dry_run_lists_files_with_sizes(fake_run, repo_root, tmp_path):
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(fake_run.layout.root.parent), "COLUMNS": "200"}
    env.pop("HF_TOKEN", None)
    root = fake_run.layout.root
    before = {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
              for p in sorted(root.rglob("*")) if p.is_file()}
    result = invoke("publish", "--recipe", str(fake_run.recipe.source_path), "--dry-run",
                    "--repo-id", "someone-else/other-name", cwd=repo_root, env=env, inherit_env=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would upload to someone-else/other-name (model)" in result.stdout
    after = {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in sorted(root.rglob("*")) if p.is_file()}
    assert after == before, "publish --dry-run changed the run (card re-rendered or manifest rewritten)"
    result = invoke("publish", "--recipe", str(fake_run.recipe.source_path), "--dry-run", cwd=repo_root, env=env,
                    inherit_env=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would upload to me/fake-pruned (model)" in result.stdout
    assert "would upload to me/fake-pruned-GGUF (gguf)" in result.stdout
    assert "model-00001-of-" in result.stdout and "KiB" in result.stdout
    assert "base-Q4_K_M.gguf" not in result.stdout


def test_stated_bits_per_weight_that_disagrees_with_the_gguf_fails(fake_run, tmp_path, repo_root):
    """card_numbers.json and both cards edited alike to a wrong bits per weight: `invoke verify`
    re-reads the GGUF and fails, naming the file and both values."""
    run = tmp_path / "runs" / "fake"
    shutil.copytree(fake_run.layout.root, run, ignore=shutil.ignore_patterns("logs"))
    key = "gguf.bpw.fake-Q4_K_M.gguf"
    path = run / "card" / "card_numbers.json"
    document = json.loads(path.read_text())
    true, true_value = document["numbers"][key]["display"], document["numbers"][key]["value"]
    document["numbers"][key] = document["numbers"][key] | {"value": 4.5, "display": "4.50"}
    path.write_text(json.dumps(document))
    for readme in (run / "card" / "README.md", run / "card" / "gguf" / "README.md"):
        text = readme.read_text()
        assert f" {true} " in text
        readme.write_text(text.replace(f" {true} ", " 4.50 "))
    result = invoke("verify", str(run), cwd=repo_root, env={"COLUMNS": "2000"})
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"card_numbers.json: '{key}' = '4.50' (4.5), recomputed '{true}' "
            f"({true_value!r}) from gguf/fake-Q4_K_M.gguf") in result.stdout, result.stdout


def test_edited_gguf_card_fails(run_copy):
    readme = run_copy / "card" / "gguf" / "README.md"
    numbers = json.loads((run_copy / "card" / "card_numbers.json").read_text())["numbers"]
    shown = next(n["display"] for key, n in numbers.items() if key.startswith("gguf.file."))
    text = readme.read_text()
    assert f"| {shown} |" in text
    readme.write_text(text.replace(f"| {shown} |", "| 9.99 GB |", 1))
    detail = failures(verify(str(run_copy)))
    assert "gguf:README.md: sha256" in detail and "gguf:README.md line" in detail


def test_publish_to_other_repo_ids_retargets_the_card(run_copy, tmp_path, monkeypatch):
    """--repo-id differing from the recipe: the card's links and code point at the real repos."""
    import huggingface_hub.constants as constants

    from moeprune.layout import RunLayout
    from moeprune.publish import publish

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = json.loads((run_copy / "manifest.json").read_text())["recipe"]
    with FakeHub(TOKEN) as hub:
        publish(RunLayout(run_copy), settings, "org/other", "org/other-GGUF", endpoint=hub.endpoint)
        card = hub.repos["org/other"].commits[hub.repos["org/other"].head]["README.md"].decode()
        assert 'from_pretrained("org/other"' in card and "(https://huggingface.co/org/other-GGUF)" in card
        gguf_card = hub.repos["org/other-GGUF"].commits[hub.repos["org/other-GGUF"].head]["README.md"].decode()
        assert "base_model: org/other" in gguf_card
    assert verify(str(run_copy)).ok
