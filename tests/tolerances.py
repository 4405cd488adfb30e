"""The one per-dtype tolerance table: results are computed in fp32 (fp64 for fp64), then rounded to the dtype."""

import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
}


def assert_close(actual, expected, dtype=None):
    """Compare in fp64 with the tolerance of `dtype` (default: expected's dtype)."""
    tol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual.double(), expected.double(), **tol)
