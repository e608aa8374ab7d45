#!/usr/bin/env bash
# The CPU test lanes: (1) oracles, the PyTorch CPU path, models, distillation; (2) the Triton kernels
# themselves through the interpreter (TRITON_INTERPRET=1 is read at import, so it is its own process).
# The GPU lane is `python -m pytest -m gpu` on a CUDA machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
python -m pytest -q -m "not gpu and not interpret" "$@"
TRITON_INTERPRET=1 FASTATTN_BACKEND=triton python -m pytest -q -m interpret "$@"
