"""Triton kernel of the protected AdamW step with block-wise 8-bit moments (math:
fastforget/ops/protected_adamw8bit_step.py; the format: fastforget/quantize.py), one launch per dtype group over the
whole list (multi_tensor.py). Each program handles ROWS quantization blocks of 256 elements of one tensor, as a
(ROWS, 256) tile: the moments (and an 8-bit Fisher) dequantized by a gather from the map, then the 32-bit step's
math (protected_adamw_step.py: EWC term, protection, AdamW, SI), the param updated from the unquantized new moments;
then per row the new absmax (tl.max: order-free) and each new moment's code, found by a vectorised binary search over
the map's midpoints. One penalty partial per program, summed in a fixed order (no atomics). A set ``found_inf``
masks every element: nothing is written, read on the device (no host synchronisation).
"""

import torch
import triton
import triton.language as tl

from fastforget._schemas import qualname
from fastforget.kernels.ewc_penalty import _sum_partials_kernel
from fastforget.kernels.multi_tensor import contiguous, copy_back, launch_groups, on_device, register
from fastforget.kernels.protected_adamw_step import (
    ANCHOR,
    EXP_AVG,
    EXP_AVG_SQ,
    FISHER,
    GRAD,
    GRAD_FACTOR,
    OMEGA,
    PARAM,
    _check_lengths,
    _ptr,
    adamw_update,
    protected_grad,
    step_tables,
)
from fastforget.kernels.protected_adamw_step import ROLES as ROLES_32BIT

QBLOCK = tl.constexpr(256)  # bitsandbytes' optimizer block (fastforget.quantize.BLOCKSIZE)
CODES = tl.constexpr(256)  # entries of a map
ROWS = 4  # quantization blocks per program
# the 32-bit step's roles (exp_avg, exp_avg_sq: codes; fisher: codes or floats), then each 8-bit state's absmax
EXP_AVG_ABSMAX, EXP_AVG_SQ_ABSMAX, FISHER_ABSMAX = (tl.constexpr(ROLES_32BIT.value + i) for i in range(3))
ROLES = tl.constexpr(ROLES_32BIT.value + 3)
MIN_ABSMAX = tl.constexpr(1e-38)  # an all-zero block keeps absmax 0 but scales by 1 / MIN_ABSMAX
NO_PROTECT, TENSOR, ELEMENT = 0, 1, 2


@triton.jit
def _dequantize(tables, num_tensors, t, offs, mask, qblock, row_mask, role, absmax_role, map_ptr):
    """map[code] * absmax[block] (fp32) of the elements offs of tensor t's 8-bit state in `role`."""
    codes = tl.load(_ptr(tables, role, num_tensors, t, tl.uint8) + offs, mask=mask, other=0)
    absmax = tl.load(_ptr(tables, absmax_role, num_tensors, t, tl.float32) + qblock, mask=row_mask, other=0)
    return tl.load(map_ptr + codes.to(tl.int32)) * absmax[:, None]


