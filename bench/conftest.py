"""pytest setup for the benchmarks (collected via ``python_files = ... bench_*.py``)."""

import os
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("FF_BENCH_SMOKE", "0") not in ("", "0") and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # smoke-run the Triton path too (before fastforget imports)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `from bench import harness` in any import mode

from bench import harness  # noqa: E402


@pytest.fixture(scope="session")
def add_bandwidth_gbps() -> float:
    """GB/s of the torch.add baseline over the GPT-2 list's element count, measured once per run."""
    return harness.add_bandwidth_gbps(harness.gpt2_numel(harness.bench_scale()), harness.bench_device())
