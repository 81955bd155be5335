"""Issue 15: every fault ends in a clear MoepruneError naming the file, leaves the previous good
state in place, and a rerun recovers.

Full and read-only disks are simulated without privileges: ``os.fsync``/``os.replace``/
``tempfile.mkstemp`` patched to raise ENOSPC/EROFS inside the process, and, for the real entry
points, ``ulimit -f`` (RLIMIT_FSIZE, which root cannot bypass) with SIGXFSZ ignored, so a write past
the limit fails with EFBIG exactly where a full disk would fail.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from moeprune.atomic import WriteError, atomic_dir, atomic_file, write_json
from moeprune.errors import MoepruneError
from fakerun import demo_recipe_text

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "src" / "moeprune" / "demo" / "model"


def _raise(code):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(args[0]) if args and isinstance(args[0], (str, Path)) else None)

    return fail


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in Path(directory).rglob(".*") if ".tmp-" in p.name or ".old-" in p.name)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the atomic writers -----------------------------------------------------------------------
@pytest.mark.parametrize("where,code", [("fsync", errno.ENOSPC), ("replace", errno.EROFS),
                                        ("mkstemp", errno.EROFS), ("mkstemp", errno.EACCES),
                                        ("fsync", errno.EDQUOT)])
def test_atomic_file_fault_keeps_the_old_file(tmp_path, monkeypatch, where, code):
    target = tmp_path / "out" / "value.json"
    write_json(target, {"good": 1})
    good = target.read_bytes()
    patch = {"fsync": (os, "fsync"), "replace": (os, "replace"), "mkstemp": (tempfile, "mkstemp")}[where]
    with monkeypatch.context() as m:
        m.setattr(*patch, _raise(code))
        with pytest.raises(WriteError) as caught:
            write_json(target, {"bad": 2})
    message = str(caught.value)
    assert str(target) in message and "then rerun" in message and "unchanged" in message
    assert ("free disk space" in message) == (code in (errno.ENOSPC, errno.EDQUOT))
    assert target.read_bytes() == good
    assert _leftovers(tmp_path) == []
    write_json(target, {"bad": 2})  # rerun once the disk is fine
    assert json.loads(target.read_text()) == {"bad": 2}


def test_atomic_dir_fault_keeps_the_old_directory(tmp_path, monkeypatch):
    final = tmp_path / "card"
    with atomic_dir(final) as tmp:
        (tmp / "README.md").write_text("good")
    real_replace = os.replace
    calls = []

    def replace_fails_second_time(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, new one cannot move in: the old one goes back
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_second_time)
    with pytest.raises(WriteError, match="card: cannot write"):
        with atomic_dir(final) as tmp:
            (tmp / "README.md").write_text("new")
    monkeypatch.undo()
    assert (final / "README.md").read_text() == "good"
    assert _leftovers(tmp_path) == []


def test_write_error_in_the_body_of_atomic_file(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("good")
    with pytest.raises(WriteError, match="disk is full"):
        with atomic_file(target) as handle:
            handle.write("partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "good" and _leftovers(tmp_path) == []


# --- lock writer and hash cache ------------------------------------------------------------------
def test_lock_write_failure_is_a_clear_error_and_keeps_the_lock(tmp_path, monkeypatch):
    from moeprune.pipeline.lock import Lock

    lock = Lock(tmp_path / "run.lock.json")
    lock.record("profile", {"cmd": "x"})
    good = lock.path.read_bytes()
    monkeypatch.setattr(os, "fsync", _raise(errno.ENOSPC))
    with pytest.raises(WriteError, match="run.lock.json: cannot write this output: the disk is full"):
        Lock.load(lock.path).record("dropmap", {"cmd": "y"})
    monkeypatch.undo()
    assert lock.path.read_bytes() == good and _leftovers(tmp_path) == []
    Lock.load(lock.path).record("dropmap", {"cmd": "y"})
    assert set(Lock.load(lock.path).stages) == {"profile", "dropmap"}


def test_hash_cache_that_cannot_be_saved_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    from moeprune.pipeline.fingerprint import HashCache

    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 100)
    cache = HashCache(tmp_path / ".hashcache.json")
    cache.file(data)
    monkeypatch.setattr(tempfile, "mkstemp", _raise(errno.EROFS))
    message = cache.save()
    assert message and "could not save the hash cache" in message and "read-only" in message
    assert "could not save the hash cache" in capsys.readouterr().err
    monkeypatch.undo()
    assert not (tmp_path / ".hashcache.json").exists() and _leftovers(tmp_path) == []
    assert cache.save() is None and (tmp_path / ".hashcache.json").is_file()  # recovers


def test_stage_disk_error_is_not_hidden_by_the_hash_cache(tmp_path, monkeypatch):
    """The old `finally: hashes.save()` raised its own OSError over the stage's."""
    from moeprune.layout import RunLayout
    from moeprune.pipeline.graph import Context, Pipeline, Stage

    layout = RunLayout(tmp_path / "run")
    src = tmp_path / "input.txt"
    src.write_text("in")

    def action(ctx):
        # the hash cache will fail too (mkstemp), after the stage failed with a full disk
        monkeypatch.setattr(tempfile, "mkstemp", _raise(errno.ENOSPC))
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.layout.root / "out.txt"))

    stage = Stage("s", "test", action, deps=lambda c: [src], outs=lambda c: [c.layout.root / "out.txt"],
                  params=lambda r: {})
    with pytest.raises(MoepruneError) as caught:
        Pipeline([stage]).run(Context(recipe=None, layout=layout))  # type: ignore[arg-type]
    message = str(caught.value)
    assert message.startswith("stage 's': ") and "out.txt: cannot write" in message and "disk is full" in message


