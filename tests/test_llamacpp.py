"""llama.cpp toolchain: pinned build cache, convert, quantize, serve.

Tests marked ``llamacpp`` use the real build (``ensure_llamacpp`` builds it on first use, which
takes minutes) and real llama-server processes on a tiny random Gemma-4-architecture MoE.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest

from tiny_gemma4 import NUM_EXPERTS, save_servable_tiny_gemma4

from moeprune.errors import MoepruneError
from moeprune.llamacpp import build as build_mod
from moeprune.llamacpp.build import (
    BINARIES,
    LlamaCppBuildError,
    build_key,
    cmake_flags,
    ensure_llamacpp,
    toolchain,
    use_cuda,
)
from moeprune.llamacpp.convert import GGUFCheckError, convert_to_gguf, verify_gguf_info
from moeprune.llamacpp.quantize import parse_fallbacks, quantize_gguf
from moeprune.llamacpp.server import LlamaServer, LlamaServerError, process_group_members, leftover_servers, server_flags
from moeprune.llamacpp.source import SourceTree, fetch_sdist
from moeprune.recipe import LlamaCppSection, ServeSection
from moeprune.demo import MODEL_DIR as DEMO_MODEL

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASK_DIR = ROOT / "src" / "moeprune" / "demo" / "tasks" / "demo_mcq"



SERVE = ServeSection(ctx_size=512, n_gpu_layers=0, reasoning_budget=-1, parallel=1, seed=0, threads=1,
                     startup_timeout_s=120)


@pytest.fixture(autouse=True)
def _no_server_left_behind():
    """Each test must stop every llama-server it started (the whole process group)."""
    yield
    leftovers = leftover_servers()
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    assert leftovers == [], f"llama-server processes left behind: {leftovers}"


# --- pure: cache key, flags, log parsing, GGUF checks ------------------------------------------
TOOLS = {"cmake": "/usr/bin/cmake", "cmake_version": "cmake version 3.25.1", "cc": "/usr/bin/gcc",
         "cc_version": "gcc 12.2.0", "cxx": "/usr/bin/g++", "cxx_version": "g++ 12.2.0"}
SOURCE = SourceTree(root=Path("/src"), pin_sha256="a" * 64, record={"llama_cpp_commit": "0c1e57098bba" + "0" * 28})


def test_cache_key_changes_with_the_pin():
    flags = cmake_flags(LlamaCppSection(), cuda=False, source=SOURCE)
    key = build_key("a" * 64, flags, TOOLS)
    assert build_key("a" * 64, dict(flags), dict(TOOLS)) == key
    assert build_key("b" * 64, flags, TOOLS) != key


def test_cache_key_changes_with_flags_and_compiler():
    flags = cmake_flags(LlamaCppSection(), cuda=False, source=SOURCE)
    key = build_key("a" * 64, flags, TOOLS)
    cuda_flags = cmake_flags(LlamaCppSection(), cuda=True, source=SOURCE)
    assert build_key("a" * 64, cuda_flags, TOOLS) != key
    assert build_key("a" * 64, flags, {**TOOLS, "cxx_version": "g++ 13.1.0"}) != key
    # Where the compiler lives does not change the binaries; its version does.
    assert build_key("a" * 64, flags, {**TOOLS, "cc": "/opt/gcc"}) == key


def test_flags_turn_off_network_and_native_code():
    flags = cmake_flags(LlamaCppSection(), cuda=False, source=SOURCE)
    assert flags["GGML_NATIVE"] == "OFF"
    assert flags["LLAMA_USE_PREBUILT_UI"] == "OFF"
    assert flags["LLAMA_OPENSSL"] == "OFF"
    assert flags["GGML_CUDA"] == "OFF"
    assert flags["LLAMA_BUILD_COMMIT"] == "0c1e57098bba"


def test_cuda_needs_nvcc(tmp_path):
    no_tools = {"PATH": str(tmp_path)}
    assert use_cuda(LlamaCppSection(cuda="auto"), env=no_tools) is False
    assert use_cuda(LlamaCppSection(cuda="off"), env=dict(os.environ)) is False
    with pytest.raises(LlamaCppBuildError, match="nvcc is not on PATH"):
        use_cuda(LlamaCppSection(cuda="on"), env=no_tools)


def test_sdist_with_wrong_sha256_is_refused(tmp_path):
    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    archive.write_bytes(b"not the pinned archive")
    with pytest.raises(MoepruneError, match="sdist_sha256") as info:
        fetch_sdist("9.9.9", "0" * 64, dest_dir=tmp_path)
    assert str(archive) in str(info.value)
    assert archive.is_file()  # never deleted behind the user's back


def test_missing_compiler_is_a_clear_error(tmp_path):
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    with pytest.raises(LlamaCppBuildError, match=r"no C compiler found \(\$CC = .*no-such-cc") as info:
        toolchain(cuda=False, env=env)
    assert "install" in str(info.value)


def test_missing_cmake_is_a_clear_error(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    with pytest.raises(LlamaCppBuildError, match="no CMake found"):
        toolchain(cuda=False, env={"PATH": str(empty_bin)})


def _fake_cache(cache_dir: Path) -> None:
    (cache_dir / "bin").mkdir(parents=True)
    binaries = {}
    for name in BINARIES:
        (cache_dir / "bin" / name).write_bytes(name.encode())
        binaries[name] = {"sha256": build_mod.sha256_file(cache_dir / "bin" / name)}
    (cache_dir / "build_record.json").write_text(json.dumps({"key": cache_dir.name, "binaries": binaries}))


def test_cached_build_is_reused_only_while_its_binaries_match(tmp_path):
    cache_dir = tmp_path / "k1"
    _fake_cache(cache_dir)
    cached = build_mod._load_cached(cache_dir, SOURCE, "k1")
    assert cached is not None and cached.bin_dir == cache_dir / "bin" and cached.root == SOURCE.root
    (cache_dir / "bin" / "llama-server").write_bytes(b"tampered")
    assert build_mod._load_cached(cache_dir, SOURCE, "k1") is None


def test_cache_without_record_is_not_used(tmp_path):
    cache_dir = tmp_path / "k2"
    _fake_cache(cache_dir)
    (cache_dir / "build_record.json").unlink()
    assert build_mod._load_cached(cache_dir, SOURCE, "k2") is None


def test_parse_fallbacks_reads_each_warning():
    log = (
        "[  12/  91]              blk.0.ffn_down_exps.weight - [  704,  2816,   128,     1], type =   bf16, "
        "warning: blk.0.ffn_down_exps.weight           - ncols    704 not divisible by 256 (required for type    q4_K) "
        "-> falling back to    q5_0\nconverting to q5_0 .. size =     1.00 MiB ->     0.34 MiB\n"
        "warning: blk.1.attn_q.weight                  - ncols     40 not divisible by 256 (required for type    q6_K) "
        "(WARNING: must use F16 due to unusual shape) -> falling back to     f16\n"
        "llama_model_quantize_impl: WARNING: 2 of 91 tensor(s) required fallback quantization\n"
    )
    parsed = parse_fallbacks(log)
    assert parsed["count"] == 2 and parsed["total_tensors"] == 91
    assert parsed["tensors"][0] == {
        "tensor": "blk.0.ffn_down_exps.weight", "ncols": 704, "block_size": 256,
        "requested_type": "q4_K", "actual_type": "q5_0", "forced_f16": False,
    }
    assert parsed["tensors"][1]["forced_f16"] is True and parsed["tensors"][1]["actual_type"] == "f16"


def test_parse_fallbacks_without_fallbacks():
    assert parse_fallbacks("llama_model_quantize_impl: model size = 10 MiB\n") == {
        "tensors": [], "count": 0, "total_tensors": None,
    }


def _gguf_info(experts: int, down_scale: list[int] | None = None) -> dict:
    return {
        "arch": "gemma4",
        "metadata": {"gemma4.expert_count": experts, "general.base_model.0.name": "gemma-4-26B-A4B-it"},
        "tensors": {
            "blk.0.ffn_gate_up_exps.weight": [64, 64, experts],
            "blk.0.ffn_down_exps.weight": [32, 64, experts],
            "blk.0.ffn_gate_inp.weight": [64, experts],
            "blk.0.ffn_down_exps.scale": down_scale or [experts],
        },
    }


def test_gguf_check_accepts_matching_counts():
    checks = verify_gguf_info(_gguf_info(109), Path("x.gguf"), 109, "gemma-4-26B-A4B-it")
    assert checks["expert_count"] == 109 and checks["expert_tensors_checked"] == 3


def test_gguf_check_rejects_wrong_expert_count():
    with pytest.raises(GGUFCheckError, match="gemma4.expert_count = 128, config num_experts = 109"):
        verify_gguf_info(_gguf_info(128), Path("x.gguf"), 109, None)


def test_gguf_check_rejects_wrong_scale_length():
    with pytest.raises(GGUFCheckError, match=r"ffn_down_exps.scale has shape \[128\]"):
        verify_gguf_info(_gguf_info(109, down_scale=[128]), Path("x.gguf"), 109, None)


def test_gguf_check_needs_the_base_model_named():
    with pytest.raises(GGUFCheckError, match="does not name the base model 'other-model'"):
        verify_gguf_info(_gguf_info(109), Path("x.gguf"), 109, "other-model")


def test_server_flags_follow_the_recipe():
    serve = ServeSection(ctx_size=32768, n_gpu_layers=99, reasoning_format="deepseek", reasoning_budget=8192,
                         parallel=1, seed=0)
    flags = server_flags(serve)
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert "--jinja" in flags
    for flag, value in {"--ctx-size": "32768", "--n-gpu-layers": "99", "--reasoning-format": "deepseek",
                        "--reasoning-budget": "8192", "--parallel": "1", "--seed": "0"}.items():
        assert flag in flags and flags[flags.index(flag) + 1] == value, (flag, pairs)
    assert "--threads" not in flags
    assert "--kv-unified" not in flags  # one slot: nothing to share


def test_parallel_slots_share_one_kv_cache_unless_told_not_to():
    serve = ServeSection(ctx_size=8192, parallel=4)
    flags = server_flags(serve)
    assert flags[flags.index("--parallel") + 1] == "4" and "--kv-unified" in flags
    assert "--kv-unified" not in server_flags(serve.model_copy(update={"kv_unified": False}))


# --- with the real build --------------------------------------------------------------------
def _make_tiny_model(out: Path) -> Path:
    """A tiny random Gemma 4 MoE with the demo's Gemma-4-format tokenizer."""
    return save_servable_tiny_gemma4(out)


