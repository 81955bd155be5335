"""Shared test fixtures."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
def family_models(tmp_path_factory, llama_build_shared) -> dict[str, Path]:
    """One tiny random model per supported MoE family, in its Hub on-disk layout (shared, read-only).

    The tokenizer is GPT-2's, rebuilt from the pinned llama.cpp tree (see tests/families.py).
    """
    from families import FAMILIES, build_family_model, gpt2_vocab

    root = tmp_path_factory.mktemp("families")
    vocab = gpt2_vocab(llama_build_shared.root)
    return {name: build_family_model(name, root / name, vocab) for name in FAMILIES}
