#!/usr/bin/env bash
# The main job: set up .venv if needed (plus matplotlib for the plot), then run the minimal distillation demo
# (examples/distill_minimal.py): a tiny teacher trained on its own chat tasks, a Hybrid-KDA student distilled
# in stages 1-3, the teacher-vs-student table; outputs in runs/distill_minimal. Arguments pass through
# (e.g. --quick, --device cuda, --out DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python -c "import matplotlib" 2>/dev/null || python -m pip install -q matplotlib || echo "demo: matplotlib unavailable; the plot will be skipped"
python examples/distill_minimal.py "$@"
