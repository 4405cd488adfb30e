"""Fisher accumulation over a whole parameter list, in place:

    F <- decay * F + scale * g^2,   or, for a stack of k gradients g_s (grads[i] shaped (k, *F.shape)),
    F <- decay * F + scale * sum_s g_s^2

``decay=1, scale=1/N`` over N squared gradients is the empirical Fisher's mean; ``decay=gamma`` is online EWC's
decay (Schwarz et al. 2018). ``absolute=True`` accumulates ``|g|`` instead of ``g^2``: Memory Aware Synapses'
importance (Aljundi et al. 2018), the mean of ``|d ||f(x)||^2 / d theta|`` over samples. A stack is what
``torch.func.vmap`` returns for per-sample gradients, so a chunk of samples is one call. One fused pass: F and
every g_s are read and F written once per element.
"""

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname

_FISHER_DTYPES = check.FLOAT_DTYPES


def _stacked(f, g):
    return g.dim() == f.dim() + 1 and g.shape[1:] == f.shape


def fisher_update_ref(fisher, grads, decay=1.0, scale=1.0, absolute=False):
    """Pure torch, per tensor: F <- decay F + scale sum g^2 (|g| when absolute) in fp32 (fp64 for fp64 lists),
    rounded once to F."""
    fisher, grads = check.tensor_list("fisher", fisher), check.tensor_list("grads", grads)
    acc = accumulate_dtype(fisher)
    with torch.no_grad():
        for f, g in zip(fisher, grads):
            squares = g.to(acc).abs() if absolute else g.to(acc).square()
            f.copy_(decay * f.to(acc) + scale * (squares.sum(0) if _stacked(f, g) else squares))


def _check_inputs(fisher, grads, decay, scale):
    fisher = check.tensor_list("fisher", fisher)
    grads = check.tensor_list("grads", grads)
    decay = check.check_scalar("decay", decay, minimum=0.0)
    scale = check.check_scalar("scale", scale, minimum=0.0)
    if len(grads) == len(fisher):
        device = fisher[0].device if fisher else None
        if all(  # the fast path: one pass, no messages
            f.dtype in _FISHER_DTYPES and g.dtype in check.FLOAT_DTYPES and f.layout == g.layout == torch.strided
            and f.device == g.device == device and (f.shape == g.shape or _stacked(f, g))
            for f, g in zip(fisher, grads)
        ):  # fmt: skip
            return fisher, grads, decay, scale
    # something is wrong: find the first problem and name it
    if len(grads) != len(fisher):
        raise ValueError(f"grads has {len(grads)} tensors but fisher has {len(fisher)}")
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if f.shape != g.shape and not _stacked(f, g):
            expected = f"{tuple(f.shape)} or (k, *{tuple(f.shape)})"
            raise ValueError(f"grads[{i}] has shape {tuple(g.shape)}; expected {expected} for fisher[{i}]")
        if g.device != f.device:
            raise ValueError(f"grads[{i}] is on {g.device} but fisher[{i}] is on {f.device}")
    check.check_one_device("fisher", fisher)
    for i, (f, g) in enumerate(zip(fisher, grads)):
        check.check_dtype("fisher", i, f, _FISHER_DTYPES)
        check.check_dtype("grads", i, g, check.FLOAT_DTYPES)
    return fisher, grads, decay, scale


def fisher_update_(fisher, grads, decay=1.0, scale=1.0, *, absolute=False, backend="auto"):
    """F <- decay * F + scale * g^2 (``absolute``: scale * |g|) for every pair (fisher[i], grads[i]), in place, in
    one launch.

    ``grads[i]`` is shaped like ``fisher[i]``, or ``(k, *fisher[i].shape)``: a stack of k gradients whose squares
    are all added (k may differ between tensors). ``fisher`` is fp32, bf16, fp16 (or fp64); ``grads`` any float
    dtype; math in fp32. ``decay`` and ``scale`` are
    finite and >= 0, so F stays >= 0. Fisher tensors must not overlap in memory. Nothing is written on bad input.
    """
    fisher, grads, decay, scale = _check_inputs(fisher, grads, decay, scale)
    check.check_bool("absolute", absolute)
    check.check_writes([("fisher", fisher)], [("grads", grads)])
    if not fisher:
        return
    backend = dispatch.resolve(backend, fisher[0].device, "fisher_update_")
    if backend == "reference":
        return fisher_update_ref(fisher, grads, decay, scale, absolute)
    with torch.no_grad():
        dispatch.native_op("fisher_update", backend)(fisher, grads, decay, scale, absolute)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("fisher_update", _flavour))(
        lambda fisher, grads, decay, scale, absolute=False: None
    )
