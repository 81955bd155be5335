#!/usr/bin/env bash
# Set up moeprune on a Debian machine with Python 3.11: a virtual environment in .venv with
# the pinned dependencies, and the pinned llama.cpp build (cached under ~/.cache/moeprune).
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
"$PYTHON" - <<'PY' || { echo "moeprune needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# torch is pinned here, before the project, so that pip keeps this build: a range that admits a
# newer release would pull a multi-GB CUDA build on machines that have the CPU wheel at hand.
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e ".[dev]"

# Build (or find) the pinned llama.cpp tools. No `invoke --list | grep -q` test here: under
# pipefail, grep exiting at its first match makes the pipeline fail and skipped the build.
# The task says whether it built or found the tools, with the cache key and path; a build
# prints its compiler step counter as it goes.
.venv/bin/invoke llamacpp
echo "moeprune is set up: activate with '. .venv/bin/activate'"
