"""Shared test fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Fixtures that build or start something that takes minutes or a machine resource: a test whose
# fixture closure (pytest's ``item.fixturenames``, transitive) holds one is in the slow tier.
SLOW_FIXTURES: dict[str, str] = {
    "demo_run": "a complete `invoke reproduce` of the demo recipe",
    "recalibrated_run": "the demo reproduced up to the recalibrate stage (test_recalibrate.py)",
    "recalibrated_full_run": "the demo reproduced to the end with [recalibrate] on (test_recalibrated_card.py)",
    "family_models": "the tiny models of every family (transformers builds, the GPT-2 vocabulary)",
    "llama_source_shared": "the pinned llama.cpp source tree (downloaded on first use)",
    "llama_build_shared": "the pinned llama.cpp build (compiled on first use)",
    "docker_client": "a running Docker engine",
}
# Markers for what a test builds or starts without one of those fixtures.
SLOW_MARKERS: dict[str, str] = {
    "llamacpp": "the real llama.cpp build (or a real llama-server)",
    "docker": "a running Docker engine",
}


def slow_reason(item: pytest.Item) -> str | None:
    """Why ``item`` belongs in the slow tier, or None: the first heavy fixture or marker it has."""
    for name, why in SLOW_FIXTURES.items():
        if name in item.fixturenames:
            return f"{name}: {why}"
    for name, why in SLOW_MARKERS.items():
        if item.get_closest_marker(name) is not None:
            return f"@{name}: {why}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark slow whatever needs the demo run, the family models, llama.cpp or Docker.

    Derived from what each test requests, so a new test that asks for ``demo_run`` is slow without
    anyone remembering a marker, and `invoke test --fast` (``-m "not slow"``) builds nothing."""
    for item in items:
        if item.get_closest_marker("slow") is None and slow_reason(item) is not None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _fast_tier_has_no_llamacpp_and_no_docker(request, tmp_path_factory, monkeypatch):
    """A test of the fast tier runs with an empty moeprune cache, no package index and no Docker.

    A test that reaches for llama.cpp (in this process or a subprocess) without a slow fixture or
    marker then fails (the pinned source cannot be fetched) instead of quietly building it, and
    the same holds in the full suite, so a misclassified test is caught wherever it runs."""
    if request.node.get_closest_marker("slow") is not None:
        return
    monkeypatch.setenv("MOEPRUNE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "fast-tier-empty-cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/moeprune-fast-tier/docker.sock")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Never touch the user's Hugging Face cache or token, never reach the Hub."""
    hf = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_TOKEN_PATH", str(hf / "token"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _no_llama_server_left_behind():
    """After the whole session, no llama-server started by any test may still be running."""
    yield
    from moeprune.llamacpp.server import leftover_servers

    leftovers = leftover_servers()
    for pid in leftovers:  # clean up first, then fail loudly
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"llama-server processes left behind by the test session: {leftovers}"


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """One complete, uninterrupted `invoke reproduce` of the demo recipe (shared, read-only).

    Runs the real pipeline (minutes); tests that modify a run copy it first.
    """
    import subprocess
    import sys

    runs = tmp_path_factory.mktemp("demo-runs")
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "invoke", "reproduce", "--no-live"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert result.returncode == 0, f"demo reproduce failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return runs / "demo"


@pytest.fixture(scope="session")
def llama_build_shared():
    """The pinned llama.cpp build (built once into the cache, then reused)."""
    from moeprune.llamacpp.build import ensure_llamacpp
    from moeprune.recipe import LlamaCppSection

    return ensure_llamacpp(LlamaCppSection(), say=print)


@pytest.fixture(scope="session")
def llama_source_shared():
    """The pinned llama.cpp source tree (the sdist unpacked and verified; nothing compiled)."""
    from moeprune.llamacpp.source import ensure_source
    from moeprune.recipe import LlamaCppSection

    return ensure_source(LlamaCppSection())


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, llama_source_shared) -> dict[str, Path]:
    """One tiny random model per supported MoE family, in its Hub on-disk layout (shared, read-only),
    each built on first use (``-k <family>`` builds only that family's).

    The tokenizer is GPT-2's, rebuilt from the pinned llama.cpp source tree (see tests/families.py):
    only the vocabulary file is read, so these tests do not wait for a llama.cpp build.
    """
    from families import FAMILIES, Lazy, build_family_model, gpt2_vocab

    root = tmp_path_factory.mktemp("families")
    vocab = gpt2_vocab(llama_source_shared.root)
    return Lazy(FAMILIES, lambda name: build_family_model(name, root / name, vocab))
