#!/usr/bin/env bash
# The main job: set up .venv if needed, then run the quickstart (chunk_kda checked against the oracle,
# then a few decode steps).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/setup_env.sh
python examples/quickstart.py "$@"
