"""Elastic Weight Consolidation penalty (Kirkpatrick et al. 2017), fused over a whole parameter list.

    penalty = lam * sum_i sum_j F_ij * (theta_ij - anchor_ij)^2          (no 1/2: lam_here = lam_with_half / 2)
    d penalty / d theta = 2 * lam * F * (theta - anchor)

``ewc_penalty`` is differentiable (autograd registered on the op; backward recomputes from theta, anchor, F and
saves nothing new). ``ewc_penalty_`` is the single fused pass after ``task_loss.backward()``: it reads theta,
anchor, F and grad, writes grad += 2 lam F (theta - anchor), and returns the penalty.
"""

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname

_PARAM_DTYPES = check.FLOAT_DTYPES
_FISHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # or the param dtype (fp64)


# ---------------------------------------------------------------------------------------------------- reference


def ewc_penalty_ref(params, anchors, fisher, lam):
    """Pure torch, per tensor: lam * sum F (theta - anchor)^2, computed in fp32 (fp64 for fp64 params)."""
    params, anchors, fisher = (
        check.tensor_list(n, v) for n, v in zip(("params", "anchors", "fisher"), (params, anchors, fisher))
    )
    acc = accumulate_dtype(params)
    device = params[0].device if params else None
    total = torch.zeros((), dtype=acc, device=device)
    for p, a, f in zip(params, anchors, fisher):
        total = total + (f.to(acc) * (p.to(acc) - a.to(acc)).square()).sum()
    return lam * total


def ewc_penalty_accumulate_ref(params, anchors, fisher, grads, lam):
    """Pure torch: grads += 2 lam F (theta - anchor) (rounded once to each grad's dtype); returns the penalty."""
    with torch.no_grad():
        acc = accumulate_dtype(params)
        for p, a, f, g in zip(params, anchors, fisher, grads):
            g.copy_(g.to(acc) + 2 * lam * f.to(acc) * (p.to(acc) - a.to(acc)))
        return ewc_penalty_ref(params, anchors, fisher, lam)


# ---------------------------------------------------------------------------------------------------- public API


def _grad_dtype(p):
    """The dtype torch gives p.grad: its grad_dtype where torch has one (not traceable: skipped by compile)."""
    if torch.compiler.is_compiling():
        return p.dtype
    return getattr(p, "grad_dtype", None) or p.dtype


def _checked_inputs(params, anchors, fisher, lam):
    params = check.tensor_list("params", params)
    anchors = check.tensor_list("anchors", anchors)
    fisher = check.tensor_list("fisher", fisher)
    lam = check.check_scalar("lam", lam, minimum=0.0)
    if len(anchors) == len(fisher) == len(params):
        device = params[0].device if params else None
        if all(  # the fast path: one pass, no messages
            p.dtype in _PARAM_DTYPES
            and a.dtype in (p.dtype, torch.float32, torch.bfloat16)
            and (f.dtype in _FISHER_DTYPES or f.dtype == p.dtype)
            and p.layout == a.layout == f.layout == torch.strided
            and p.device == a.device == f.device == device
            and p.shape == a.shape == f.shape
            for p, a, f in zip(params, anchors, fisher)
        ):
            return params, anchors, fisher, lam
    # something is wrong: find the first problem and name it
    check.check_like_params("anchors", anchors, params)
    check.check_like_params("fisher", fisher, params)
    check.check_one_device("params", params)
    for i, (p, a, f) in enumerate(zip(params, anchors, fisher)):
        check.check_dtype("params", i, p, _PARAM_DTYPES)
        check.check_dtype("anchors", i, a, (p.dtype, torch.float32, torch.bfloat16))
        check.check_dtype("fisher", i, f, (*_FISHER_DTYPES, p.dtype))
    return params, anchors, fisher, lam


def ewc_penalty(params, anchors, fisher, lam, *, backend="auto"):
    """lam * sum_i sum_j F_ij (theta_ij - anchor_ij)^2 as a differentiable 0-dim fp32 tensor.

    Gradients flow to ``params`` only; ``anchors`` and ``fisher`` are constants (they must not require grad).
    """
    params, anchors, fisher, lam = _checked_inputs(params, anchors, fisher, lam)
    for name, tensors in (("anchors", anchors), ("fisher", fisher)):
        for i, t in enumerate(tensors):
            if t.requires_grad:  # a gradient would silently not reach it
                raise ValueError(f"{name}[{i}] requires grad; EWC treats it as a constant: pass {name}[{i}].detach()")
    if not params:
        return torch.zeros(())
    backend = dispatch.resolve(backend, params[0].device, "ewc_penalty")
    if backend == "reference":
        return ewc_penalty_ref(params, anchors, fisher, lam)
    return dispatch.native_op("ewc_penalty", backend)(params, anchors, fisher, lam)


