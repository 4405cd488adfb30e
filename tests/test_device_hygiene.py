"""The test suite itself: every backend's test builds its tensors on that backend's device (a GPU run would
otherwise fail on CPU tensors that the CPU-only run cannot notice)."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import BACKEND_DEVICE, FUSED_BACKENDS, BackendDevice, backend_of

TESTS = sorted(Path(__file__).parent.glob("test_*.py"))
BACKEND_ARGS = {"backend", "fused_backend"}


def test_factories_follow_the_backend_device():
    generator = torch.Generator().manual_seed(0)
    with BackendDevice("meta"):
        assert torch.zeros(2).device.type == "meta"
        assert torch.tensor([1.0]).device.type == "meta"
        assert torch.randn(2, generator=generator).device.type == "cpu"  # a seeded CPU generator stays usable
        assert torch.ones(2, device="cpu").device.type == "cpu"  # an explicit device wins
    assert torch.zeros(2).device.type == "cpu"


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_a_backend_test_runs_on_its_device(request, backend):
    assert backend_of(request) == backend
    assert torch.empty(1).device.type == BACKEND_DEVICE[backend]


def _pins_cpu(node):
    """A call with device="cpu"."""
    for kw in getattr(node, "keywords", []):
        if kw.arg == "device" and isinstance(kw.value, ast.Constant) and kw.value.value == "cpu":
            return True
    return False


@pytest.mark.parametrize("path", TESTS, ids=[p.name for p in TESTS])
def test_no_backend_test_pins_its_inputs_to_the_cpu(path):
    """A test that takes a backend must not create its inputs with device="cpu": they would miss the GPU."""
    offenders = []
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, ast.FunctionDef) or not BACKEND_ARGS & {a.arg for a in fn.args.args}:
            continue
        offenders += [
            f"{fn.name}:{node.lineno}" for node in ast.walk(fn) if isinstance(node, ast.Call) and _pins_cpu(node)
        ]
    assert not offenders, f"{path.name}: backend tests create CPU tensors by hand at {offenders}"