@triton.jit
def _requantize(x, mask, qblock, row_mask, codes_ptr, absmax_ptr, map_ptr):
    """Stores the rows' absmax = max |x| and each x's code: the number of midpoints (map[j] + map[j + 1]) / 2 below
    clamp(x * (1 / max(absmax, MIN_ABSMAX)), -1, 1) (a value on a midpoint takes the lower index), by binary
    search."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    tl.store(absmax_ptr + qblock, absmax, mask=row_mask)
    inverse = tl.math.div_rn(1.0, tl.where(absmax < MIN_ABSMAX, MIN_ABSMAX, absmax))  # correctly rounded, as torch
    scaled = tl.minimum(tl.maximum(x * inverse[:, None], -1.0), 1.0)
    below = tl.zeros(x.shape, tl.int32)  # midpoints 0 .. below - 1 are < scaled
    for k in tl.static_range(8):  # steps CODES / 2, CODES / 4, ..., 1
        step = CODES // (2 << k)
        probe = map_ptr + below + step - 1
        below += tl.where((tl.load(probe) + tl.load(probe + 1)) * 0.5 < scaled, step, 0)
    tl.store(codes_ptr, below.to(tl.uint8), mask=mask)


@triton.jit
def _step8bit_kernel(
    tables, blocks, num_tensors, num_blocks, per_tensor, scalars, qmap_signed, qmap_unsigned, skip_ptr, partials,
    P: tl.constexpr, G: tl.constexpr, A: tl.constexpr, F: tl.constexpr, EWC: tl.constexpr, FISHER_8BIT: tl.constexpr,
    PROTECT: tl.constexpr, SI: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + ROLES * num_tensors + t)
    index = tl.load(tables + 2 * ROLES * num_tensors + t)
    rows = tl.arange(0, ROWS)
    qblock = start // QBLOCK + rows  # the rows' quantization blocks in the tensor
    row_mask = (qblock * QBLOCK < n) & (rows < tl.where(tl.load(skip_ptr) == 0, ROWS, 0))  # skip: no row
    offs = start + (rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]).to(tl.int64)
    mask = (offs < n) & row_mask[:, None]
    row = per_tensor + index * 5
    p_ptr = _ptr(tables, PARAM, num_tensors, t, P) + offs
    theta = tl.load(p_ptr, mask=mask, other=0).to(tl.float32)
    g_task = tl.load(scalars + GRAD_FACTOR) * tl.load(
        _ptr(tables, GRAD, num_tensors, t, G) + offs, mask=mask, other=0
    ).to(tl.float32)
    f = tl.zeros_like(theta)
    if EWC:
        if FISHER_8BIT:
            f = _dequantize(tables, num_tensors, t, offs, mask, qblock, row_mask, FISHER, FISHER_ABSMAX, qmap_unsigned)
        else:
            f = tl.load(_ptr(tables, FISHER, num_tensors, t, F) + offs, mask=mask, other=0).to(tl.float32)
    grad, penalty = protected_grad(tables, num_tensors, t, offs, mask, theta, g_task, f, row, scalars, tl.float32, A,
                                   EWC, PROTECT)  # fmt: skip
    if EWC:
        tl.store(partials + pid, tl.sum(tl.sum(penalty, axis=1), axis=0))
    m1 = _dequantize(tables, num_tensors, t, offs, mask, qblock, row_mask, EXP_AVG, EXP_AVG_ABSMAX, qmap_signed)
    m2 = _dequantize(tables, num_tensors, t, offs, mask, qblock, row_mask, EXP_AVG_SQ, EXP_AVG_SQ_ABSMAX, qmap_unsigned)
    m1, m2, stored = adamw_update(theta, m1, m2, grad, row, scalars, tl.float32, P, False)
    tl.store(p_ptr, stored, mask=mask)
    if SI:  # omega -= g_task (theta_new - theta_old), theta_new as stored
        w_ptr = _ptr(tables, OMEGA, num_tensors, t, tl.float32) + offs
        tl.store(w_ptr, tl.load(w_ptr, mask=mask, other=0) - g_task * (stored.to(tl.float32) - theta), mask=mask)
    _requantize(m1, mask, qblock, row_mask, _ptr(tables, EXP_AVG, num_tensors, t, tl.uint8) + offs,
                _ptr(tables, EXP_AVG_ABSMAX, num_tensors, t, tl.float32), qmap_signed)  # fmt: skip
    _requantize(m2, mask, qblock, row_mask, _ptr(tables, EXP_AVG_SQ, num_tensors, t, tl.uint8) + offs,
                _ptr(tables, EXP_AVG_SQ_ABSMAX, num_tensors, t, tl.float32), qmap_unsigned)  # fmt: skip


def protected_adamw8bit_step(
    params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed, qmap_unsigned, steps,
    anchors, fisher, fisher_absmax, factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf, lr,
    beta1, beta2, eps, weight_decay, lam, threshold, maximize,
):  # fmt: skip
    lists = dict(grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, anchors=anchors, fisher=fisher)
    lists.update(ema_mean=ema_mean, ema_var=ema_var, omega=omega)
    _check_lengths(params, lists, dict(factors=factors, alpha=alpha, var_scale=var_scale), steps)
    if len(grads) != len(params) or bool(anchors) != bool(fisher) or bool(ema_mean) != bool(ema_var):
        raise RuntimeError("fastforget: grads, anchors/fisher and ema_mean/ema_var must come complete")
    absmax_lists = dict(exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax)
    if fisher_absmax:
        absmax_lists.update(fisher_absmax=fisher_absmax)
    for name, absmax in absmax_lists.items():
        counts = [-(-p.numel() // QBLOCK.value) for p in params]
        if len(absmax) != len(params) or any(a.numel() != c for a, c in zip(absmax, counts)):
            raise RuntimeError(f"fastforget: {name} must hold ceil(numel / 256) scales per param")
    if any(t.dtype != torch.uint8 for t in [*exp_avg, *exp_avg_sq]) or qmap_signed.numel() != CODES.value:
        raise RuntimeError("fastforget: exp_avg and exp_avg_sq must be uint8 codes of a 256-entry map")
    if bool(fisher_absmax) != any(f.dtype == torch.uint8 for f in fisher) or qmap_unsigned.numel() != CODES.value:
        raise RuntimeError("fastforget: an 8-bit fisher (uint8) comes with fisher_absmax, a float one without")
    device = params[0].device
    work = contiguous(params)  # a non-contiguous param is updated through a copy, written back below
    grads, anchors, fisher = contiguous(grads), contiguous(anchors), contiguous(fisher)
    skip = torch.zeros((), dtype=torch.bool, device=device) if found_inf is None else found_inf.reshape(()) != 0
    with on_device(device):
        per_tensor, scalars = step_tables(steps, factors, alpha, var_scale, grad_scale, torch.float32, device, lr,
                                          beta1, beta2, eps, weight_decay, lam, threshold, maximize)  # fmt: skip
        roles = [work, grads, exp_avg, exp_avg_sq]
        roles += [anchors or work, fisher or work, ema_mean or work, ema_var or work, omega or work]
        roles += [exp_avg_absmax, exp_avg_sq_absmax, fisher_absmax or exp_avg_absmax]
        groups, total_blocks = launch_groups(roles, ROWS * QBLOCK.value)
        partials = torch.zeros(max(total_blocks, 1), dtype=torch.float32, device=device)
        protect = TENSOR if factors is not None else ELEMENT if ema_mean else NO_PROTECT
        skip_flag = skip.to(torch.int32)
        for group in groups:
            if group.num_blocks:
                _step8bit_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, per_tensor, scalars,
                    qmap_signed.contiguous(), qmap_unsigned.contiguous(), skip_flag, partials[group.first_block :],
                    P=group.dtypes[PARAM], G=group.dtypes[GRAD], A=group.dtypes[ANCHOR], F=group.dtypes[FISHER],
                    EWC=bool(anchors), FISHER_8BIT=bool(fisher_absmax), PROTECT=protect, SI=bool(omega), ROWS=ROWS,
                )  # fmt: skip
        penalty = torch.empty((), dtype=torch.float32, device=device)
        lam_scalar = torch.full((1,), lam, dtype=torch.float32, device=device)
        _sum_partials_kernel[(1,)](partials, total_blocks, penalty, lam_scalar, BLOCK=1024)
        for s in steps:
            s.add_((~skip).to(s.dtype))
    copy_back(params, work)
    return torch.where(skip, 0.0, penalty)


register(qualname("protected_adamw8bit_step", "_triton"), protected_adamw8bit_step)
