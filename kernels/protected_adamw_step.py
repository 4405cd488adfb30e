"""Triton kernel of the protected AdamW step (math: fastforget/ops/protected_adamw_step.py), one launch per dtype
group over the whole list (multi_tensor.py). Each program handles BLOCK elements of one tensor: EWC term,
protection (per-tensor factor or the element EMA), AdamW, SI's path integral, and one penalty partial; a
single-program kernel sums the partials in a fixed order (no atomics). A set ``found_inf`` masks every element:
nothing is written, read on the device (no host synchronisation).
"""

import torch
import triton
import triton.language as tl

from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import qualname
from fastforget.kernels.ewc_penalty import _sum_partials_kernel
from fastforget.kernels.grad_ema import _sigmoid
from fastforget.kernels.grad_moments import _div
from fastforget.kernels.multi_tensor import (
    ACCUMULATE_TYPES,
    contiguous,
    copy_back,
    launch_groups,
    narrows_through_fp32,
    on_device,
    register,
)

BLOCK = 1024
# constexpr: a compiled kernel may read module globals only as constexprs (the interpreter reads any)
PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, ANCHOR, FISHER, EMA_MEAN, EMA_VAR, OMEGA = map(tl.constexpr, range(9))
ROLES = tl.constexpr(9)
NO_PROTECT, TENSOR, ELEMENT = 0, 1, 2
# columns of the per-tensor table and entries of the scalar vector (both in ACC, on the device)
STEP_SIZE, BC2_SQRT, FACTOR, ALPHA, VAR_SCALE = map(tl.constexpr, range(5))
GRAD_FACTOR, TWO_LAM, DECAY, BETA1_C, BETA2, BETA2_C, EPS, THRESHOLD = map(tl.constexpr, range(8))


@triton.jit
def _ptr(tables, role, num_tensors, t, T: tl.constexpr):
    return tl.load(tables + role * num_tensors + t).to(tl.pointer_type(T))


@triton.jit
def protected_grad(
    tables, num_tensors, t, offs, mask, theta, g_task, f, row, scalars,
    ACC: tl.constexpr, A: tl.constexpr, EWC: tl.constexpr, PROTECT: tl.constexpr,
):  # fmt: skip
    """(g', F (theta - anchor)^2) of the elements offs of tensor t: g_task plus the EWC term 2 lam F (theta -
    anchor) (f: F, unused without EWC), times the protection factor or the element EMA's (ema_mean, ema_var
    updated). Shared with the 8-bit step (protected_adamw8bit_step.py), whose tables start with these roles."""
    grad = g_task
    penalty = tl.zeros_like(theta)
    if EWC:
        a = tl.load(_ptr(tables, ANCHOR, num_tensors, t, A) + offs, mask=mask, other=0).to(ACC)
        fd = f * (theta - a)
        grad += tl.load(scalars + TWO_LAM) * fd
        penalty = fd * (theta - a)
    if PROTECT == 1:
        grad *= tl.load(row + FACTOR)
    if PROTECT == 2:  # the EMA of grad_ema_protect (Finch 2009)
        alpha = tl.load(row + ALPHA)
        em_ptr = _ptr(tables, EMA_MEAN, num_tensors, t, ACC) + offs
        ev_ptr = _ptr(tables, EMA_VAR, num_tensors, t, ACC) + offs
        mean = tl.load(em_ptr, mask=mask, other=0)
        d = grad - mean
        var = (1 - alpha) * (tl.load(ev_ptr, mask=mask, other=0) + alpha * d * d)
        importance = _sigmoid(var * tl.load(row + VAR_SCALE), ACC)  # exact: a threshold decides
        tl.store(em_ptr, mean + alpha * d, mask=mask)
        tl.store(ev_ptr, var, mask=mask)
        grad = tl.where(importance > tl.load(scalars + THRESHOLD), (1 - importance) * grad, grad)
    return grad, penalty


