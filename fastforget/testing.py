"""Helpers to verify fastforget's kernels against their references (used by tests/ and `make check`).

Kernels compute in fp32 (fp64 for fp64 inputs) and round once to the output dtype, so the tolerance depends only
on the output's dtype. This is the one tolerance table of the project.

Matrix products (``assert_close_matmul``) need one addition. An element of a product is a sum of K terms, which
implementations add in different orders and through differently rounded intermediates (PEFT rounds x A^T and the
base output to the input dtype; tiles split K differently), so its error is bounded relative to the size of its
terms, not to its own value, which cancellation can make arbitrarily small. Products are therefore compared with
``atol = rtol * max|expected|`` on top of the element-wise tolerance: a norm-wise bound that holds for any K with
K * eps_fp32 well below rtol (K up to ~1e4 for fp32 results, far beyond for 16-bit ones).
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


def assert_close_matmul(actual, expected, dtype=None):
    """Compare a matrix product (or a tensor computed from one) with the norm-wise bound described above."""
    tolerance = TOLERANCES[dtype or expected.dtype]
    largest = expected.detach().double().abs().max().item() if expected.numel() else 0.0
    atol = max(tolerance["atol"], tolerance["rtol"] * largest)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance["rtol"], atol=atol)


def import_installed_kernels_package():
    """Import the Hugging Face ``kernels`` package (which transformers imports) before the repository's own
    ``kernels/`` folder (installed as ``fastforget.kernels``) can shadow it: it does whenever the repository root is
    on sys.path, as under ``python -m pytest`` run from it. Without that package installed, nothing happens."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if "kernels" in sys.modules:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        import kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved
