"""Triton kernels of the per-tensor moments (count, mean, M2) of x = inv_scale * grad.

Moments are of y = x - k with k the tensor's first x, so large offsets keep their digits (see
csrc/cpu/grad_moments.cpp). Each program computes its block's moments with the corrected two-pass algorithm
(Chan, Golub & LeVeque 1983) in registers and writes one partial; one program per tensor then merges that tensor's
partials in order, a batch at a time: a batch is pooled exactly (N = sum n_i, mean = sum n_i mean_i / N,
M2 = sum M2_i + sum n_i (mean_i - mean)^2) and merged into the running moments with Chan et al.'s (1979) update.
Deterministic: fixed order, no atomics.
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
    launch_groups,
    on_device,
    program_block,
    register,
    role_pointer,
)

BLOCK = 4096
NUM_WARPS = 16  # 8 elements per thread: no spills with fp32 or 16-bit lists (tests/test_ptx.py)
MERGE_BATCH = 1024


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """a / b correctly rounded: Triton's fp32 `/` is approximate (div.full); fp64's is exact."""
    if ACC == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _block_moments(g_ptr, count, scale, k, partials, ACC: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """(count, mean, M2) of the block's y = x - k, written to partials[pid]: M2 = sum d^2 - (sum d)^2 / count with
    d = y - sum y / count (the corrected two-pass algorithm)."""
    offs, mask = block_offsets(count, BLOCK, FULL)
    y = scale * tl.load(g_ptr + offs).to(ACC) - k
    if not FULL:
        y = tl.where(mask, y, 0)
    n = tl.minimum(count, BLOCK).to(ACC)
    m = _div(tl.sum(y, axis=0), n, ACC)
    d = y - m
    if not FULL:
        d = tl.where(mask, d, 0)
    s1 = tl.sum(d, axis=0)
    s2 = tl.sum(d * d, axis=0)
    pid = tl.program_id(0)
    tl.store(partials + 3 * pid, n)
    tl.store(partials + 3 * pid + 1, m + _div(s1, n, ACC))
    tl.store(partials + 3 * pid + 2, s2 - _div(s1 * s1, n, ACC))


@triton.jit
def _block_moments_kernel(
    tables, blocks, num_tensors, num_blocks, partials, shifts, scale_ptr,
    ACC: tl.constexpr, G: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    count = tl.load(tables + num_tensors + t) - start
    scale = tl.load(scale_ptr).to(ACC)
    k = scale * tl.load(role_pointer(tables, num_tensors, t, 0, 0, G, False)).to(ACC)  # the tensor's first x
    if start == 0:
        tl.store(shifts + tl.load(tables + 2 * num_tensors + t), k)
    g_ptr = role_pointer(tables, num_tensors, t, 0, start, G, ALIGNED)
    if count >= BLOCK:  # a full block: no mask
        _block_moments(g_ptr, count, scale, k, partials, ACC, BLOCK, True)
    else:
        _block_moments(g_ptr, count, scale, k, partials, ACC, BLOCK, False)


@triton.jit
def _merge_moments_kernel(partials, shifts, first_blocks, block_counts, out, ACC: tl.constexpr, BATCH: tl.constexpr):
    t = tl.program_id(0)
    first = tl.load(first_blocks + t)
    blocks = tl.load(block_counts + t)
    count = tl.zeros([], dtype=ACC)
    mean = tl.zeros([], dtype=ACC)
    m2 = tl.zeros([], dtype=ACC)
    for b in range(0, blocks, BATCH):
        idx = b + tl.arange(0, BATCH)
        valid = idx < blocks
        row = partials + 3 * (first + idx)
        n_i = tl.load(row, mask=valid, other=0)
        mean_i = tl.load(row + 1, mask=valid, other=0)
        m2_i = tl.load(row + 2, mask=valid, other=0)
        n_b = tl.sum(n_i, axis=0)
        mean_b = _div(tl.sum(n_i * mean_i, axis=0), n_b, ACC)
        dev = tl.where(valid, mean_i - mean_b, 0)
        m2_b = tl.sum(m2_i, axis=0) + tl.sum(n_i * dev * dev, axis=0)
        total = count + n_b
        delta = mean_b - mean
        mean += delta * _div(n_b, total, ACC)
        m2 += m2_b + delta * delta * _div(count * n_b, total, ACC)
        count = total
    tl.store(out + 3 * t, count)
    tl.store(out + 3 * t + 1, tl.where(blocks > 0, tl.load(shifts + t) + mean, 0))
    tl.store(out + 3 * t + 2, m2)


def grad_moments(grads, inv_scale):
    check.check_numel("inv_scale", inv_scale, 1)
    if not grads:  # as the C++ kernels: no rows
        return inv_scale.new_empty((0, 3), dtype=torch.float32)
    grads = contiguous(grads)
    acc = accumulate_dtype(grads)
    device = grads[0].device
    groups, total_blocks = launch_groups((grads,), BLOCK)
    with on_device(device):
        scale = inv_scale.to(device, acc).reshape(())
        partials = torch.empty(max(total_blocks, 1), 3, dtype=acc, device=device)
        shifts = torch.zeros(len(grads), dtype=acc, device=device)
        first_blocks, block_counts = [0] * len(grads), [0] * len(grads)
        for group in groups:
            first = group.first_block
            for member, count in zip(group.members, group.blocks_per_tensor):
                first_blocks[member], block_counts[member] = first, count
                first += count
            if group.num_blocks:
                _block_moments_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, partials[group.first_block :],
                    shifts, scale, ACC=ACCUMULATE_TYPES[acc], G=group.dtypes[0], ALIGNED=group.aligned, BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )  # fmt: skip
        out = torch.empty(len(grads), 3, dtype=acc, device=device)
        table = torch.tensor([first_blocks, block_counts], dtype=torch.int64).to(device)
        _merge_moments_kernel[(len(grads),)](
            partials, shifts, table[0], table[1], out, ACC=ACCUMULATE_TYPES[acc], BATCH=MERGE_BATCH
        )
    return out


register(qualname("grad_moments", "_triton"), grad_moments)