def ewc_penalty_(params, anchors, fisher, lam, *, backend="auto"):
    """One fused pass: p.grad += 2 lam F (theta - anchor) for every param; returns the penalty (detached).

    A param whose ``.grad`` is None gets a zero gradient first (of its ``grad_dtype``, else its dtype). A tensor
    may not be listed twice, and gradients must not overlap in memory (tensors whose memory spans interleave are
    rejected too). Nothing is written when an argument is rejected.
    """
    params, anchors, fisher, lam = _checked_inputs(params, anchors, fisher, lam)
    check.check_distinct("params", params)  # one tensor twice would get its gradient updated twice
    grads = [p.grad for p in params]  # torch itself keeps each .grad shaped and placed like its param
    for i, g in enumerate(grads):
        if g is not None and (g.dtype not in _PARAM_DTYPES or g.layout != torch.strided):
            check.check_dtype("grads", i, g, _PARAM_DTYPES)  # raises, naming the index
    check.check_writes([("grads", grads)], [("params", params), ("anchors", anchors), ("fisher", fisher)])
    if not params:
        return torch.zeros(())
    backend = dispatch.resolve(backend, params[0].device, "ewc_penalty_")
    # missing gradients: zeros in the dtype torch would give them
    grads = [torch.zeros_like(p, dtype=_grad_dtype(p)) if g is None else g for p, g in zip(params, grads)]
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g
    if backend == "reference":
        return ewc_penalty_accumulate_ref(params, anchors, fisher, grads, lam)
    with torch.no_grad():
        return dispatch.native_op("ewc_penalty_accumulate", backend)(params, anchors, fisher, grads, lam)


# ---------------------------------------------------------------------------------------------------- registration


def _register(flavour):
    penalty, backward, accumulate = (
        qualname(op, flavour) for op in ("ewc_penalty", "ewc_penalty_backward", "ewc_penalty_accumulate")
    )

    @torch.library.register_fake(penalty)
    def _(params, anchors, fisher, lam):
        return params[0].new_empty((), dtype=accumulate_dtype(params))

    @torch.library.register_fake(backward)
    def _(params, anchors, fisher, lam, grad_out):
        return [torch.empty(p.shape, dtype=p.dtype, device=p.device) for p in params]  # contiguous, as the kernels

    @torch.library.register_fake(accumulate)
    def _(params, anchors, fisher, grads, lam):
        return params[0].new_empty((), dtype=accumulate_dtype(params))

    def setup_context(ctx, inputs, output):
        params, anchors, fisher, ctx.lam = inputs
        ctx.count = len(params)
        ctx.save_for_backward(*params, *anchors, *fisher)  # the inputs themselves: no new memory

    backward_op = getattr(torch.ops.fastforget, backward.split("::")[1]).default

    def backward_fn(ctx, grad_out):
        saved, n = ctx.saved_tensors, ctx.count
        grads = backward_op(saved[:n], saved[n : 2 * n], saved[2 * n :], ctx.lam, grad_out)
        return list(grads), [None] * n, [None] * n, None

    torch.library.register_autograd(penalty, backward_fn, setup_context=setup_context)

    # Second order (gradgradcheck, Hessian-vector products): out_i = 2 lam g F_i (theta_i - anchor_i), so
    # d out_i / d theta_i = 2 lam g F_i and d out_i / d g = 2 lam F_i (theta_i - anchor_i). Plain torch: rare path.
    def setup_backward_context(ctx, inputs, output):
        params, anchors, fisher, ctx.lam, grad_out = inputs
        ctx.count = len(params)
        ctx.save_for_backward(*params, *anchors, *fisher, grad_out)

    def double_backward_fn(ctx, upstream):
        *saved, grad_out = ctx.saved_tensors
        n, c = ctx.count, 2 * ctx.lam
        params, anchors, fisher = saved[:n], saved[n : 2 * n], saved[2 * n :]
        acc = accumulate_dtype(params)
        d_params, d_grad_out = [], torch.zeros((), dtype=acc, device=grad_out.device)
        for p, a, f, v in zip(params, anchors, fisher, upstream):
            cfv = c * f.to(acc) * v.to(acc)
            d_params.append((cfv * grad_out.to(acc)).to(p.dtype))
            d_grad_out = d_grad_out + (cfv * (p.to(acc) - a.to(acc))).sum()
        return d_params, [None] * n, [None] * n, None, d_grad_out.to(grad_out.dtype)

    torch.library.register_autograd(backward, double_backward_fn, setup_context=setup_backward_context)


for _flavour in FLAVOURS:
    _register(_flavour)