@pytest.fixture(scope="module")
def tiny_gguf(llama_build_shared, tmp_path_factory):
    """(f32 GGUF, Q4_K_M GGUF, convert record, quantize record) of the tiny model."""
    work = tmp_path_factory.mktemp("tiny")
    hf_dir = _make_tiny_model(work / "hf")
    converted = convert_to_gguf(llama_build_shared, hf_dir, work / "tiny-F32.gguf", "f32", log_path=work / "convert.log")
    quantized = quantize_gguf(llama_build_shared, work / "tiny-F32.gguf", work / "tiny-Q4_K_M.gguf", "Q4_K_M",
                              log_path=work / "quantize.log")
    return work / "tiny-F32.gguf", work / "tiny-Q4_K_M.gguf", converted, quantized


@pytest.mark.llamacpp
def test_build_record_is_written(llama_build_shared):
    record = json.loads((llama_build_shared.cache_dir / "build_record.json").read_text())
    assert record["key"] == llama_build_shared.key == llama_build_shared.cache_dir.name
    assert record["source"]["sha256"] == LlamaCppSection().sdist_sha256
    assert record["flags"]["GGML_NATIVE"] == "OFF"
    assert record["toolchain"]["cxx_version"]
    assert set(record["binaries"]) == set(BINARIES)
    for name, entry in record["binaries"].items():
        assert build_mod.sha256_file(llama_build_shared.bin_dir / name) == entry["sha256"]


