#!/usr/bin/env bash
# One prepared run for a lent GPU machine (no network; torch, triton, ninja present): build with CUDA, run the
# test suite on the GPU, run the benchmarks, print one table. Budget: < 8 minutes.
#   bash bench/gpu_check.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (CUDA extension)"
time "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -5
"$PY" -c "import fastforget as ff; [print(f'{k:10s} {v.available!s:5s} {v.reason}') for k, v in ff.available_backends().items()]"

echo "== nvcc compile check"
bash bench/nvcc_check.sh || true

echo "== tests (GPU)"
timeout 300 "$PY" -m pytest tests -q -x -p no:cacheprovider 2>&1 | tail -15 || echo "TESTS FAILED OR TIMED OUT"

echo "== verification of every backend + benchmark tables (GPT-2-small-shaped list, fp32)"
timeout 200 "$PY" bench/check.py --repeats 20 || echo "CHECK FAILED OR TIMED OUT"

echo "== LoRA linear at the GPU size (M=8192 tokens, in=out=4096, r=16, bf16; check.py printed the CPU size)"
timeout 150 "$PY" bench/bench_lora_linear.py --tokens 8192 --features 4096 --rank 16 --dtype bfloat16 --repeats 20 \
  || echo "LORA BENCHMARK FAILED OR TIMED OUT"

echo "== EWC end to end"
timeout 60 "$PY" bench/bench_ewc.py --repeats 5 2>/dev/null || echo "EWC BENCHMARK FAILED OR TIMED OUT"
