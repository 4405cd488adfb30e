#!/usr/bin/env bash
# Compile-checks the torch-free CUDA kernel bodies (csrc/cuda/*.cuh) for sm_80 and sm_90 with plain nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" ]]; then
  echo "nvcc-check: SKIPPED (no nvcc on PATH)"
  exit 0
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$NVCC" -c -std=c++17 -Werror all-warnings \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  csrc/cuda/nvcc_check.cu -o "$out/nvcc_check.o"
echo "nvcc-check: OK ($("$NVCC" --version | tail -1); sm_80, sm_90)"
