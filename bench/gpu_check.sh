#!/usr/bin/env bash
# One run on an offline GPU machine: tests/ops on CUDA (compiled Triton), then the benchmark table.
#   bash bench/gpu_check.sh RESULTS_DIR            (BACKENDS=triton,cuda to add a fused column)
# Test files run as parallel processes: Triton compiles per process, and compiling is the slow part.
set -uo pipefail
OUT=${1:?usage: bash bench/gpu_check.sh RESULTS_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1

start=$(date +%s)
pids=()
run() {  # name, pytest arguments...
    local name=$1
    shift
    "$PY" -m pytest -q -p no:cacheprovider "$@" > "$OUT/test_$name.log" 2>&1 &
    pids+=($!)
}
for file in tests/ops/test_*.py; do
    [ "$file" = tests/ops/test_losses.py ] || run "$(basename "$file" .py | sed 's/^test_//')" "$file"
done
for part in clean embedding feature input "half or routes or unavailable"; do
    run "losses_${part%% *}" tests/ops/test_losses.py -k "$part"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
tail -n 3 "$OUT"/test_*.log
echo "tests/ops on CUDA: $([ $status = 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s" | tee "$OUT/tests.txt"

"$PY" bench/gpu_bench.py --out "$OUT" --backends "${BACKENDS:-triton}" --budget 240 2>&1 | tee "$OUT/bench.log"
exit $status
