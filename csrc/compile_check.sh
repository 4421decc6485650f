#!/usr/bin/env bash
# Compile every CUDA source with nvcc for sm_80 and sm_90 (ptxas -v) and fail on a compile error or
# on any register spill / stack frame in a kernel (every kernel here is hot). The torch-free kernels
# build with nvcc alone; the binding too when a CUDA build of torch with its headers is importable
# (skip it with METRIX_CHECK_BINDING=0). Prints a registers/spills table per kernel and arch.
set -euo pipefail
cd "$(dirname "$0")/cuda"
# CUDA_HOME: the first of $CUDA_HOME, /usr/local/cuda, nvcc's parent that has the runtime headers
# (an nvcc wrapper in /usr/local/bin would make torch guess /usr/local)
for dir in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
  if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then export CUDA_HOME="$dir"; break; fi
done
NVCC=${NVCC:-${CUDA_HOME:+$CUDA_HOME/bin/nvcc}}
NVCC=${NVCC:-nvcc}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
start=$(date +%s)

pids=()
for arch in 80 90; do
  for src in *.cu; do
    "$NVCC" -O3 -std=c++17 -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v -c "$src" \
      -o "$OUT/${src%.cu}.$arch.o" > "$OUT/${src%.cu}.$arch.log" 2>&1 &
    pids+=("$!:$src sm_$arch")
  done
done
status=0
for entry in "${pids[@]}"; do
  if ! wait "${entry%%:*}"; then
    echo "compile error: ${entry#*:}"; status=1
  fi
done
for log in "$OUT"/*.log; do
  if [ $status -ne 0 ]; then cat "$log"; fi
done
[ $status -eq 0 ] || exit 1

# ptxas: "Compiling entry function '<mangled>' for 'sm_XX'", then its stack/spill line and "Used N registers"
report=$(cat "$OUT"/*.log | awk '
  /Compiling entry function/ { split($0, q, "\047"); name = q[2]; arch = q[4] }
  /bytes stack frame/ { stack = $1; spill = $5 + $9 }
  /Used [0-9]+ registers/ { for (k = 1; k <= NF; ++k) if ($k == "Used") regs = $(k + 1);
                            printf "%-6s regs %3d  stack %3d  spill %3d  %s\n", arch, regs, stack, spill, name }')
if command -v c++filt > /dev/null; then report=$(echo "$report" | c++filt); fi
echo "$report"
bad=$(echo "$report" | awk '$5 > 0 || $7 > 0' || true)
if [ -n "$bad" ]; then
  echo "FAIL: register spills or stack frames in:"; echo "$bad"; exit 1
fi

if [ "${METRIX_CHECK_BINDING:-1}" != "0" ]; then
  PY=${PYTHON:-python}
  if flags=$("$PY" - 2>/dev/null <<'PYEOF'
import sysconfig, torch
from torch.utils.cpp_extension import include_paths
assert torch.version.cuda
print(" ".join(["-I" + p for p in include_paths("cuda")] + ["-I" + sysconfig.get_paths()["include"]]))
PYEOF
  ); then
    # torch's own headers pick the standard they need (C++20 from torch 2.13 on)
    std=$("$PY" -c "import torch; print('c++20' if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 13) else 'c++17')")
    c++ -std=$std -fsyntax-only -DTORCH_EXTENSION_NAME=_cuda -DTORCH_API_INCLUDE_EXTENSION_H $flags \
      -I"${CUDA_HOME:-/usr/local/cuda}/include" binding.cpp
    echo "binding.cpp: compiles against torch $("$PY" -c 'import torch; print(torch.__version__)')"
  else
    echo "binding.cpp: not checked (no CUDA build of torch importable)"
  fi
fi
echo "compile_check: OK in $(( $(date +%s) - start ))s"
