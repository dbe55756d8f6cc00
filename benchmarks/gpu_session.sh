#!/usr/bin/env bash
# Issue 16's GPU measurements, in stages by priority, within one deadline. A task is lent 15 minutes of
# device time in all (the machine's start included) and 10 minutes per command, so the first command
# measures the targets and a second, on the still-warm machine, runs what is left:
#
#   DEADLINE=520 bash benchmarks/gpu_session.sh targets tests   # $OUT/gpu.json, then tests/test_cuda.py
#   DEADLINE=200 bash benchmarks/gpu_session.sh tests steps     # what the first did not reach
#   python3 benchmarks/cost.py benchmarks/results/gpu-h200-2026-11-26.json "$OUT"/gpu.json [...steps.json] \
#       --early-stop benchmarks/results/early_stop-cpu-2026-11-30-50epochs.json
#
# Stages:
#   targets  ResNet-50 at 32 px: bare steps eager vs CUDA graphs (target 3x of 5,377 images/s), fit eager vs
#            graphs (target: 90 % of the steps), then 4 and 8 packed trials (target: 4 give 2.5x one), MPS
#   tests    tests/test_cuda.py (CUDA graphs vs eager, resume, no syncs in a step)
#   steps    the other backbones' eager steps and ResNet-50's compiled steps at 64 px (the projection's rest)
# gpu.py writes its JSON after each measurement, so a stage cut off by the deadline keeps what it measured.
# Reports go to $OUT (default: the current folder); python is $PYTHON (default python3).
set -uo pipefail
(($#)) || set -- targets tests
out=${OUT:-.}
python=${PYTHON:-python3}
deadline=${DEADLINE:-520}
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.inductor-cache}
sizes=(--train-images 20000 --val-images 5000 --epochs 3)

within_deadline() {  # the command, stopped (with its child processes) when the deadline comes
  local left=$((deadline - SECONDS))
  if ((left < 30)); then echo "gpu_session: no time left for: $*" >&2; return 0; fi
  timeout "$left" "$@"
  local status=$?
  ((status == 0)) || echo "gpu_session: exit $status (124: the deadline) from: $*" >&2
}

for stage in "$@"; do
  case "$stage" in
    targets) within_deadline "$python" benchmarks/gpu.py --parts steps,fit,packed --backbones resnet50 \
               --graph-backbones resnet50 --sides 32 "${sizes[@]}" --packs 4,8 --mps --out "$out/gpu.json" >/dev/null ;;
    tests) within_deadline "$python" -m pytest -q -p no:cacheprovider -o addopts=-ra tests/test_cuda.py 2>&1 |
             tail -25 ;;  # one process, with or without pytest-xdist there (pyproject's addopts ask for it)
    steps) within_deadline "$python" benchmarks/gpu.py --parts steps --sides 32,64 --graph-backbones resnet50 \
             --out "$out/gpu-steps.json" >/dev/null ;;
    *) echo "usage: bash benchmarks/gpu_session.sh targets|tests|steps ... (see the comment at the top)" >&2; exit 2 ;;
  esac
done
