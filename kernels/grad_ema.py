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
    contiguous,
    copy_back,
    launch_groups,
    narrows_through_fp32,
    on_device,
    register,
)

BLOCK = 4096


@triton.jit
def _block(tables, blocks, num_tensors, num_blocks, G: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor index in the caller's list, element offsets and mask, and g, m, v pointers."""
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + 3 * num_tensors + t)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    g_ptr = tl.load(tables + t).to(tl.pointer_type(G)) + offs
    m_ptr = tl.load(tables + num_tensors + t).to(tl.pointer_type(ACC)) + offs
    v_ptr = tl.load(tables + 2 * num_tensors + t).to(tl.pointer_type(ACC)) + offs
    return tl.load(tables + 6 * num_tensors + t), offs < n, g_ptr, m_ptr, v_ptr


@triton.jit
def _max_var_kernel(
    tables, blocks, num_tensors, num_blocks, scale_ptr, alphas, partials,
    ACC: tl.constexpr, G: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    index, mask, g_ptr, m_ptr, v_ptr = _block(tables, blocks, num_tensors, num_blocks, G, ACC, BLOCK)
    alpha = tl.load(alphas + index)
    x = tl.load(scale_ptr).to(ACC) * tl.load(g_ptr, mask=mask, other=0).to(ACC)
    d = x - tl.load(m_ptr, mask=mask, other=0)
    v_new = (1 - alpha) * (tl.load(v_ptr, mask=mask, other=0) + alpha * d * d)
    v_new = tl.where(v_new == v_new, v_new, float("inf"))  # NaN -> +inf, which a max keeps
    tl.store(partials + tl.program_id(0), tl.max(v_new, axis=0))


@triton.jit
def _protect_kernel(
    tables, blocks, num_tensors, num_blocks, scale_ptr, alphas, var_scales, skip_ptr, threshold,
    ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    index, mask, g_ptr, m_ptr, v_ptr = _block(tables, blocks, num_tensors, num_blocks, G, ACC, BLOCK)
    mask = mask & (tl.arange(0, BLOCK) < tl.where(tl.load(skip_ptr) == 0, BLOCK, 0))  # skip: no element
    alpha = tl.load(alphas + index)
    g = tl.load(g_ptr, mask=mask, other=0).to(ACC)
    m = tl.load(m_ptr, mask=mask, other=0)
    x = tl.load(scale_ptr).to(ACC) * g
    d = x - m
    v_new = (1 - alpha) * (tl.load(v_ptr, mask=mask, other=0) + alpha * d * d)
    importance = tl.sigmoid(v_new * tl.load(var_scales + index))
    out = tl.where(importance > threshold, (1 - importance) * g, g)
    if G_VIA_FP32:
        out = out.to(tl.float32)
    tl.store(m_ptr, m + alpha * d, mask=mask)
    tl.store(v_ptr, v_new, mask=mask)
    tl.store(g_ptr, out.to(G), mask=mask)


def _launch(kernel, groups, acc, *args, **constexprs):
    """Runs kernel over each dtype group; an arg or constexpr given as a function is evaluated per group."""
    for group in groups:
        if group.num_blocks:
            kernel[(group.num_blocks,)](
                group.tables, group.blocks, group.num_tensors, group.num_blocks,
                *(arg(group) if callable(arg) else arg for arg in args),
                ACC=ACCUMULATE_TYPES[acc], G=group.dtypes[0], BLOCK=BLOCK,
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
        owner = torch.cat(
            [torch.tensor(g.members).repeat_interleave(torch.tensor(g.blocks_per_tensor)) for g in groups]
        )
        out = torch.zeros(len(grads), dtype=acc, device=device)
        return out.scatter_reduce_(0, owner.to(device), partials[:total_blocks], "amax")


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
