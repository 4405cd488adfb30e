"""grads[i] *= factors[i] over a whole list, in place, in one launch (fp32 math, rounded once to each dtype).

The in-place pass of gradient protection: ``factors`` is a 1-D tensor with one entry per gradient, typically on
the gradients' device, so that no host synchronisation is needed between computing and applying it.
"""

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname
from fastforget.ops.grad_moments import _checked_grads


def scale_grads_ref(grads, factors):
    """Pure torch, per tensor: g <- factor * g computed in fp32 (fp64 for fp64 lists)."""
    acc = accumulate_dtype(grads)
    with torch.no_grad():
        for g, f in zip(grads, factors.to(acc)):
            g.copy_(g.to(acc) * f)


def scale_grads_(grads, factors, *, backend="auto"):
    """grads[i] *= factors[i] for every i, in place. Nothing is written on bad input."""
    grads = _checked_grads(grads)
    if not isinstance(factors, torch.Tensor) or factors.dim() != 1 or not factors.is_floating_point():
        raise TypeError("factors must be a 1-D floating point tensor")
    if factors.numel() != len(grads):
        raise ValueError(f"factors has {factors.numel()} entries but grads has {len(grads)} tensors")
    check.check_distinct("grads", grads)
    if grads and factors.device != grads[0].device:
        raise ValueError(f"factors is on {factors.device} but the grads are on {grads[0].device}")
    check.check_writes([("grads", grads)], [("factors", [factors])])
    if grads:
        run_scale_grads(grads, factors, backend)


def run_scale_grads(grads, factors, backend):
    """scale_grads_ without the argument checks, for callers whose gradients are valid by construction."""
    backend = dispatch.resolve(backend, grads[0].device, "scale_grads_")
    if backend == "reference":
        return scale_grads_ref(grads, factors)
    with torch.no_grad():
        dispatch.native_op("scale_grads", backend)(grads, factors)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("scale_grads", _flavour))(lambda grads, factors: None)
