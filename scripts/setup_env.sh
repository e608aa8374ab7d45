#!/usr/bin/env bash
# Creates .venv (once) with a CPU build of torch, triton and the test extras, and installs fastattn
# editable. Sourced by scripts/test.sh and scripts/demo.sh. Override the torch requirement with
# TORCH_SPEC (default torch==2.13.0, which this project's CPU machines hold as a CPU wheel; pinning it
# keeps pip from pulling a multi-GB CUDA build on a machine without a GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
if ! python -c "import fastattn, pytest, hypothesis, triton" 2>/dev/null || [ pyproject.toml -nt .venv/.fastattn-installed ]; then
  python -m pip install -q -e ".[test,models]"
  touch .venv/.fastattn-installed
fi
