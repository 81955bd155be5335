#!/usr/bin/env bash
# shellcheck disable=SC2317  # the check functions run through `bash -c` in step()
# GPU check for one lent H200 (sm_90): one call of at most 10 minutes.
#
#   bench/gpu_check.sh [--dry-run] [--gguf PATH] [--python PATH]
#
# Checks, each printing one line "CHECK <name>: <figures>" (or "FAIL <name>: <why>"):
#   env       nvidia-smi, nvcc, cmake, CPU count, torch.cuda
#   build     the pinned llama.cpp (recipe [llamacpp] pin) with CUDA for sm_90 only, -j$(nproc),
#             into $MOEPRUNE_CACHE_DIR/llama.cpp/<key> (the source must already be in the cache:
#             $MOEPRUNE_CACHE_DIR/src, or reachable PyPI)
#   profile   bench/profile_overhead.py on CUDA in bfloat16 (transformers' grouped_mm experts path)
#   serve     llama-server on the demo GGUF with every layer on the GPU (--n-gpu-layers 99); the
#             server log must say "offloaded N/N layers to GPU" and name a CUDA model buffer
#
# The demo GGUF comes from a local demo run (runs/demo/gguf/demo-Q4_K_M.gguf: carry it) or --gguf.
# --dry-run prints the steps and runs nothing. Exit status: the number of failed checks.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN=0
GGUF="$ROOT/runs/demo/gguf/demo-Q4_K_M.gguf"
PYTHON="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"  # stay under the 10-minute call
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --gguf) GGUF="$2"; shift ;;
    --python) PYTHON="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 64 ;;
  esac
  shift
done

JOBS="$(nproc)"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
STARTED="$(date +%s)"
FAILED=0
LOG_DIR="${GPU_CHECK_LOG_DIR:-${OUT:-/tmp}/gpu_check}"

step() {  # step NAME TIMEOUT_S FUNCTION "WHAT": run (or, with --dry-run, print) one check
  local name="$1" limit="$2" function="$3" what="$4" status=0
  if [[ "$DRY_RUN" == 1 ]]; then
    printf 'STEP %s (at most %ss): %s\n' "$name" "$limit" "$what"
    return 0
  fi
  local left=$(( BUDGET_S - ($(date +%s) - STARTED) ))
  if (( left < 10 )); then
    echo "FAIL $name: no time left in the ${BUDGET_S}s budget"
    FAILED=$((FAILED + 1))
    return 0
  fi
  (( limit > left )) && limit="$left"
  mkdir -p "$LOG_DIR"
  timeout "$limit" bash -c "$function" >"$LOG_DIR/$name.log" 2>&1 || status=$?
  if (( status != 0 )); then
    echo "FAIL $name: exit $status$( (( status == 124 )) && echo " (timed out after ${limit}s)") (log: $LOG_DIR/$name.log); last lines:"
    tail -n 5 "$LOG_DIR/$name.log" | sed 's/^/    /'
    FAILED=$((FAILED + 1))
    return 0
  fi
  if ! grep '^CHECK ' "$LOG_DIR/$name.log"; then
    echo "FAIL $name: printed no CHECK line (log: $LOG_DIR/$name.log)"
    FAILED=$((FAILED + 1))
  fi
}

env_check() {
  set -euo pipefail
  local gpu nvcc_version torch_line
  gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1 || true)"
  nvcc_version="$(nvcc --version | tail -n 1)"
  torch_line="$("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())')"
  echo "CHECK env: gpu [$gpu]; nvcc [$nvcc_version]; cmake [$(cmake --version | head -n 1)]; cpus $JOBS; torch $torch_line"
  [[ -n "$gpu" && "$torch_line" == *"available True" ]]  # no GPU, or torch without CUDA: the check fails
}

