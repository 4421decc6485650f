#!/usr/bin/env bash
# One run on an offline GPU machine (H100/H200 class), 4 to 6 minutes with the default budget (252 s and
# 335 s on an H100, seventh session of 2026-11-27):
#   1. build the CUDA extension (csrc/gpu_build.sh) while tests/ops runs on CUDA with compiled Triton,
#   2. the cuda backend against the reference (tests/test_backend_cuda.py),
#   3. the benchmark table: fused (triton, cuda) vs reference vs pytorch-metric-learning,
#   4. the trainer's step time with Metrix (ResNet-50, B = 100, 224 px) against the clean step,
#   5. a kernel-level profile of the main cases (bench/gpu_profile.py).
#   bash bench/gpu_check.sh RESULTS_DIR     (BUDGET=seconds for the table, default 240; rows past it are skipped)
# Results: gpu-bench.md / .csv (rewritten after each part), step-time.txt, profile.txt, summary.txt,
# bench.log, and the build and test logs in test-logs.tar.gz.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
LOGS=$OUT/logs
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %H %cd' 2>/dev/null
} > "$OUT/summary.txt" 2>&1

MAX_JOBS=6 bash csrc/gpu_build.sh "$PY" > "$LOGS/build_cuda.log" 2>&1 &
build=$!

pids=()
names=()
run() {  # name, pytest arguments...
    local name=$1
    shift
    "$PY" -m pytest -q -p no:cacheprovider "$@" > "$LOGS/test_$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
}
for file in tests/ops/test_*.py; do
    [ "$file" = tests/ops/test_losses.py ] || run "ops_$(basename "$file" .py | sed 's/^test_//')" "$file"
done
for part in clean embedding feature input "half or routes or unavailable"; do
    run "ops_losses_${part%% *}" tests/ops/test_losses.py -k "$part"
done
if wait "$build"; then
    echo "cuda extension built at $(elapsed)" >> "$OUT/summary.txt"
    run cuda_backend tests/test_backend_cuda.py
    backends=triton,cuda
else
    echo "cuda extension FAILED to build (logs/build_cuda.log)" >> "$OUT/summary.txt"
    backends=triton
fi
status=0
for k in "${!pids[@]}"; do
    if wait "${pids[$k]}"; then result=passed; else result=FAILED; status=1; fi
    echo "${names[$k]}: $result: $(tail -n 1 "$LOGS/test_${names[$k]}.log")" >> "$OUT/summary.txt"
done
echo "tests done at $(elapsed)" >> "$OUT/summary.txt"
# at most 8 files come back from the device: pack the test logs now, in case a later step is cut
tar -czf "$OUT/test-logs.tar.gz" -C "$LOGS" . && rm -f "$LOGS"/*

"$PY" bench/gpu_bench.py --out "$OUT" --backends "$backends" --budget "${BUDGET:-240}" > "$LOGS/bench.log" 2>&1 \
    || { status=1; echo "gpu_bench FAILED (logs/bench.log)" >> "$OUT/summary.txt"; }
echo "bench done at $(elapsed)" >> "$OUT/summary.txt"

"$PY" python/step_time.py --model resnet50 --batch-size 100 --image-size 224 --device cuda --steps 12 \
    --mixups none,feature,embedding > "$OUT/step-time.txt" 2>&1 \
    || { status=1; echo "step_time FAILED (step-time.txt)" >> "$OUT/summary.txt"; }
"$PY" bench/gpu_profile.py > "$OUT/profile.txt" 2>&1 \
    || { status=1; echo "gpu_profile FAILED (profile.txt)" >> "$OUT/summary.txt"; }
echo "all done at $(elapsed), status $status" >> "$OUT/summary.txt"

mv "$LOGS/bench.log" "$OUT/" && rmdir "$LOGS"
cat "$OUT/summary.txt" "$OUT/step-time.txt" "$OUT/gpu-bench.md" 2>/dev/null
exit $status
