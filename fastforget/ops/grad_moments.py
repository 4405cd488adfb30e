"""Per-tensor moments of a gradient list, the statistic behind streaming gradient-variance importance:

    for x = inv_scale * grads[i]:  (count, mean, M2) = (numel, mean(x), sum (x - mean(x))^2)

returned as a (len(grads), 3) tensor in the accumulation dtype (fp32, fp64 for fp64 lists). Computed in one pass
over each gradient with no sum(x^2) - sum(x)^2 cancellation (shifted data, corrected two-pass blocks, Chan et al.
merges in a fixed order): bitwise reproducible, accurate for gradients like 1e4 + 1e-3 noise. A row whose mean
or M2 is not finite -- a NaN/Inf gradient, or values whose deviations overflow the accumulation dtype (|x| near
3e38 in fp32) -- has mean = M2 = NaN on every backend. ``inv_scale`` undoes an AMP GradScaler's scale (a float
or a 0-dim tensor).
"""

import math

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import FLOAT_DTYPES, accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname


def grad_moments_ref(grads, inv_scale=1.0):
    """Pure torch, per tensor: (numel, mean, sum of squared deviations) computed in fp64 (two passes), returned
    in the accumulation dtype."""
    grads = check.tensor_list("grads", grads)
    acc = accumulate_dtype(grads)
    rows = []
    for g in grads:
        x = g.double().reshape(-1) * torch.as_tensor(inv_scale, dtype=torch.float64, device=g.device)
        mean = x.mean() if x.numel() else x.new_zeros(())
        rows.append(torch.stack([x.new_tensor(float(x.numel())), mean, (x - mean).square().sum()]))
    return torch.stack(rows).to(acc) if rows else torch.zeros(0, 3)


def _inv_scale_tensor(inv_scale, device):
    if isinstance(inv_scale, torch.Tensor):
        if inv_scale.numel() != 1 or not inv_scale.is_floating_point():
            raise ValueError("inv_scale must be a float or a one-element floating point tensor")
        return inv_scale.reshape(()).to(device)
    return torch.tensor(check.check_scalar("inv_scale", inv_scale), device=device)


def _checked_grads(grads):
    grads = check.tensor_list("grads", grads)
    check.check_one_device("grads", grads)
    for i, g in enumerate(grads):
        check.check_dtype("grads", i, g, FLOAT_DTYPES)
    return grads


def grad_moments(grads, inv_scale=1.0, *, backend="auto"):
    """(count, mean, M2) of inv_scale * grads[i] for every i, as a (len(grads), 3) tensor, in one launch."""
    grads = _checked_grads(grads)
    if not grads:
        return torch.zeros(0, 3)
    return run_grad_moments(grads, _inv_scale_tensor(inv_scale, grads[0].device), backend)


def run_grad_moments(grads, inv_scale, backend):
    """grad_moments without the argument checks, for callers whose gradients are valid by construction."""
    backend = dispatch.resolve(backend, grads[0].device, "grad_moments")
    if backend == "reference":
        rows = grad_moments_ref(grads, inv_scale)
    else:
        rows = dispatch.native_op("grad_moments", backend)(grads, inv_scale)
    # one rule for overflow: the backends' intermediate steps overflow differently (a shifted pass gives NaN
    # where the fp64 reference gives mean 0 and M2 inf), so any non-finite statistic makes both NaN
    finite = rows[:, 1:].isfinite().all(dim=1, keepdim=True)
    return torch.cat([rows[:, :1], torch.where(finite, rows[:, 1:], math.nan)], dim=1)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("grad_moments", _flavour))(
        lambda grads, inv_scale: inv_scale.new_empty((len(grads), 3), dtype=accumulate_dtype(grads))
    )