build_check() {
  set -euo pipefail
  "$PYTHON" - "$JOBS" <<'PY'
import sys, time
from moeprune.llamacpp.build import ensure_llamacpp
from moeprune.recipe import LlamaCppSection

started = time.monotonic()
build = ensure_llamacpp(LlamaCppSection(cuda="on", cuda_architectures="90"), jobs=int(sys.argv[1]), say=print)
flags = build.record["flags"]
print(f"CHECK build: key {build.key}, GGML_CUDA={flags['GGML_CUDA']}, CMAKE_CUDA_ARCHITECTURES="
      f"{flags.get('CMAKE_CUDA_ARCHITECTURES')}, -j{build.record['jobs']}, {time.monotonic() - started:.0f} s "
      f"(build itself {build.record['build_seconds']} s), {build.record['toolchain'].get('nvcc_version', '?')}")
PY
}

profile_check() {
  set -euo pipefail
  "$PYTHON" "$ROOT/bench/profile_overhead.py" --device cuda --dtype bfloat16 --layers 2 --tokens 2048 --repeats 5 \
    | tee /dev/stderr | awk '/^ratio profiled\/plain/ {print "CHECK profile: cuda bfloat16 2 layers 2048 tokens, " $0}'
}

serve_check() {
  set -euo pipefail
  "$PYTHON" - "$GGUF" "$LOG_DIR/serve-llama-server.log" <<'PY'
import re, sys, time
from pathlib import Path
from moeprune.llamacpp.build import ensure_llamacpp
from moeprune.llamacpp.server import LlamaServer
from moeprune.recipe import LlamaCppSection, ServeSection

gguf = Path(sys.argv[1])
if not gguf.is_file():
    sys.exit(f"{gguf}: demo GGUF not found; run `invoke reproduce --until quantize-pruned` or carry runs/demo/gguf")
build = ensure_llamacpp(LlamaCppSection(cuda="on", cuda_architectures="90"))
serve = ServeSection(ctx_size=2048, n_gpu_layers=99, reasoning_budget=64, startup_timeout_s=120)
log = Path(sys.argv[2])
with LlamaServer(build, gguf, serve, log) as server:
    started = time.monotonic()
    reply = server.chat([{"role": "user", "content": "Which of these numbers is even? (A) 3 (B) 8"}], max_tokens=64,
                        temperature=0)
    seconds = time.monotonic() - started
text = log.read_text(errors="replace")
offload = re.search(r"offloaded (\d+)/(\d+) layers to GPU", text)
buffers = re.findall(r"(CUDA\d+) model buffer size\s*=\s*([\d.]+) MiB", text)
if offload is None or offload[1] != offload[2] or not buffers:
    sys.exit(f"the server did not offload every layer: {offload[0] if offload else 'no offload line'}, "
             f"CUDA buffers {buffers} (log: {log})")
tokens = reply.get("usage", {}).get("completion_tokens")
print(f"CHECK serve: {offload[0]}, model buffers {', '.join(f'{d} {m} MiB' for d, m in buffers)}, "
      f"{tokens} tokens in {seconds:.2f} s ({gguf.name})")
PY
}

export ROOT PYTHON JOBS GGUF LOG_DIR
export -f env_check build_check profile_check serve_check
step env 30 env_check "nvidia-smi, nvcc --version, cmake --version, torch.cuda.is_available()"
step build 420 build_check "ensure_llamacpp(cuda='on', cuda_architectures='90', jobs=$JOBS): cmake -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90, build llama-quantize llama-server llama-imatrix llama-perplexity llama-gguf-split"
step profile 120 profile_check "$PYTHON bench/profile_overhead.py --device cuda --dtype bfloat16 --layers 2 --tokens 2048 --repeats 5"
step serve 90 serve_check "llama-server --model $GGUF --n-gpu-layers 99 --ctx-size 2048; one chat request; parse 'offloaded N/N layers to GPU' and 'CUDA0 model buffer size' from its log"
if [[ "$DRY_RUN" == 0 ]]; then
  echo "gpu_check: $FAILED check(s) failed, $(( $(date +%s) - STARTED )) s"
fi
exit "$FAILED"