# --- the real entry points under a full disk (ulimit -f) ------------------------------------------
def _limited(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return preexec


def _invoke(args, env, limit_bytes=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "invoke", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900, preexec_fn=_limited(limit_bytes) if limit_bytes else None)


@pytest.fixture
def demo_copy(demo_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(demo_run, runs / "demo", symlinks=True)
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    return runs / "demo", env


@pytest.mark.slow
@pytest.mark.parametrize("task,output,limit", [
    ("dropmap", "expert_drop_metadata.json", 2000),
    ("card", "card", 20000),
])
def test_full_disk_in_dropmap_and_card_via_invoke(demo_copy, task, output, limit):
    run, env = demo_copy
    before = _tree(run)
    result = _invoke([task], env, limit_bytes=limit)
    combined = result.stdout + result.stderr
    assert result.returncode != 0, combined
    assert "Traceback" not in combined, combined
    assert output in combined and "then rerun" in combined, combined
    assert _leftovers(run) == []
    assert _tree(run) == before, "the previous good output changed"
    result = _invoke([task], env)  # the disk has room again: a rerun recovers, same bytes
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tree(run) == before


def _chattr_works(tmp_path: Path) -> bool:
    probe = tmp_path / "chattr-probe"
    probe.mkdir()
    ok = shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(probe)],
                                                                capture_output=True).returncode == 0
    if ok:
        subprocess.run(["chattr", "-i", str(probe)], check=True)
    return ok


