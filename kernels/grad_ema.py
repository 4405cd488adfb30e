"""Triton kernels of per-element gradient protection (math: fastforget/ops/grad_ema.py), one launch per dtype group:

d = x - m,  m' = m + alpha d,  v' = (1 - alpha)(v + alpha d^2),  x = inv_scale * g
_max_var_kernel:  each program writes the max v' of its block (+inf if one is NaN/Inf); torch then takes the
                  per-tensor max of those partials (a max is exact: the order does not matter)
_protect_kernel:  unless skip: m <- m', v <- v', g <- (1 - s) g where s = sigmoid(v' var_scale[t]) > threshold
"""

import torch
import triton
import triton.language as tl

from fastforget import _validation as check
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import qualname
from fastforget.kernels.multi_tensor import (
    ACCUMULATE_TYPES,
    block_offsets,
    contiguous,
    copy_back,
    launch_groups,
    narrows_through_fp32,
    on_device,
    program_block,
    register,
    role_pointer,
)

BLOCK = 2048
# 8 elements per thread, and up to 255 registers each (16 warps would allow 128): the protect kernel's exact
# sigmoid needs about 120 with a misaligned list; no spills with fp32, 16-bit or fp64 lists (tests/test_ptx.py)
NUM_WARPS = 8


@triton.jit
def _pointers(tables, num_tensors, t, start, G: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor t's index in the caller's list and its g, m, v pointers at element `start`."""
    g_ptr = role_pointer(tables, num_tensors, t, 0, start, G, ALIGNED)
    m_ptr = role_pointer(tables, num_tensors, t, 1, start, ACC, ALIGNED)
    v_ptr = role_pointer(tables, num_tensors, t, 2, start, ACC, ALIGNED)
    return tl.load(tables + 6 * num_tensors + t), g_ptr, m_ptr, v_ptr


@triton.jit
def _updated_var(g_ptr, m_ptr, v_ptr, offs, scale, alpha, ACC: tl.constexpr):
    """g, m, d = x - m and v' = (1 - alpha)(v + alpha d^2) at offs."""
    g = tl.load(g_ptr + offs).to(ACC)
    m = tl.load(m_ptr + offs)
    d = scale * g - m
    return g, m, d, (1 - alpha) * (tl.load(v_ptr + offs) + alpha * d * d)


@triton.jit
def _max_var_block(
    g_ptr, m_ptr, v_ptr, count, scale, alpha, partials, ACC: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr
):  # fmt: skip
    offs, _ = block_offsets(count, BLOCK, FULL)
    # past the end: the last element's v' again (block_offsets), which leaves the max as it is
    v_new = _updated_var(g_ptr, m_ptr, v_ptr, offs, scale, alpha, ACC)[3]
    v_new = tl.where(v_new == v_new, v_new, float("inf"))  # NaN -> +inf, which a max keeps
    tl.store(partials + tl.program_id(0), tl.max(v_new, axis=0))


@triton.jit
def _max_var_kernel(
    tables, blocks, num_tensors, num_blocks, scale_ptr, alphas, partials,
    ACC: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    count = tl.load(tables + 3 * num_tensors + t) - start
    index, g_ptr, m_ptr, v_ptr = _pointers(tables, num_tensors, t, start, G, ACC, ALIGNED)
    alpha = tl.load(alphas + index)
    scale = tl.load(scale_ptr).to(ACC)
    if count >= BLOCK:  # a full block: no mask
        _max_var_block(g_ptr, m_ptr, v_ptr, count, scale, alpha, partials, ACC, BLOCK, True)
    else:
        _max_var_block(g_ptr, m_ptr, v_ptr, count, scale, alpha, partials, ACC, BLOCK, False)


@triton.jit
def _sigmoid(x, ACC: tl.constexpr):
    """sigmoid(x) = 1 / (1 + e^-x), in fp64 rounded once to ACC: Triton's fp32 exp and division are approximate
    (ex2.approx, div.full), and near the threshold they would scale other elements than the other backends."""
    return (1.0 / (1.0 + tl.exp(-x.to(tl.float64)))).to(ACC)


@triton.jit
def _protect_block(
    g_ptr, m_ptr, v_ptr, count, scale, alpha, var_scale, threshold,
    ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    offs, mask = block_offsets(count, BLOCK, FULL)
    g, m, d, v_new = _updated_var(g_ptr, m_ptr, v_ptr, offs, scale, alpha, ACC)
    importance = _sigmoid(v_new * var_scale, ACC)
    out = tl.where(importance > threshold, (1 - importance) * g, g)
    if G_VIA_FP32:
        out = out.to(tl.float32)
    tl.store(m_ptr + offs, m + alpha * d, mask=mask)
    tl.store(v_ptr + offs, v_new, mask=mask)
    tl.store(g_ptr + offs, out.to(G), mask=mask)


@triton.jit
def _protect_kernel(
    tables, blocks, num_tensors, num_blocks, scale_ptr, alphas, var_scales, skip_ptr, threshold,
    ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    if tl.load(skip_ptr) == 0:  # skip: no element
        t, start = program_block(blocks, num_blocks, BLOCK)
        count = tl.load(tables + 3 * num_tensors + t) - start
        index, g_ptr, m_ptr, v_ptr = _pointers(tables, num_tensors, t, start, G, ACC, ALIGNED)
        alpha = tl.load(alphas + index)
        var_scale = tl.load(var_scales + index)
        scale = tl.load(scale_ptr).to(ACC)
        args = (g_ptr, m_ptr, v_ptr, count, scale, alpha, var_scale, threshold)
        if count >= BLOCK:  # a full block: no mask
            _protect_block(*args, ACC, G, G_VIA_FP32, BLOCK, True)
        else:
            _protect_block(*args, ACC, G, G_VIA_FP32, BLOCK, False)


def _launch(kernel, groups, acc, *args, **constexprs):
    """Runs kernel over each dtype group; an arg or constexpr given as a function is evaluated per group."""
    for group in groups:
        if group.num_blocks:
            kernel[(group.num_blocks,)](
                group.tables, group.blocks, group.num_tensors, group.num_blocks,
                *(arg(group) if callable(arg) else arg for arg in args),
                ACC=ACCUMULATE_TYPES[acc], G=group.dtypes[0], ALIGNED=group.aligned, BLOCK=BLOCK, num_warps=NUM_WARPS,
                **{name: value(group) for name, value in constexprs.items()},
            )  # fmt: skip


def check_state(grads, mean, var, inv_scale, alpha):
    check.check_same_layout("mean", mean, grads, "grads")
    check.check_same_layout("var", var, grads, "grads")
    check.check_numel("inv_scale", inv_scale, 1)
    check.check_numel("alpha", alpha, len(grads))


def grad_ema_stats(grads, mean, var, inv_scale, alpha):
    check_state(grads, mean, var, inv_scale, alpha)
    grads = contiguous(grads)
    acc = accumulate_dtype(mean)  # the state's dtype
    device = grads[0].device
    groups, total_blocks = launch_groups((grads, mean, var), BLOCK)
    with on_device(device):
        partials = torch.empty(max(total_blocks, 1), dtype=acc, device=device)
        _launch(
            _max_var_kernel, groups, acc, inv_scale.to(device, acc), alpha.to(device, acc).contiguous(),
            lambda group: partials[group.first_block :],
        )  # fmt: skip
        owner = torch.cat([g.blocks[2] for g in groups])  # each partial's tensor in the list
        out = torch.zeros(len(grads), dtype=acc, device=device)
        return out.scatter_reduce_(0, owner, partials[:total_blocks], "amax")


def grad_ema_protect(grads, mean, var, inv_scale, alpha, var_scale, skip, threshold):
    check_state(grads, mean, var, inv_scale, alpha)
    check.check_numel("var_scale", var_scale, len(grads))
    check.check_numel("skip", skip, 1)
    work = contiguous(grads)  # a non-contiguous gradient is updated through a copy, written back below
    acc = accumulate_dtype(mean)  # the state's dtype
    device = grads[0].device
    with on_device(device):
        _launch(
            _protect_kernel, launch_groups((work, mean, var), BLOCK)[0], acc, inv_scale.to(device, acc),
            alpha.to(device, acc).contiguous(), var_scale.to(device, acc).contiguous(), skip.to(device, torch.int32),
            threshold, G_VIA_FP32=lambda group: narrows_through_fp32(acc, group.dtypes[0]),
        )  # fmt: skip
    copy_back(grads, work)


register(qualname("grad_ema_stats", "_triton"), grad_ema_stats)
register(qualname("grad_ema_protect", "_triton"), grad_ema_protect)
