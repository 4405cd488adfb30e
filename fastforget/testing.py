"""Helpers to verify fastforget's kernels against their references (used by tests/ and `make check`).

Kernels compute in fp32 (fp64 for fp64 inputs) and round once to the output dtype, so the tolerance depends only
on the output's dtype. This is the one tolerance table of the project.
"""

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def assert_close(actual, expected, dtype=None):
    """Compare in fp64 with the tolerance of `dtype` (default: expected's dtype)."""
    torch.testing.assert_close(actual.double(), expected.double(), **TOLERANCES[dtype or expected.dtype])
