#!/usr/bin/env bash
# The GPU lane in one command (for a CUDA machine whose python3 already has torch and triton, offline):
# install fastattn (and fla-core wheels from .wheels/ when present), run the gpu-marked tests, a
# compute-sanitizer memcheck of the small all-options kernel tests, and the quick kernel benchmarks.
# The gpu tests run on GPU_WORKERS (default 3) pytest-xdist workers when xdist is installed (~7.5 min on an H200),
# then the `bigmem` ones alone.
# Logs go to ${OUT:-bench/out}. Usage: bash scripts/gpu_lane.sh [tests|sanitizer|bench]...
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
if ls .wheels/*.whl >/dev/null 2>&1; then python3 -m pip install -q --no-deps .wheels/*.whl >/dev/null 2>&1; fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests sanitizer bench)
status=0
for step in "${steps[@]}"; do
  case "$step" in
    tests)
      # workers share the card: the tests that need most of its memory run alone afterwards
      par=()
      if python3 -c "import xdist" 2>/dev/null; then par=(-n "${GPU_WORKERS:-3}"); fi
      python3 -m pytest -v -m "gpu and not bigmem" "${par[@]}" -p no:cacheprovider tests 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep --line-buffered -E "PASSED|FAILED|ERROR|passed|failed" || status=1
      python3 -m pytest -v -m "gpu and bigmem" -p no:cacheprovider tests 2>&1 | tee -a "$OUT/gpu_tests.log" \
        | grep --line-buffered -E "PASSED|FAILED|ERROR|passed|failed" || status=1 ;;
    sanitizer)
      for sel in "tests/test_kda_chunk.py -k small_all_features" "tests/test_kda_recurrent.py -k varlen"; do
        # shellcheck disable=SC2086
        compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -p no:cacheprovider $sel \
          2>&1 | tail -3 | tee -a "$OUT/sanitizer.log" || status=1
      done
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 bench/kernels.py --op eva --smoke \
        2>&1 | tail -3 | tee -a "$OUT/sanitizer.log" || status=1 ;;
    bench)
      python3 bench/kernels.py --op kda --quick --out "$OUT" 2>&1 | grep -v Warning | tail -12 || status=1
      python3 bench/kernels.py --op eva --quick --out "$OUT" 2>&1 | grep -v Warning | tail -16 || status=1 ;;
    *) echo "unknown step $step (tests|sanitizer|bench)"; exit 2 ;;
  esac
done
exit $status
