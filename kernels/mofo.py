"""Triton kernels of MoFO's ops (math: fastforget/ops/mofo.py), one launch per dtype group over the whole list
(multi_tensor.py).

``mofo_histogram``: each program counts the digit of its block's elements that match the tensor's prefix
(``tl.histogram``) and adds its nonzero bins to the tensor's row with integer atomics (exact in any order:
deterministic). ``mofo_thresholds``: the radix select's passes over these histograms, the digits picked on the
device (``fastforget.ops.mofo.select_by_histograms``: no host sync). ``mofo_update``: the masked AdamW update and
SI's path integral; a set ``found_inf`` masks every element (read on the device).
"""

import torch
import triton
import triton.language as tl

from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import qualname
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
from fastforget.ops.mofo import BINS, select_by_histograms

BLOCK = 1024
PARAM, EXP_AVG, EXP_AVG_SQ, GRAD, OMEGA = map(tl.constexpr, range(5))
UPDATE_ROLES = tl.constexpr(5)
BIT_TYPES = {torch.float32: (tl.int32, 0x7FFFFFFF), torch.float64: (tl.int64, 0x7FFFFFFFFFFFFFFF)}


@triton.jit
def _abs_bits(m, BITS: tl.constexpr, MAGNITUDE: tl.constexpr):
    """The bit pattern of |m| (the sign bit cleared): non-negative, ordered like |m|."""
    return m.to(BITS, bitcast=True) & MAGNITUDE


@triton.jit
def _histogram_kernel(
    tables, blocks, num_tensors, num_blocks, prefix, out, shift, digit_bits,
    ACC: tl.constexpr, BITS: tl.constexpr, MAGNITUDE: tl.constexpr, ALL: tl.constexpr, BINS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + num_tensors + t)
    index = tl.load(tables + 2 * num_tensors + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < n
    m = tl.load(tl.load(tables + t).to(tl.pointer_type(ACC)) + offs, mask=inside, other=0)
    bits = _abs_bits(m, BITS, MAGNITUDE)
    digit = ((bits >> shift) & ((1 << digit_bits) - 1)).to(tl.int32)
    if not ALL:  # the later passes: only the elements whose higher digits are the prefix
        inside = inside & ((bits >> (shift + digit_bits)) == tl.load(prefix + index))
    counts = tl.histogram(digit, BINS, mask=inside)
    bins = tl.arange(0, BINS)
    tl.atomic_add(out + index * BINS + bins, counts, mask=counts != 0)


def mofo_histogram(exp_avg, prefix, shift, digit_bits):
    if len(prefix) != len(exp_avg):
        raise RuntimeError(f"fastforget: prefix has {prefix.numel()} elements; expected {len(exp_avg)}")
    acc = accumulate_dtype(exp_avg)
    device = exp_avg[0].device
    out = torch.zeros(len(exp_avg), BINS, dtype=torch.int32, device=device)
    bits, magnitude = BIT_TYPES[acc]
    groups, _ = launch_groups((exp_avg,), BLOCK)
    with on_device(device):
        want = prefix.to(device, torch.int64).contiguous()
        for group in groups:
            if group.num_blocks:
                _histogram_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, want, out, shift, digit_bits,
                    ACC=ACCUMULATE_TYPES[acc], BITS=bits, MAGNITUDE=magnitude,
                    ALL=shift + digit_bits >= torch.finfo(acc).bits, BINS=BINS, BLOCK=BLOCK,
                )  # fmt: skip
    return out


def mofo_thresholds(exp_avg, ks):
    return select_by_histograms(exp_avg, ks, mofo_histogram)