@triton.jit
def adamw_update(theta, m1, m2, grad, row, scalars, ACC: tl.constexpr, P: tl.constexpr, P_VIA_FP32: tl.constexpr):
    """(new m1, new m2, new theta as stored in P): torch.optim.AdamW's update in its order."""
    m1 = m1 + tl.load(scalars + BETA1_C) * (grad - m1)  # torch's lerp(m1, grad, 1 - beta1)
    m2 = tl.load(scalars + BETA2) * m2 + tl.load(scalars + BETA2_C) * grad * grad
    # correctly rounded sqrt and division, as torch's AdamW (Triton's fp32 defaults are sqrt.approx and div.full)
    denom = _div(tl.sqrt_rn(m2), tl.load(row + BC2_SQRT), ACC) + tl.load(scalars + EPS)
    new_theta = theta * tl.load(scalars + DECAY) - _div(tl.load(row + STEP_SIZE) * m1, denom, ACC)
    if P_VIA_FP32:
        new_theta = new_theta.to(tl.float32)
    return m1, m2, new_theta.to(P)


@triton.jit
def _step_kernel(
    tables, blocks, num_tensors, num_blocks, per_tensor, scalars, skip_ptr, partials,
    ACC: tl.constexpr, P: tl.constexpr, G: tl.constexpr, A: tl.constexpr, F: tl.constexpr, EWC: tl.constexpr,
    PROTECT: tl.constexpr, SI: tl.constexpr, P_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + ROLES * num_tensors + t)
    index = tl.load(tables + 2 * ROLES * num_tensors + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (offs < n) & (tl.arange(0, BLOCK) < tl.where(tl.load(skip_ptr) == 0, BLOCK, 0))  # skip: no element
    row = per_tensor + index * 5
    p_ptr = _ptr(tables, PARAM, num_tensors, t, P) + offs
    m1_ptr = _ptr(tables, EXP_AVG, num_tensors, t, ACC) + offs
    m2_ptr = _ptr(tables, EXP_AVG_SQ, num_tensors, t, ACC) + offs
    theta = tl.load(p_ptr, mask=mask, other=0).to(ACC)
    g_task = tl.load(scalars + GRAD_FACTOR) * tl.load(
        _ptr(tables, GRAD, num_tensors, t, G) + offs, mask=mask, other=0
    ).to(ACC)
    f = tl.zeros_like(theta)
    if EWC:
        f = tl.load(_ptr(tables, FISHER, num_tensors, t, F) + offs, mask=mask, other=0).to(ACC)
    grad, penalty = protected_grad(tables, num_tensors, t, offs, mask, theta, g_task, f, row, scalars, ACC, A, EWC,
                                   PROTECT)  # fmt: skip
    if EWC:
        tl.store(partials + pid, tl.sum(penalty, axis=0))
    m1 = tl.load(m1_ptr, mask=mask, other=0)
    m2 = tl.load(m2_ptr, mask=mask, other=0)
    m1, m2, stored = adamw_update(theta, m1, m2, grad, row, scalars, ACC, P, P_VIA_FP32)
    tl.store(m1_ptr, m1, mask=mask)
    tl.store(m2_ptr, m2, mask=mask)
    tl.store(p_ptr, stored, mask=mask)
    if SI:  # omega -= g_task (theta_new - theta_old), theta_new as stored
        w_ptr = _ptr(tables, OMEGA, num_tensors, t, ACC) + offs
        tl.store(w_ptr, tl.load(w_ptr, mask=mask, other=0) - g_task * (stored.to(ACC) - theta), mask=mask)


def _check_lengths(params, lists, per_tensor, steps):
    """What memory safety needs, before any write (the Python layer checks the rest with full messages)."""
    for name, tensors in lists.items():
        if tensors and (len(tensors) != len(params) or any(t.numel() != p.numel() for t, p in zip(tensors, params))):
            raise RuntimeError(f"fastforget: {name} must have one tensor per param, with as many elements")
    for name, t in per_tensor.items():
        if t is not None and t.numel() != len(params):
            raise RuntimeError(f"fastforget: {name} has {t.numel()} entries for {len(params)} params")
    if len(steps) != len(params) or any(s.numel() != 1 for s in steps):
        raise RuntimeError("fastforget: steps must hold one one-element tensor per param")


def step_tables(
    steps, factors, alpha, var_scale, grad_scale, acc, device, lr, beta1, beta2, eps, weight_decay, lam, threshold,
    maximize,
):  # fmt: skip
    """(per_tensor, scalars) on the device in acc, read by the kernels: per tensor (columns STEP_SIZE ..
    VAR_SCALE) lr / (1 - beta1^k), sqrt(1 - beta2^k) with k = step + 1 and the protection's values (1 where unused);
    the scalars GRAD_FACTOR .. THRESHOLD."""
    k = torch.stack([s.reshape(()) for s in steps]).double() + 1  # bias corrections in fp64, as torch's
    ones = torch.ones(len(steps), dtype=acc, device=device)
    per_tensor = torch.stack(
        [
            (lr / (1 - torch.pow(beta1, k))).to(acc),
            torch.sqrt(1 - torch.pow(beta2, k)).to(acc),
            ones if factors is None else factors.to(acc),
            ones if alpha is None else alpha.to(acc),
            ones if var_scale is None else var_scale.to(acc),
        ],
        dim=1,
    ).contiguous()
    grad_factor = torch.full((), -1.0 if maximize else 1.0, dtype=acc, device=device)
    if grad_scale is not None:
        grad_factor = grad_factor / grad_scale.reshape(()).to(acc)
    rest = torch.tensor(
        [2 * lam, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, threshold], dtype=acc, device=device
    )
    return per_tensor, torch.cat([grad_factor.reshape(1), rest])


def protected_adamw_step(
    params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, ema_mean, ema_var, alpha, var_scale,
    omega, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, lam, threshold, maximize,
):  # fmt: skip
    lists = dict(grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, anchors=anchors, fisher=fisher)
    lists.update(ema_mean=ema_mean, ema_var=ema_var, omega=omega)
    _check_lengths(params, lists, dict(factors=factors, alpha=alpha, var_scale=var_scale), steps)
    if len(grads) != len(params) or bool(anchors) != bool(fisher) or bool(ema_mean) != bool(ema_var):
        raise RuntimeError("fastforget: grads, anchors/fisher and ema_mean/ema_var must come complete")
    acc = accumulate_dtype(params)
    device = params[0].device
    work = contiguous(params)  # a non-contiguous param is updated through a copy, written back below
    grads, anchors, fisher = contiguous(grads), contiguous(anchors), contiguous(fisher)
    skip = torch.zeros((), dtype=torch.bool, device=device) if found_inf is None else found_inf.reshape(()) != 0
    with on_device(device):
        per_tensor, scalars = step_tables(steps, factors, alpha, var_scale, grad_scale, acc, device, lr, beta1, beta2,
                                          eps, weight_decay, lam, threshold, maximize)  # fmt: skip
        roles = [work, grads, exp_avg, exp_avg_sq]
        roles += [anchors or work, fisher or work, ema_mean or work, ema_var or work, omega or work]
        groups, total_blocks = launch_groups(roles, BLOCK)
        partials = torch.zeros(max(total_blocks, 1), dtype=acc, device=device)
        protect = TENSOR if factors is not None else ELEMENT if ema_mean else NO_PROTECT
        skip_flag = skip.to(torch.int32)
        for group in groups:
            if group.num_blocks:
                _step_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, per_tensor, scalars, skip_flag,
                    partials[group.first_block :], ACC=ACCUMULATE_TYPES[acc], P=group.dtypes[PARAM],
                    G=group.dtypes[GRAD], A=group.dtypes[ANCHOR], F=group.dtypes[FISHER], EWC=bool(anchors),
                    PROTECT=protect, SI=bool(omega), P_VIA_FP32=narrows_through_fp32(acc, group.dtypes[PARAM]),
                    BLOCK=BLOCK,
                )  # fmt: skip
        penalty = torch.empty((), dtype=acc, device=device)
        lam_scalar = torch.full((1,), lam, dtype=acc, device=device)
        _sum_partials_kernel[(1,)](partials, total_blocks, penalty, lam_scalar, BLOCK=1024)
        for s in steps:
            s.add_((~skip).to(s.dtype))
    copy_back(params, work)
    return torch.where(skip, 0.0, penalty)


register(qualname("protected_adamw_step", "_triton"), protected_adamw_step)
