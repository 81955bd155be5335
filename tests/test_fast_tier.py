"""`invoke test --fast` (``-m "not slow"``) builds no model, starts no server and builds no llama.cpp.

Collected in a separate pytest process (the tier is what that command line selects, whatever this
session was asked to run), with a plugin that writes what every selected test requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SLOW_FIXTURES, SLOW_MARKERS

from moeprune.errors import MoepruneError

ROOT = Path(__file__).resolve().parents[1]

RECORDER = """
import json, os

def pytest_collection_finish(session):
    selected = {item.nodeid: {"fixtures": sorted(item.fixturenames),
                              "markers": sorted({m.name for m in item.iter_markers()})}
                for item in session.items}
    with open(os.environ["FAST_TIER_OUT"], "w") as out:
        json.dump(selected, out)
"""


def _selected(tmp_path: Path, *marker_args: str) -> dict[str, dict[str, list[str]]]:
    """nodeid -> {"fixtures", "markers"} of the tests `pytest tests *marker_args` would run."""
    (tmp_path / "fast_tier_recorder.py").write_text(RECORDER)
    out = tmp_path / "selected.json"
    env_path = f"{tmp_path}:{ROOT / 'src'}"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "fast_tier_recorder",
         *marker_args, "tests"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": env_path, "FAST_TIER_OUT": str(out)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_fast_tier_requests_no_demo_run_no_family_models_no_llamacpp_and_no_docker(tmp_path):
    fast = _selected(tmp_path, "-m", "not slow")
    heavy = {node: sorted(set(got["fixtures"]) & set(SLOW_FIXTURES) | set(got["markers"]) & set(SLOW_MARKERS))
             for node, got in fast.items()}
    assert {node: why for node, why in heavy.items() if why} == {}
    # Tests that ask for the demo run through another fixture and carry no marker of their own
    # (8dc2f54 ran them under --fast: a whole demo reproduce) are left out.
    assert "tests/test_audit.py::test_command_line_exits_1_naming_the_file_and_both_values" not in fast
    assert "tests/test_families.py::test_grouped_routing_refuses_unbalanced_groups" not in fast
    assert len(fast) > 300, "the fast tier is most of the suite"


def test_a_fast_test_finds_no_llamacpp_to_build_from():
    """The fast tier runs with an empty moeprune cache and no package index: a test that reaches
    for the pinned llama.cpp without a slow fixture or marker fails instead of building it."""
    from moeprune.llamacpp.source import cache_root, ensure_source
    from moeprune.recipe import LlamaCppSection

    assert not (cache_root() / "llama.cpp").exists()
    with pytest.raises(MoepruneError, match="could not download"):
        ensure_source(LlamaCppSection())
