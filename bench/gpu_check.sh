#!/usr/bin/env bash
# The device check for a lent GPU machine (no network; torch, triton, ninja present), in parts that each finish
# within 420 s by their own timeouts, so each fits one call of the device tool (600 s a command) with room for the
# start-up. Everything lands under $OUT (the device tool brings that folder back; default ./gpu_out).
#
#   bash bench/gpu_check.sh tests    1. build with CUDA, run the GPU tests (cuda and triton backends, GPU-only
#                                       tests) without stopping at a failure: $OUT/tests.log, $OUT/junit.xml
#   bash bench/gpu_check.sh tables   2. build, then every benchmark table on the GPU and lora_linear in bf16 at
#                                       8192x4096x4096, r = 16: $OUT/tables.json, $OUT/tables.md, $OUT/tables.log
#
# Each part builds first (a later call may get a fresh machine); the build is skipped when fastforget._C with CUDA
# kernels is already importable. Budget per part: build 150 s + its work 250 s (+ 20 s of reporting).
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-}"
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
mkdir -p "$OUT"

build() {
  {
    echo "== machine"
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    echo "== build (CUDA extension)"
    # loaded CUDA kernels, not merely buildable ones (available_backends() counts those that build on first use)
    if FASTFORGET_JIT=0 "$PY" -c "import fastforget as ff, sys; sys.exit(ff.dispatch._why_not('cuda', 'cuda', build=False) is not None or not ff._extension.LOADED_FROM)" 2>/dev/null; then
      echo "already built"
    else
      time FASTFORGET_BUILD_EXT=1 timeout 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -20
    fi
    FASTFORGET_JIT=0 "$PY" -c "import fastforget as ff; [print(f'{k:10s} {v.available!s:5s} {v.reason}') for k, v in ff.available_backends().items()]"
  } 2>&1 | tee "$OUT/build.log"
}

case "$PART" in
  tests)
    build
    echo "== GPU tests"
    # -k: every test parametrised over cuda or triton, and the tests that exist only on a GPU (not the CUDA
    # emulator's, which CI runs on the CPU); -n 4 workers on the one GPU; no -x, so one failure hides nothing;
    # 120 s per test at most.
    timeout 250 "$PY" -m pytest tests -q -p no:cacheprovider -k "(cuda or triton or gpu or GPU) and not emulator" -n 4 \
      --maxfail=1000 --timeout=120 -rfE --junitxml="$OUT/junit.xml" > "$OUT/tests.log" 2>&1
    echo "pytest exit code $? (124: the part's timeout)" | tee -a "$OUT/tests.log"
    tail -40 "$OUT/tests.log"
    ;;
  tables)
    build
    echo "== benchmark tables"
    timeout 250 "$PY" bench/gpu_tables.py --out "$OUT" --repeats 10 > "$OUT/tables.log" 2>&1
    echo "gpu_tables exit code $? (124: the part's timeout; tables.md holds every table finished)" | tee -a "$OUT/tables.log"
    cat "$OUT/tables.md" 2>/dev/null | head -150
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh tests|tables   (see the header of this file)" >&2
    exit 2
    ;;
esac
