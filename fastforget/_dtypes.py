"""Dtypes shared by every op: what may be loaded, and what the math runs in."""

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def accumulate_dtype(tensors):
    """fp64 when any tensor is fp64 (so that gradcheck is meaningful), else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