@pytest.mark.llamacpp
def test_missing_compiler_stops_ensure_llamacpp(tmp_path):
    env = {**os.environ, "CXX": str(tmp_path / "no-such-c++")}
    with pytest.raises(LlamaCppBuildError, match=r"no C\+\+ compiler found"):
        ensure_llamacpp(LlamaCppSection(), env=env)


@pytest.mark.llamacpp
def test_failed_build_shows_the_log_tail_and_leaves_no_cache(tmp_path, monkeypatch):
    fake_cc = tmp_path / "fakecc"
    fake_cc.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "fakecc 1.0"; exit 0; }\n'
                       'echo "fakecc: refusing to compile" >&2; exit 1\n')
    fake_cc.chmod(0o755)
    monkeypatch.setattr(build_mod, "builds_root", lambda: tmp_path / "builds")
    env = {**os.environ, "CC": str(fake_cc), "CXX": str(fake_cc)}
    with pytest.raises(LlamaCppBuildError, match="llama.cpp configure failed") as info:
        ensure_llamacpp(LlamaCppSection(), env=env)
    failed_logs = list((tmp_path / "builds").glob("*.failed.log"))
    assert len(failed_logs) == 1 and str(failed_logs[0]) in str(info.value)
    assert "--- last lines ---" in str(info.value)
    assert [p.name for p in (tmp_path / "builds").iterdir() if p.is_dir()] == []


@pytest.mark.llamacpp
def test_unchanged_pin_reuses_the_cache(llama_build_shared):
    again = ensure_llamacpp(LlamaCppSection())
    assert again.key == llama_build_shared.key and again.bin_dir == llama_build_shared.bin_dir
    assert again.record["built_at_unix"] == llama_build_shared.record["built_at_unix"]


@pytest.mark.llamacpp
def test_convert_checks_expert_count_and_base_model(tiny_gguf):
    _, _, converted, _ = tiny_gguf
    checks = converted["checks"]
    assert checks["architecture"] == "gemma4"
    assert checks["expert_count"] == NUM_EXPERTS == converted["num_experts"]
    assert checks["down_scale_tensors_checked"] == 4  # one per MoE layer
    assert checks["general"]["general.base_model.0.name"] == "hf"
    sidecar = json.loads(Path(converted["out_path"] + ".json").read_text())
    assert sidecar["sha256"] == converted["sha256"] and "out_path" not in sidecar  # no local paths


@pytest.mark.llamacpp
def test_quantize_records_fallbacks(tiny_gguf):
    _, q4, _, quantized = tiny_gguf
    assert q4.is_file() and quantized["sha256"] == build_mod.sha256_file(q4)
    # Rows of 64 or 32 values are not multiples of Q4_K's 256-value blocks: llama-quantize falls
    # back for such tensors, and every fallback must be in the record.
    fallbacks = quantized["fallbacks"]
    assert fallbacks["count"] == len(fallbacks["tensors"]) > 0
    assert all(entry["ncols"] % entry["block_size"] != 0 for entry in fallbacks["tensors"])


