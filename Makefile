# Everything a fresh machine needs: `make demo` (the continual-learning demo), `make test` (the test suite) and
# `make check` (verify every backend + benchmark).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
DEPS_STAMP  := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.fastforget-built
NATIVE_SRC  := setup.py fastforget/_build.py $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/* csrc/cuda/*)
DEMO_FLAGS  ?=

.PHONY: demo check test bench bench-smoke nvcc-check lint build clean

demo: $(BUILD_STAMP)
	$(PY) -m fastforget demo --out demo_out $(DEMO_FLAGS)

check: $(BUILD_STAMP)
	$(PY) bench/check.py

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q

bench: $(BUILD_STAMP)
	$(PY) -m pytest bench -q

bench-smoke: $(BUILD_STAMP)
	FF_BENCH_SMOKE=1 $(PY) -m pytest bench -q --benchmark-disable

nvcc-check:
	bash bench/nvcc_check.sh

lint: $(DEPS_STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

build: $(BUILD_STAMP)

# torch: reuse one the venv can import; else $(TORCH_SPEC) (the CPU wheel on this kind of machine).
$(DEPS_STAMP): Makefile  # a changed dependency list reinstalls
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q "triton>=3.6" ninja setuptools wheel numpy pytest pytest-benchmark hypothesis ruff safetensors \
		scikit-learn matplotlib tqdm pytest-timeout pytest-xdist
	# Hugging Face stack: the integrations' tests and the LM demo (fastforget imports without it)
	$(PIP) install -q "transformers==5.25.*" "peft==0.21.*" "bitsandbytes==0.50.*" "accelerate==1.16.*" \
		tokenizers trl
	touch $@

# The kernels ahead of time, in place (a user's `pip install` builds them just in time instead): offline and fast.
$(BUILD_STAMP): $(DEPS_STAMP) $(NATIVE_SRC)
	FASTFORGET_BUILD_EXT=1 $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info fastforget/_C*.so $(BUILD_STAMP)
