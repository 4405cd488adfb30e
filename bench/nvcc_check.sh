#!/usr/bin/env bash
# Compile-checks the CUDA code with plain nvcc for sm_80 and sm_90, on machines without a GPU:
#  1. the torch-free kernel bodies (csrc/cuda/*.cuh, instantiated by csrc/cuda/nvcc_check.cu);
#  2. the torch bindings (csrc/cuda/*.cu) against the installed torch's headers, when a Python with torch is
#     found ($PYTHON, else .venv/bin/python). A CPU build of torch lacks one generated header,
#     c10/cuda/impl/cuda_cmake_macros.h; an empty stand-in is supplied for it.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "nvcc-check: SKIPPED (no nvcc on PATH)"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

"$NVCC" -c -std=c++17 -Werror all-warnings "${archs[@]}" csrc/cuda/nvcc_check.cu -o "$out/kernels.o"
echo "nvcc-check: kernel bodies OK ($("$NVCC" --version | tail -1); sm_80, sm_90)"

PY="${PYTHON:-.venv/bin/python}"
if ! includes="$("$PY" -c 'import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(include_paths() + [sysconfig.get_paths()["include"]]))' 2>/dev/null)"; then
  echo "nvcc-check: bindings SKIPPED (no Python with torch at $PY)"
  exit 0
fi
mkdir -p "$out/stub/c10/cuda/impl"
echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
flags=(-isystem "$out/stub")
for dir in $includes; do flags+=(-isystem "$dir"); done
for binding in $(ls csrc/cuda/*.cu | grep -v nvcc_check.cu); do
  "$NVCC" -c -std=c++17 -Werror all-warnings "${archs[@]}" "${flags[@]}" --expt-relaxed-constexpr \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H \
    "$binding" -o "$out/$(basename "$binding").o"
  echo "nvcc-check: binding $binding OK"
done