@pytest.mark.slow
@pytest.mark.parametrize("task,output", [("dropmap", "expert_drop_metadata.json"), ("card", "card")])
def test_read_only_run_dir_in_dropmap_and_card_via_invoke(demo_copy, tmp_path, task, output):
    """A read-only directory that stops root too: the immutable attribute (chattr +i)."""
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root; chmod covers non-root users")
    if not _chattr_works(tmp_path):
        pytest.skip("this file system does not support chattr +i")
    run, env = demo_copy
    before = _tree(run)
    subprocess.run(["chattr", "+i", str(run)], check=True)
    try:
        result = _invoke([task], env)
    finally:
        subprocess.run(["chattr", "-i", str(run)], check=True)
    combined = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in combined, combined
    assert output in combined and "writable, then rerun" in combined, combined
    assert _leftovers(run) == [] and _tree(run) == before
    result = _invoke([task], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _tree(run) == before


# --- shards: truncated or corrupt in profile and convert -----------------------------------------
def _damaged_model(tmp_path: Path, how: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    shard = model / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    if how == "truncated":
        shard.write_bytes(data[: len(data) // 2])
    elif how == "header":
        shard.write_bytes(data[:8] + b"{not json" + data[17:])
    else:  # length field larger than the file
        shard.write_bytes((len(data) * 4).to_bytes(8, "little") + data[8:])
    return model


@pytest.mark.parametrize("how", ["truncated", "header", "length"])
def test_damaged_shard_in_profile_names_the_shard(tmp_path, how):
    from moeprune.profile.loading import load_model

    model = _damaged_model(tmp_path, how)
    with pytest.raises(MoepruneError) as caught:
        load_model(model, "float32", "cpu")
    message = str(caught.value)
    assert "model-00002-of-00002.safetensors" in message and "re-download or re-create" in message


@pytest.mark.slow
def test_invoke_profile_with_a_truncated_shard_is_one_clear_line(tmp_path):
    model = _damaged_model(tmp_path, "truncated")
    recipe = demo_recipe_text().replace(f'base = "{ROOT}/src/moeprune/demo/model"', f'base = "{model}"')
    recipe_path = tmp_path / "demo.toml"
    recipe_path.write_text(recipe)
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(tmp_path / "runs")}
    result = _invoke(["profile", "--recipe", str(recipe_path)], env)
    combined = result.stdout + result.stderr
    assert result.returncode == 1, combined
    assert "Traceback" not in combined and "SafetensorError" not in combined
    assert "model-00002-of-00002.safetensors: file is truncated" in combined
    assert not (tmp_path / "runs" / "demo" / "profile" / "stats.safetensors").exists()


@pytest.fixture(scope="module")
def llama_build():
    from moeprune.llamacpp import ensure_llamacpp
    from moeprune.recipe import LlamaCppSection

    return ensure_llamacpp(LlamaCppSection(), say=print)


@pytest.mark.llamacpp
@pytest.mark.parametrize("how", ["truncated", "length"])
def test_damaged_shard_in_convert_names_the_shard_and_writes_nothing(llama_build, tmp_path, how):
    from moeprune.llamacpp.convert import convert_to_gguf

    model = _damaged_model(tmp_path, how)
    out = tmp_path / "gguf" / "base-F32.gguf"
    with pytest.raises(MoepruneError) as caught:
        convert_to_gguf(llama_build, model, out, "f32", log_path=tmp_path / "logs" / "convert.log")
    message = str(caught.value)
    assert "model-00002-of-00002.safetensors" in message and "mmap length" not in message
    assert not out.exists() and _leftovers(tmp_path / "gguf") == []
    record = convert_to_gguf(llama_build, DEMO_MODEL, out, "f32")  # a rerun on a good checkpoint
    assert out.is_file() and record["num_experts"] == 16


@pytest.mark.llamacpp
def test_convert_log_write_failure_does_not_hide_the_converters_error(llama_build, tmp_path, monkeypatch):
    import moeprune.atomic
    from moeprune.llamacpp.convert import convert_to_gguf

    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["NoSuchArchitectureForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))

    def full_disk(path, text):
        raise WriteError(f"{path}: cannot write this output: the disk is full; free disk space, then rerun")

    monkeypatch.setattr(moeprune.atomic, "write_text", full_disk)
    log = tmp_path / "logs" / "convert.log"
    with pytest.raises(MoepruneError) as caught:
        convert_to_gguf(llama_build, model, tmp_path / "out.gguf", "f32", log_path=log)
    message = str(caught.value)
    assert "convert_hf_to_gguf.py failed" in message and "(exit " in message
    assert "NoSuchArchitectureForCausalLM" in message  # the converter's own error, from its output
    assert f"the log {log} could not be written" in message and "disk is full" in message


# --- child tools die with their parent -------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].split()[0] != "Z"


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_tool_child_dies_with_a_kill_9_parent(tmp_path):
    script = (
        "import sys; from moeprune.llamacpp.process import run_tool\n"
        "run_tool([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        child = _wait_for(lambda: (_children(parent.pid) or [None])[0], 30)
        assert child, "the tool did not start"
        assert os.getpgid(child) == child, "the tool runs in a process group of its own"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 10), f"tool {child} outlived its parent (orphan)"
    finally:
        parent.kill()


@pytest.mark.llamacpp
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_converter_dies_when_invoke_convert_is_killed(tmp_path, llama_build):
    runs = tmp_path / "runs"
    shutil.copytree(DEMO_MODEL, tmp_path / "model")
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs)}
    parent = subprocess.Popen([sys.executable, "-m", "invoke", "convert", "--which", "base"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def converter():
            for pid in _children(parent.pid):
                try:
                    if b"convert_hf_to_gguf.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return pid
                except OSError:
                    pass
            return None

        child = _wait_for(converter, 300)
        assert child, "convert_hf_to_gguf.py never started"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert _wait_for(lambda: not _alive(child), 10), "convert_hf_to_gguf.py kept running after kill -9"
        assert not list((runs / "demo" / "gguf").glob("*.gguf")) if (runs / "demo" / "gguf").exists() else True
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    result = _invoke(["convert", "--which", "base"], env)  # the rerun recovers
    assert result.returncode == 0, result.stdout + result.stderr
    assert (runs / "demo" / "gguf").is_dir() and list((runs / "demo" / "gguf").glob("*.gguf"))


# --- the server's port cannot be raced ----------------------------------------------------------------
@pytest.mark.llamacpp
def test_server_port_cannot_be_taken_between_look_and_bind(llama_build, tmp_path, monkeypatch):
    """8dc2f54 picked a free port, then started llama-server on it: another process could bind it
    in between. Now llama-server binds a port the kernel chooses (--port 0): a port held by a thief
    (the one the old look would have returned) is never the server's, and the server is proven."""
    import socket

    import moeprune.llamacpp.server as server_module
    from moeprune.llamacpp.convert import convert_to_gguf
    from moeprune.llamacpp.server import LlamaServer
    from moeprune.recipe import ServeSection

    gguf = tmp_path / "demo-F32.gguf"
    convert_to_gguf(llama_build, DEMO_MODEL, gguf, "f32")
    thief = socket.socket()
    thief.bind(("127.0.0.1", 0))
    thief.listen()
    stolen = thief.getsockname()[1]
    monkeypatch.setattr(server_module, "free_port", lambda host="127.0.0.1": stolen, raising=False)
    serve = ServeSection(ctx_size=512, n_gpu_layers=0, parallel=1, threads=2, startup_timeout_s=120)
    try:
        with LlamaServer(llama_build, gguf, serve, tmp_path / "server.log") as server:
            assert server.port != stolen
            assert server_module._health_status("127.0.0.1", server.port) == 200
            assert server.identity["model_file"] == gguf.name and server.identity["build_info"]
            server.confirm_serving()
    finally:
        thief.close()


# --- a failed tool ends in one line (issue 22) ------------------------------------------------------------
@pytest.mark.llamacpp
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="no SIGXFSZ on this platform")
def test_quantize_stopped_by_a_file_size_limit_is_one_line(tmp_path, llama_build):
    """llama-quantize dies of SIGXFSZ (exit -25) writing past ``ulimit -f``: stderr ends in one line
    naming the signal, the limit, the file and the log, which holds the tool's whole output."""
    runs = tmp_path / "runs"
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1"}
    result = _invoke(["convert", "--which", "base"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    gguf_dir = runs / "demo" / "gguf"
    limit = 1_000_000
    assert (gguf_dir / "base-F32.gguf").stat().st_size > 4 * limit
    result = _invoke(["quantize", "--which", "base"], env, limit_bytes=limit)
    combined = result.stdout + result.stderr
    assert result.returncode != 0, combined
    log = runs / "demo" / "logs" / "quantize-base-Q4_K_M.log"
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: llama-quantize killed by SIGXFSZ (signal {int(signal.SIGXFSZ)}: file-size limit "
                    f"reached writing {gguf_dir / 'base-Q4_K_M.gguf'}); log: {log}"), combined
    assert "Traceback" not in combined and "exit -25" not in combined and "blk." not in combined, combined
    assert "blk." in log.read_text()  # the tool's own output is in the log, not on the screen
    assert not (gguf_dir / "base-Q4_K_M.gguf").exists() and _leftovers(gguf_dir) == []


@pytest.mark.slow
@pytest.mark.llamacpp
def test_converter_failure_in_reproduce_is_one_line_in_the_summary(tmp_path, llama_build):
    """The converter's Python traceback (a damaged tokenizer.json, which only the converter reads
    in these stages) stays in its log; the summary table shows the one line naming the exception
    and the log."""
    model = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model)
    (model / "tokenizer.json").write_text("{\n")
    recipe_path = tmp_path / "demo.toml"
    recipe_path.write_text(demo_recipe_text().replace(f'base = "{ROOT}/src/moeprune/demo/model"', f'base = "{model}"'))
    runs = tmp_path / "runs"
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(runs), "PYTHONUNBUFFERED": "1", "COLUMNS": "250"}
    result = _invoke(["reproduce", "--recipe", str(recipe_path), "--from", "convert-base", "--until", "convert-base",
                      "--no-live"], env)
    combined = result.stdout + result.stderr
    assert result.returncode != 0, combined
    log = runs / "demo" / "logs" / "convert-base-F32.log"
    assert "Traceback" in log.read_text() and "Traceback" not in combined, combined
    summary = combined[combined.index("summary"):]
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in summary.splitlines() if line.count("│") == 5]
    first = next(index for index, cells in enumerate(rows) if cells[0] == "convert-base")
    assert rows[first][1] == "failed", summary
    detail = [rows[first][3]]
    for cells in rows[first + 1:]:  # the detail cell folded over the following lines
        if cells[0]:
            break
        detail.append(cells[3])
    folded = "".join(detail).replace(" ", "")
    expected = (f"convert_hf_to_gguf.py failed: json.decoder.JSONDecodeError: Expecting property name enclosed in "
                f"double quotes: line 2 column 1 (char 2) (exit 1); log: {log}")
    assert folded == expected.replace(" ", ""), summary


# --- publish --dry-run touches nothing --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.llamacpp
def test_publish_dry_run_leaves_the_run_and_its_lock_byte_identical(demo_copy):
    from test_reproduce import stage_lines

    run, env = demo_copy
    before = {p.relative_to(run).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
              for p in sorted(run.rglob("*")) if p.is_file() and "logs" not in p.relative_to(run).parts}
    result = _invoke(["publish", "--dry-run", "--repo-id", "someone/else", "--gguf-repo-id", "someone/else-GGUF"],
                     env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "would upload to someone/else (model)" in result.stdout
    after = {p.relative_to(run).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in sorted(run.rglob("*")) if p.is_file() and "logs" not in p.relative_to(run).parts}
    assert after == before
    again = _invoke(["reproduce", "--no-live"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert set(stage_lines(again).values()) == {"skipped"}, again.stdout + again.stderr
