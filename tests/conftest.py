"""Test setup: Triton kernels run under the interpreter on CPU-only machines (must be set before import).

Every test parametrised by a backend (the ``backend`` / ``fused_backend`` fixtures, or ``parametrize("backend", ...)``)
runs with torch's default device set to that backend's device, so a tensor made without ``device=`` lands where the
backend runs; tests/test_device_hygiene.py checks that no such test pins a tensor to the CPU by hand.
"""

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite tests the ahead-of-time build (`make test` builds fastforget._C in place); a process that cannot load it
# falls back to the reference rather than building just in time (tests/test_install.py tests that build).
os.environ.setdefault("FASTFORGET_JIT", "0")

import pytest  # noqa: E402
from torch.utils._device import DeviceContext, _device_constructors  # noqa: E402

import fastforget  # noqa: E402
from fastforget.testing import import_installed_kernels_package  # noqa: E402

import_installed_kernels_package()  # before any test imports transformers

CUDA = torch.cuda.is_available()
# The device each backend is tested on: triton on the GPU when there is one, else under the interpreter.
BACKEND_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda" if CUDA else "cpu", "reference": "cpu"}
FUSED_BACKENDS = [b for b in ("cpu", "cuda", "triton") if fastforget.dispatch._why_not(b, BACKEND_DEVICE[b]) is None]


@pytest.fixture(params=FUSED_BACKENDS + ["reference"])
def backend(request):
    return request.param


@pytest.fixture(params=FUSED_BACKENDS)
def fused_backend(request):
    return request.param


def device_of(backend):
    return torch.device(BACKEND_DEVICE[backend])


class BackendDevice(DeviceContext):
    """``with torch.device(d)``, except that a factory call given a ``generator`` and no ``device`` creates its
    tensor on the generator's device: seeded CPU generators (the same numbers on every machine) keep working."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _device_constructors() and kwargs.get("device") is None:
            generator = kwargs.get("generator")
            kwargs["device"] = generator.device if generator is not None else self.device
        return func(*args, **kwargs)


def backend_of(request):
    """The backend a test is parametrised by (fixture or parametrize), or None."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    return params.get("backend", params.get("fused_backend"))


@pytest.fixture(autouse=True)
def _backend_default_device(request):
    """Factory calls without ``device=`` in a backend's test create tensors on that backend's device."""
    backend = backend_of(request)
    if backend not in BACKEND_DEVICE:
        yield
        return
    with BackendDevice(BACKEND_DEVICE[backend]):
        yield


@contextlib.contextmanager
def num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def launch_variants(n):
    """Launches of an n-tensor list that split the work differently, as (threads, order): the CPU kernels chunk by
    thread count; on a GPU (and in Triton's interpreter) the thread count changes nothing, so the list also goes in
    reversed and rotated, which gives every tensor other programs, launched in another order. An op whose result
    must not depend on how it was launched gives every tensor the same bits under each (put back in list order)."""
    identity = list(range(n))
    return [(1, identity), (2, identity), (2, identity[::-1]), (1, identity[1:] + identity[:1])]


def run_launch_variants(fn, lists):
    """fn(*lists) -> per-tensor outputs (a list, in the order of its inputs), under every launch variant; returns
    each variant's outputs in the original list order."""
    n = len(lists[0])
    results = []
    for threads, order in launch_variants(n):
        with num_threads(threads):
            out = fn(*[[lst[i] for i in order] for lst in lists])
        restored = [None] * n
        for position, i in enumerate(order):
            restored[i] = out[position]
        results.append(restored)
    return results
