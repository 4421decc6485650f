#!/usr/bin/env bash
# Build metrix_kernels._cuda in place (offline), for the GPU machine or any host with nvcc and a CUDA
# build of torch. Independent of setup.py's other extensions. Usage: csrc/gpu_build.sh [python]
# TORCH_CUDA_ARCH_LIST picks the architectures (default here: the visible GPU's, else sm_80 + sm_90).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
# CUDA_HOME: the first of $CUDA_HOME, /usr/local/cuda, nvcc's parent that has the runtime headers
# (an nvcc wrapper in /usr/local/bin would make torch guess /usr/local)
for dir in "${CUDA_HOME:-}" /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /nonexistent)")")")"; do
  if [ -n "$dir" ] && [ -f "$dir/include/cuda_runtime_api.h" ]; then export CUDA_HOME="$dir"; break; fi
done
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else None; print(f'{c[0]}.{c[1]}' if c else '')")
  [ -n "$ARCH" ] && export TORCH_CUDA_ARCH_LIST="$ARCH"
fi
start=$(date +%s)
"$PY" - <<'PYEOF'
import sys
sys.path.insert(0, "csrc")
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension
from cuda_build import cuda_extension

setup(
    name="metrix-kernels-cuda",
    ext_modules=[cuda_extension(force=True)],
    cmdclass={"build_ext": BuildExtension},
    script_args=["build_ext", "--inplace"],
)
PYEOF
echo "gpu_build: built $(ls metrix_kernels/_cuda*.so) in $(( $(date +%s) - start ))s"
