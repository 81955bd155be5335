"""Publishing against a real HTTP server on 127.0.0.1 that speaks the Hub endpoints we use."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hub_server import FakeHub, git_blob_id

from moeprune.hashing import sha256_file
from moeprune.layout import RunLayout
from moeprune.manifest import artifact_files, build_manifest
from moeprune.publish import PublishError, publish, redact

TOKEN = "hf_testtoken_0123456789abcdefghij"
SETTINGS = {"name": "tiny", "model": {"base": "base"}}


@pytest.fixture(autouse=True)
def _online(monkeypatch, tmp_path):
    """Redirect every Hub path to tmp and allow HTTP (to 127.0.0.1 only: the endpoint is explicit)."""
    import huggingface_hub.constants as constants

    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(hf / "token"))
    # huggingface_hub reads these at import time: patch the constants too
    monkeypatch.setattr(constants, "HF_HOME", str(hf))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)


def make_run(root: Path) -> RunLayout:
    """A small run directory: a 'checkpoint', card, eval log, GGUF files (no schema'd JSON)."""
    layout = RunLayout(root / "tiny")
    pruned = layout.pruned_dir
    pruned.mkdir(parents=True)
    (pruned / "config.json").write_text(json.dumps({"num_experts": 12}))
    for i in range(1, 3):
        (pruned / f"model-0000{i}-of-00002.safetensors").write_bytes(os.urandom(3000 + i))
    (pruned / "tokenizer.json").write_text("{}")
    layout.card_dir.mkdir()
    (layout.card_dir / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- moe\n---\n# tiny\n")
    (layout.card_dir / "plots").mkdir()
    (layout.card_dir / "plots" / "retention.png").write_bytes(b"\x89PNG fake")
    (layout.eval_dir / "pruned").mkdir(parents=True)
    (layout.eval_dir / "pruned" / "samples_demo.jsonl").write_text('{"doc_id": 0}\n')
    layout.gguf_dir.mkdir()
    (layout.gguf_dir / "pruned-Q4_K_M.gguf").write_bytes(os.urandom(2000))
    (layout.gguf_dir / "base-Q4_K_M.gguf").write_bytes(os.urandom(2500))
    return layout


def publish_minimal(layout: RunLayout, *args, **kwargs):
    """Publish a minimal run (no drop map, eval or card numbers: it cannot pass the audit)."""
    return publish(layout, SETTINGS, *args, audit=False, **kwargs)


def remote_files(hub: FakeHub, repo_id: str) -> dict[str, bytes]:
    return hub.repos[repo_id].commits[hub.repos[repo_id].head]


def test_manifest_lists_every_file_sorted_with_hashes(tmp_path):
    layout = make_run(tmp_path)
    manifest = build_manifest(layout, SETTINGS, {"repo_ids": {"model": "me/tiny", "gguf": None}})
    paths = [(f["repo"], f["path"]) for f in manifest["files"]]
    assert paths == sorted(paths)
    assert ("model", "model-00001-of-00002.safetensors") in paths
    assert ("model", "README.md") in paths and ("model", "plots/retention.png") in paths
    assert ("model", "eval/pruned/samples_demo.jsonl") in paths
    assert ("gguf", "pruned-Q4_K_M.gguf") in paths
    # the base GGUF is measured, not published
    assert [f["path"] for f in manifest["unpublished"]] == ["base-Q4_K_M.gguf"]
    entry = next(f for f in manifest["files"] if f["path"] == "config.json")
    assert entry["sha256"] == sha256_file(layout.pruned_dir / "config.json")
    assert entry["size_bytes"] == (layout.pruned_dir / "config.json").stat().st_size
    assert manifest["code"]["moeprune"]
    from moeprune.schemas import validate

    validate("manifest", manifest)


def test_dry_run_lists_files_and_sizes_without_network(tmp_path):
    layout = make_run(tmp_path)
    before = _snapshot(layout.root)
    report = publish_minimal(layout, "me/tiny", "me/tiny-GGUF", dry_run=True, endpoint="http://127.0.0.1:9")
    kinds = {r.kind: r for r in report.repos}
    assert ("pruned-Q4_K_M.gguf", 2000) in kinds["gguf"].files
    assert "manifest.json" in dict(kinds["model"].files)  # rendered in a temporary copy
    assert all(r.commit_oid is None for r in report.repos)
    # Issue 15: a dry run touches nothing (no manifest written, no card re-rendered).
    assert _snapshot(layout.root) == before
    assert not layout.manifest_path.exists()


def _snapshot(root):
    """{relative path: (bytes, mtime_ns)} of every file below root, links included."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def test_publish_one_commit_per_repo_and_read_back(tmp_path):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        report = publish_minimal(layout, "me/tiny", "me/tiny-GGUF", endpoint=hub.endpoint)
        commits = [r for r in hub.requests if r[0] == "POST" and "/commit/" in r[1]]
        assert len(commits) == 2  # exactly one commit per repository
        model = remote_files(hub, "me/tiny")
        published, _ = artifact_files(layout, {})
        for item in published:
            repo = "me/tiny" if item.repo == "model" else "me/tiny-GGUF"
            assert remote_files(hub, repo)[item.path_in_repo] == item.local_path.read_bytes()
        manifest = json.loads(model["manifest.json"])
        assert manifest["repo_ids"] == {"model": "me/tiny", "gguf": "me/tiny-GGUF"}
        assert "base-Q4_K_M.gguf" not in remote_files(hub, "me/tiny-GGUF")
        assert {r.kind: r.verified for r in report.repos} == {"gguf": 1, "model": len(model) - 1}


def test_republish_removes_stale_files_in_the_same_commit(tmp_path):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
        (layout.pruned_dir / "model-00002-of-00002.safetensors").unlink()
        report = publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
        assert report.repos[0].deleted == ["model-00002-of-00002.safetensors"]
        assert "model-00002-of-00002.safetensors" not in remote_files(hub, "me/tiny")


def test_failed_commit_leaves_repo_untouched_and_hides_token(tmp_path):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        hub.create("me/tiny")
        before = hub.repos["me/tiny"].head
        hub.fail_commit = 500
        with pytest.raises(PublishError) as err:
            publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
        assert hub.repos["me/tiny"].history == [before]
        assert set(remote_files(hub, "me/tiny")) == {".gitattributes"}
        assert TOKEN not in str(err.value)
        assert "me/tiny" in str(err.value) and "nothing was committed" in str(err.value)


def test_concurrent_change_is_refused_by_parent_commit(tmp_path, monkeypatch):
    """Another writer commits between our read of the head and our commit: ours must fail."""
    layout = make_run(tmp_path)
    from huggingface_hub import HfApi

    original = HfApi.create_commit

    def racing_commit(self, repo_id, **kwargs):
        hub.repos[repo_id].history.append(hub.repos[repo_id].head)  # someone else moved main
        hub.repos[repo_id].commits["f" * 40] = {"other.txt": b"x"}
        hub.repos[repo_id].history[-1] = "f" * 40
        return original(self, repo_id, **kwargs)

    with FakeHub(TOKEN) as hub:
        monkeypatch.setattr(HfApi, "create_commit", racing_commit)
        with pytest.raises(PublishError, match="412|commit has happened"):
            publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
        assert remote_files(hub, "me/tiny") == {"other.txt": b"x"}


def test_missing_token_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    layout = make_run(tmp_path)
    with pytest.raises(PublishError, match="HF_TOKEN"):
        publish_minimal(layout, "me/tiny", endpoint="http://127.0.0.1:9")


def test_wrong_token_error_is_redacted(tmp_path, monkeypatch):
    bad = "hf_wrongtoken_abcdefghijklmnopqrstu"
    monkeypatch.setenv("HF_TOKEN", bad)
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        with pytest.raises(PublishError) as err:
            publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
    assert bad not in str(err.value)
    assert not layout.manifest_path.read_text().count(bad)


def test_read_back_detects_a_remote_file_that_differs(tmp_path, monkeypatch):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        import hub_server

        real = hub_server.git_blob_id

        def corrupt(data: bytes) -> str:
            return "0" * 40 if data == (layout.pruned_dir / "tokenizer.json").read_bytes() else real(data)

        monkeypatch.setattr(hub_server, "git_blob_id", corrupt)
        with pytest.raises(PublishError, match="tokenizer.json"):
            publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)


def test_redact_removes_token_shapes():
    assert redact(f"Bearer {TOKEN} failed", TOKEN) == "Bearer *** failed"
    assert "hf_abcdefghijkl" not in redact("token hf_abcdefghijklmnop leaked", None)


def test_blob_id_matches_git(tmp_path):
    from moeprune.publish import git_blob_id as ours

    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert ours(path) == git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


@pytest.fixture
def lfs_without_xet(monkeypatch):
    """Large files go through the LFS batch API + PUT (the Hub's Xet storage is not emulated)."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def test_lfs_sized_files_are_uploaded_then_committed_and_read_back_by_sha256(tmp_path, lfs_without_xet):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        hub.lfs_threshold_bytes = 2900  # the ~3 kB shards are LFS; JSON, card and GGUF regular
        report = publish_minimal(layout, "me/tiny", "me/tiny-GGUF", endpoint=hub.endpoint)
        puts = [path for method, path in hub.requests if method == "PUT"]
        assert len(puts) == 2  # the two shards
        from huggingface_hub import HfApi

        tree = {e.path: e for e in HfApi(endpoint=hub.endpoint).list_repo_tree("me/tiny", recursive=True, expand=True)}
        shard = tree["model-00001-of-00002.safetensors"]
        assert shard.lfs is not None
        assert shard.lfs.sha256 == sha256_file(layout.pruned_dir / "model-00001-of-00002.safetensors")
        assert tree["config.json"].lfs is None
        assert all(r.verified for r in report.repos)


def test_failure_after_lfs_upload_commits_nothing(tmp_path, lfs_without_xet):
    """The large files reach storage, then the commit fails: the branch must not move."""
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        hub.lfs_threshold_bytes = 2900
        hub.create("me/tiny")
        before = list(hub.repos["me/tiny"].history)
        hub.fail_commit = 500
        with pytest.raises(PublishError, match="nothing was committed"):
            publish_minimal(layout, "me/tiny", endpoint=hub.endpoint)
        assert len(hub.lfs_objects) == 2  # uploaded ...
        assert hub.repos["me/tiny"].history == before  # ... but not committed
        assert set(remote_files(hub, "me/tiny")) == {".gitattributes"}


def test_manifest_records_container_digest_and_llamacpp_build(tmp_path):
    layout = make_run(tmp_path)
    layout.lock_path.write_text(json.dumps({"format_version": 1, "stages": {"prune": {"runner": {
        "kind": "docker", "image": {"ref": "moeprune:cuda", "id": "sha256:" + "a" * 64,
                                    "repo_digests": ["moeprune@sha256:" + "b" * 64]}}}}}))
    (layout.gguf_dir / "tiny-Q4_K_M.gguf.json").write_text(json.dumps({"llamacpp_key": "k1", "llama_cpp_commit": "c1"}))
    manifest = build_manifest(layout, SETTINGS)
    assert manifest["container"] == {"image": "moeprune:cuda", "digest": "sha256:" + "b" * 64}
    assert manifest["llamacpp"] == {"key": "k1", "llama_cpp_commit": "c1"}
    # the lock is rewritten after the manifest stage: never part of the hashed artifact
    assert ("model", "run.lock.json") not in {(f["repo"], f["path"]) for f in manifest["files"]}


def test_run_failing_its_audit_is_not_uploaded(tmp_path):
    """The full fake run with one card number edited: publish refuses before any request."""
    from fakerun import make_fake_run

    run = make_fake_run(tmp_path / "work")
    readme = run.layout.card_dir / "README.md"
    readme.write_text(readme.read_text().replace("## Pruning decision", "## Pruning decision (99.99% safe)"))
    with FakeHub(TOKEN) as hub:
        with pytest.raises(PublishError, match="fails its own audit") as err:
            publish(run.layout, run.recipe.settings(), "me/fake-pruned", "me/fake-pruned-GGUF", endpoint=hub.endpoint)
        assert "README.md line" in str(err.value)
        assert hub.requests == []


def test_run_manifest_takes_tools_from_the_pipeline(tmp_path):
    from types import SimpleNamespace

    from moeprune.manifest import run_manifest

    layout = make_run(tmp_path)
    recipe = SimpleNamespace(
        publish=SimpleNamespace(repo_id="me/tiny", gguf_repo_id=None),
        runner=SimpleNamespace(image="moeprune:cuda"),
        settings=lambda: SETTINGS,
    )
    manifest = run_manifest(recipe, layout, tools={"llamacpp": {"key": "k"}, "image_digest": "sha256:" + "c" * 64})
    assert manifest["container"] == {"image": "moeprune:cuda", "digest": "sha256:" + "c" * 64}
    assert manifest["llamacpp"] == {"key": "k"}
    assert json.loads(layout.manifest_path.read_text()) == manifest


def test_gguf_repo_failure_names_what_was_already_published(tmp_path):
    layout = make_run(tmp_path)
    with FakeHub(TOKEN) as hub:
        hub.create("me/tiny-GGUF")
        hub.fail_commit, hub.fail_commit_repo = 500, "me/tiny-GGUF"
        with pytest.raises(PublishError) as err:
            publish_minimal(layout, "me/tiny", "me/tiny-GGUF", endpoint=hub.endpoint)
        message = str(err.value)
        assert "publishing to me/tiny-GGUF failed, nothing was committed there" in message
        assert f"already published: me/tiny at {hub.repos['me/tiny'].head}" in message
        assert set(remote_files(hub, "me/tiny-GGUF")) == {".gitattributes"}
