"""One writer per run (issue 22): the run's writer lock, its message, --wait, and the sweep of a
dead writer's temporaries. The whole-pipeline cases are in test_reproduce.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from invoke_cli import invoke

from moeprune.layout import RunLayout
from moeprune.runlock import WRITER_ENV, RunInUse, run_writer

ROOT = Path(__file__).resolve().parents[1]

HOLDER = textwrap.dedent(
    """
    import pathlib, sys
    from moeprune.layout import RunLayout
    from moeprune.runlock import run_writer

    layout = RunLayout(pathlib.Path(sys.argv[1]))
    with run_writer(layout, "invoke test-holder"):
        (layout.root / "gguf").mkdir(exist_ok=True)
        (layout.root / "gguf" / ".base-F32.gguf.tmp-live").write_text("a live writer's partial output")
        print("held", flush=True)
        sys.stdin.readline()  # hold until the test closes stdin (or kills us)
    """
)


@pytest.fixture
def layout(tmp_path) -> RunLayout:
    return RunLayout(tmp_path / "runs" / "demo")


@pytest.fixture
def holder(layout):
    """Start another process holding ``layout``'s run; yields the Popen (stdin closes to release)."""
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != WRITER_ENV}
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(layout.root)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True, env=env)
        started.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def live_temporary(layout: RunLayout) -> Path:
    return layout.root / "gguf" / ".base-F32.gguf.tmp-live"


def test_second_invoke_fails_at_once_naming_the_holder_and_touches_nothing(layout, holder):
    first = holder()
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(layout.root.parent)}
    env.pop(WRITER_ENV, None)
    started = time.monotonic()
    second = invoke("stage", "card", env=env, inherit_env=False, timeout=120)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert lines[0].startswith(f"error: {layout.root} is in use by PID {first.pid} (invoke test-holder) since ")
    assert lines[0].endswith(" UTC; wait for it or pass --wait")
    assert time.monotonic() - started < 60  # invoke's start-up; it never waits for the holder
    assert live_temporary(layout).read_text() == "a live writer's partial output"
    assert json.loads(layout.writer_path.read_text())["pid"] == first.pid


def test_stale_temporaries_of_a_killed_writer_are_swept_when_the_next_one_starts(layout, holder):
    killed = holder()
    nested = layout.root / "profile" / ".stats.safetensors.tmp-abc"
    nested.mkdir(parents=True)
    (nested / "part").write_text("x")
    kept = layout.root / "gguf" / "base-F32.gguf"
    kept.write_text("a finished output")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert live_temporary(layout).exists() and layout.writer_path.exists()  # kill -9 cleans nothing

    with run_writer(layout, "invoke reproduce"):
        assert not live_temporary(layout).exists() and not nested.exists()
        assert kept.read_text() == "a finished output"
        assert json.loads(layout.writer_path.read_text())["pid"] == os.getpid()
    assert not layout.writer_path.exists()


def test_wait_blocks_until_the_holder_exits(layout, holder):
    first = holder()
    said: list[str] = []
    acquired = threading.Event()

    def waiter():
        with run_writer(layout, "invoke reproduce", wait=True, say=said.append):
            acquired.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert not acquired.wait(2.0), "took the lock while another process held it"
        assert said and f"in use by PID {first.pid} (invoke test-holder)" in said[0] and said[0].endswith("waiting")
        assert live_temporary(layout).exists()
    finally:
        first.stdin.close()  # the holder leaves its block (its temporary stays: it only ever unlinks on success)
    assert acquired.wait(30.0)
    thread.join(30)
    assert first.wait(30) == 0
    assert not live_temporary(layout).exists(), "the exited writer's temporary went when the waiter took over"


def test_without_wait_the_lock_is_refused_in_process_too(layout, holder):
    first = holder()
    with pytest.raises(RunInUse, match=f"in use by PID {first.pid} "):
        with run_writer(layout, "invoke reproduce"):
            pass


def test_a_process_the_holder_starts_works_under_its_lock_and_others_do_not(layout):
    child = textwrap.dedent(
        """
        import pathlib, sys
        from moeprune.layout import RunLayout
        from moeprune.runlock import run_writer
        with run_writer(RunLayout(pathlib.Path(sys.argv[1])), "invoke stage card"):
            print("inside")
        """
    )
    with run_writer(layout, "invoke reproduce"):
        with run_writer(layout, "nested in the same process"):  # re-entrant
            pass
        ours = layout.root / ".card.tmp-live"
        ours.write_text("partial")
        started_by_us = subprocess.run([sys.executable, "-c", child, str(layout.root)], capture_output=True,
                                       text=True, timeout=60)
        assert started_by_us.returncode == 0 and started_by_us.stdout.strip() == "inside", started_by_us.stderr
        assert ours.exists(), "a process working under the holder's lock sweeps nothing"
        # what the docker runner does for `invoke reproduce`: `invoke stage NAME`, our token passed along
        inner = invoke("stage", "card", env={"MOEPRUNE_RUNS_DIR": str(layout.root.parent)}, timeout=120)
        assert "in use" not in inner.stderr and "results.json: not found" in inner.stderr, inner.stderr
        stranger = subprocess.run([sys.executable, "-c", child, str(layout.root)], capture_output=True, text=True,
                                  timeout=60, env={k: v for k, v in os.environ.items() if k != WRITER_ENV})
        assert stranger.returncode != 0 and f"in use by PID {os.getpid()} (invoke reproduce)" in stranger.stderr
    assert WRITER_ENV not in os.environ


def test_a_task_that_wrote_nothing_leaves_no_directory(tmp_path):
    layout = RunLayout(tmp_path / "new" / "runs" / "demo")
    with run_writer(layout, "invoke card"):
        assert layout.writer_path.is_file()
    assert not (tmp_path / "new").exists()