@pytest.mark.llamacpp
def test_bits_per_weight_of_a_real_quantized_gguf_and_its_fallbacks(tiny_gguf):
    """llama-quantize's own output: its record's fallbacks agree with the file's tensor types, and the
    bits per weight follow from ggml's block sizes over the file's tensors (moeprune.plan.ggml)."""
    from gguf import GGUFReader

    from moeprune.gguf_bits import fallback_counts, read_gguf_bits
    from moeprune.plan.ggml import tensor_bytes

    _, q4, _, quantized = tiny_gguf
    bits = read_gguf_bits(q4, q4.name)
    counts = fallback_counts(quantized["fallbacks"]["tensors"], bits, q4.name)
    assert sum(counts.values()) == quantized["fallbacks"]["count"] > 0
    assert all(requested != actual for requested, actual in counts)
    tensors = GGUFReader(str(q4)).tensors
    want = sum(tensor_bytes(t.tensor_type.name, int(t.n_elements), int(t.shape[0])) for t in tensors)
    assert bits.bits_per_weight == pytest.approx(8 * want / sum(int(t.n_elements) for t in tensors), rel=1e-12)
    assert 4.5 < bits.bits_per_weight < 32


@pytest.mark.llamacpp
def test_serve_answers_a_chat_completion(llama_build_shared, tiny_gguf, tmp_path):
    _, q4, _, _ = tiny_gguf
    log = tmp_path / "server.log"
    with LlamaServer(llama_build_shared, q4, SERVE, log) as server:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", server.base_url)
        reply = server.chat([{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0.0)
        pid = server.pid
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert "--jinja" in server.flags and "--reasoning-format" in server.flags
    assert log.is_file() and log.stat().st_size > 0
    assert process_group_members(pid) == []  # stopped with its whole process group


@pytest.mark.llamacpp
def test_port_in_use_is_a_clear_error(llama_build_shared, tiny_gguf, tmp_path):
    _, q4, _, _ = tiny_gguf
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(LlamaServerError, match=f"port {port} on 127.0.0.1 is already in use"):
            with LlamaServer(llama_build_shared, q4, SERVE, tmp_path / "server.log", port=port):
                pass


@pytest.mark.llamacpp
def test_broken_gguf_error_is_one_line_naming_the_cause_and_the_log(llama_build_shared, tiny_gguf, tmp_path):
    f32, _, _, _ = tiny_gguf
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(f32.read_bytes()[: 64 * 1024])  # a truncated GGUF: header fine, tensors missing
    log = tmp_path / "server.log"
    with pytest.raises(LlamaServerError) as info:
        with LlamaServer(llama_build_shared, broken, SERVE, log):
            pass
    message = str(info.value)
    assert "\n" not in message and message.startswith("llama-server failed: ") and message.endswith(f"; log: {log}")
    assert f"it could not load {broken}" in message or "it stopped while starting" in message


@pytest.mark.llamacpp
def test_server_killed_mid_run_is_a_clear_error(llama_build_shared, tiny_gguf, tmp_path):
    _, q4, _, _ = tiny_gguf
    with LlamaServer(llama_build_shared, q4, SERVE, tmp_path / "server.log") as server:
        os.killpg(server.pid, signal.SIGKILL)
        with pytest.raises(LlamaServerError, match=r"^llama-server killed by SIGKILL \(signal 9: it died while serving\); log: "):
            server.chat([{"role": "user", "content": "Hello"}], max_tokens=4)


@pytest.mark.llamacpp
def test_ctrl_c_stops_the_server(llama_build_shared, tiny_gguf, tmp_path):
    _, q4, _, _ = tiny_gguf
    with pytest.raises(KeyboardInterrupt):
        with LlamaServer(llama_build_shared, q4, SERVE, tmp_path / "server.log") as server:
            pgid = server.pid
            raise KeyboardInterrupt
    assert process_group_members(pgid) == []


def _processes_with_arg(fragment: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.mark.llamacpp
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_invoke_serve_stops_its_server(llama_build_shared, tiny_gguf, tmp_path, stop_signal):
    import subprocess
    import sys

    _, q4, _, _ = tiny_gguf
    gguf_dir = tmp_path / "runs" / "demo" / "gguf"
    gguf_dir.mkdir(parents=True)
    (gguf_dir / "base-Q4_K_M.gguf").write_bytes(q4.read_bytes())
    env = {**os.environ, "MOEPRUNE_RUNS_DIR": str(tmp_path / "runs")}
    process = subprocess.Popen(
        [sys.executable, "-m", "invoke", "serve", "--which", "base"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
        assert re.search(r"http://127\.0\.0\.1:(\d+)/v1", first), first + second + process.stdout.read()
        alias = re.search(r"--alias (moeprune-[0-9a-f]+)", second)  # the server's identity nonce: unique
        assert alias, first + second
        port_flag = f"--alias {alias.group(1)}"
        assert _processes_with_arg(port_flag)  # the server runs
        process.send_signal(stop_signal)
        output = process.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0 and "stopped." in output
    assert _processes_with_arg(port_flag) == []


# --- the demo model: llama.cpp (Q4_K_M) answers as transformers does ---------------------------
QUESTIONS_PER_GOLD_LETTER = 2  # 8 questions, every gold letter represented


@pytest.mark.llamacpp
def test_demo_model_converts_with_its_expert_count(llama_build_shared, tmp_path):
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    record = convert_to_gguf(llama_build_shared, DEMO_MODEL, tmp_path / "demo-F32.gguf", "f32")
    assert record["checks"]["expert_count"] == config["text_config"]["num_experts"]
    assert record["checks"]["expert_tensors_checked"] > 0


@pytest.mark.llamacpp
@pytest.mark.slow
def test_demo_model_answers_like_transformers(llama_build_shared, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The committed demo is the trained one (an untrained one answers no letter at all).
    assert json.loads((DEMO_MODEL / "build_record.json").read_text())["trained"]
    torch.set_num_threads(1)
    data_file = sorted(DEMO_TASK_DIR.glob("*.jsonl"))[0]
    all_rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    rows = [row for letter in "ABCD" for row in [r for r in all_rows if r["answer"] == f"({letter})"][:QUESTIONS_PER_GOLD_LETTER]]
    from moeprune.demo.build import extract_answers, split_reply
    from moeprune.demo.data import GPQA_PROMPT_TEMPLATE

    prompts = [
        GPQA_PROMPT_TEMPLATE.format(question=r["Question"], c1=r["choice1"], c2=r["choice2"], c3=r["choice3"],
                                    c4=r["choice4"])
        for r in rows
    ]
    max_new_tokens = 128

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    expected = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            enable_thinking=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)
        # The same split llama-server's --reasoning-format deepseek makes: answer = visible content.
        expected.append(extract_answers(split_reply(text)[1])[1])

    f32 = convert_to_gguf(llama_build_shared, DEMO_MODEL, tmp_path / "demo-F32.gguf", "f32")
    assert f32["checks"]["expert_count"] == json.loads((DEMO_MODEL / "config.json").read_text())["text_config"]["num_experts"]
    quantize_gguf(llama_build_shared, tmp_path / "demo-F32.gguf", tmp_path / "demo-Q4_K_M.gguf", "Q4_K_M")
    serve = SERVE.model_copy(update={"ctx_size": 2048, "threads": 2})
    got = []
    with LlamaServer(llama_build_shared, tmp_path / "demo-Q4_K_M.gguf", serve, tmp_path / "server.log") as server:
        for prompt in prompts:
            reply = server.chat([{"role": "user", "content": prompt}], max_tokens=max_new_tokens, temperature=0.0,
                                chat_template_kwargs={"enable_thinking": True})
            got.append(extract_answers(reply["choices"][0]["message"].get("content") or "")[1])
    assert None not in expected, f"transformers gave no letter: {expected}"
    assert got == expected, f"llama.cpp Q4_K_M {got} vs transformers {expected}"
    print(f"demo letters: llama.cpp {got} == transformers {expected}")
