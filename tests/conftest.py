"""Test setup: Triton kernels run under the interpreter on CPU-only machines (must be set before import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastforget  # noqa: E402

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


from fastforget.testing import import_installed_kernels_package  # noqa: E402

import_installed_kernels_package()  # before any test imports transformers
