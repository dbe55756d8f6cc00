#!/usr/bin/env bash
# Issue 16's GPU measurements in two commands of under 10 minutes each (the device tool's limit per call),
# run from the repository root on a machine with a CUDA GPU and the project's packages installed:
#
#   bash benchmarks/gpu_session.sh 1   # tests/test_cuda.py, then gpu.py's fit and steps parts
#   bash benchmarks/gpu_session.sh 2   # gpu.py's packed part: 1, 4 and 8 trials per GPU, and 4 under MPS
#   .venv/bin/python benchmarks/cost.py "$OUT"/gpu-fit-steps.json "$OUT"/gpu-packed.json \
#       --early-stop benchmarks/results/early_stop-cpu-2026-11-30-30trials.json
#
# Reports go to $OUT (default: the current folder); sizes are cut (20,000 training images, 3 epochs)
# so that each command fits, which leaves the steady epochs 2 and 3 for the throughput.
set -euo pipefail
out=${OUT:-.}
python=${PYTHON:-python}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}  # compiled kernels reused by part 2
case "${1:-}" in
  1) "$python" -m pytest -q tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 \
       || echo "tests/test_cuda.py failed (above); measuring anyway" >&2
     "$python" benchmarks/gpu.py --parts fit,steps --train-images 20000 --out "$out/gpu-fit-steps.json" > /dev/null ;;
  2) "$python" benchmarks/gpu.py --parts packed --train-images 20000 --packs 4,8 --mps \
       --out "$out/gpu-packed.json" > /dev/null ;;
  *) echo "usage: bash benchmarks/gpu_session.sh 1|2 (see the comment at the top)" >&2; exit 2 ;;
esac