@triton.jit
def _sqrt(x, ACC: tl.constexpr):
    """sqrt(x) correctly rounded: Triton's fp32 sqrt is approximate (sqrt.approx); sqrt_rn takes fp32 only."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _ptr(tables, role, num_tensors, t, T: tl.constexpr):
    return tl.load(tables + role * num_tensors + t).to(tl.pointer_type(T))


@triton.jit
def _update_kernel(
    tables, blocks, num_tensors, num_blocks, per_tensor, thresholds, scalars, skip_ptr,
    ACC: tl.constexpr, P: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, MAGNITUDE: tl.constexpr,
    SI: tl.constexpr, P_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + UPDATE_ROLES * num_tensors + t)
    index = tl.load(tables + 2 * UPDATE_ROLES * num_tensors + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = (offs < n) & (tl.arange(0, BLOCK) < tl.where(tl.load(skip_ptr) == 0, BLOCK, 0))  # skip: no element
    p_ptr = _ptr(tables, PARAM, num_tensors, t, P) + offs
    theta = tl.load(p_ptr, mask=mask, other=0).to(ACC)
    m1 = tl.load(_ptr(tables, EXP_AVG, num_tensors, t, ACC) + offs, mask=mask, other=0)
    m2 = tl.load(_ptr(tables, EXP_AVG_SQ, num_tensors, t, ACC) + offs, mask=mask, other=0)
    threshold = tl.load(thresholds + index)  # -1: no element selected
    selected = (threshold >= 0) & (_abs_bits(m1, BITS, MAGNITUDE).to(tl.int64) >= threshold)
    m1 = tl.where(selected, m1, 0)  # theta * decay exactly where not selected
    # correctly rounded sqrt and division, as torch's AdamW (Triton's fp32 defaults are approximate)
    denom = _div(_sqrt(m2, ACC), tl.load(per_tensor + 2 * index + 1), ACC) + tl.load(scalars + 2)
    new_theta = theta * tl.load(scalars + 1) - _div(tl.load(per_tensor + 2 * index) * m1, denom, ACC)
    if P_VIA_FP32:
        new_theta = new_theta.to(tl.float32)
    stored = new_theta.to(P)
    tl.store(p_ptr, stored, mask=mask)
    if SI:  # omega -= g_task (theta_new - theta_old), theta_new as stored
        g_task = tl.load(scalars) * tl.load(_ptr(tables, GRAD, num_tensors, t, G) + offs, mask=mask, other=0).to(ACC)
        w_ptr = _ptr(tables, OMEGA, num_tensors, t, ACC) + offs
        tl.store(w_ptr, tl.load(w_ptr, mask=mask, other=0) - g_task * (stored.to(ACC) - theta), mask=mask)


def mofo_update(params, exp_avg, exp_avg_sq, steps, thresholds, grads, omega, grad_scale, found_inf, lr, beta1,
                beta2, eps, weight_decay, maximize):  # fmt: skip
    """What memory safety needs, before any write (the Python layer checks the rest with full messages)."""
    lists = dict(exp_avg=exp_avg, exp_avg_sq=exp_avg_sq) | (dict(grads=grads, omega=omega) if omega else {})
    for name, tensors in lists.items():
        if len(tensors) != len(params) or any(a.numel() != p.numel() for a, p in zip(tensors, params)):
            raise RuntimeError(f"fastforget: {name} must have one tensor per param, with as many elements")
    if len(steps) != len(params):
        raise RuntimeError(f"fastforget: steps has {len(steps)} tensors for {len(params)} params")
    if thresholds.numel() != len(params):
        raise RuntimeError(f"fastforget: thresholds has {thresholds.numel()} entries for {len(params)} params")
    if not params:
        return
    acc = accumulate_dtype(params)
    device = params[0].device
    work = contiguous(params)  # a non-contiguous param is updated through a copy, written back below
    grads = contiguous(grads) if omega else work
    bits, magnitude = BIT_TYPES[acc]
    with on_device(device):
        k = torch.stack([s.reshape(()) for s in steps]).double()  # already stepped; bias corrections in fp64
        per_tensor = torch.stack([(lr / (1 - beta1**k)).to(acc), (1 - beta2**k).sqrt().to(acc)], 1).contiguous()
        grad_factor = torch.full((), -1.0 if maximize else 1.0, dtype=acc, device=device)
        if grad_scale is not None:
            grad_factor = grad_factor / grad_scale.reshape(()).to(acc)
        rest = torch.tensor([1 - lr * weight_decay, eps], dtype=acc, device=device)
        scalars = torch.cat([grad_factor.reshape(1), rest])
        skip = torch.zeros((), device=device) if found_inf is None else found_inf.reshape(())
        skip_flag = (skip != 0).to(torch.int32)
        thresholds = thresholds.to(device, torch.int64).contiguous()
        groups, _ = launch_groups([work, exp_avg, exp_avg_sq, grads, omega or work], BLOCK)
        for group in groups:
            if group.num_blocks:
                _update_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, per_tensor, thresholds, scalars,
                    skip_flag, ACC=ACCUMULATE_TYPES[acc], P=group.dtypes[PARAM], G=group.dtypes[GRAD], BITS=bits,
                    MAGNITUDE=magnitude, SI=bool(omega), P_VIA_FP32=narrows_through_fp32(acc, group.dtypes[PARAM]),
                    BLOCK=BLOCK,
                )  # fmt: skip
    copy_back(params, work)


register(qualname("mofo_histogram", "_triton"), mofo_histogram)
register(qualname("mofo_thresholds", "_triton"), mofo_thresholds)
register(qualname("mofo_update", "_triton"), mofo_update)
