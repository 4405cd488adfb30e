"""Triton kernel of the Fisher accumulation F <- decay * F + scale * sum_s g_s^2 (or |g_s|: MAS), in place, over a
whole list.

One launch per dtype group (normally one) through multi_tensor.py's pointer tables; each program updates BLOCK
elements of one tensor, reading F once, each stacked gradient g_s once (grads[i] holds k = numel(g) / numel(F)
of them, at element offset s * numel(F)), and writing F once.
"""

import torch
import triton
import triton.language as tl

from fastforget import _validation as check
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import qualname
from fastforget.kernels.multi_tensor import (
    ACCUMULATE_TYPES,
    ALIGNMENT,
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

BLOCK = 4096
NUM_WARPS = 16  # 8 elements per thread: no spills with fp32 or 16-bit lists (tests/test_ptx.py)


@triton.jit
def _fisher_block(
    f_ptr, g_ptr, count, n, samples, coefs,
    ACC: tl.constexpr, F: tl.constexpr, G: tl.constexpr, F_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, FULL: tl.constexpr, ABS: tl.constexpr,
):  # fmt: skip
    offs, mask = block_offsets(count, BLOCK, FULL)
    acc = tl.load(coefs) * tl.load(f_ptr + offs).to(ACC)
    scale = tl.load(coefs + 1)
    for s in range(0, samples):
        g_s = g_ptr + s * n  # in an aligned group the host checked that every sample starts aligned
        if ALIGNED:
            g_s = tl.multiple_of(g_s, ALIGNMENT)
        g = tl.load(g_s + offs).to(ACC)
        if ABS:
            acc += scale * tl.abs(g)
        else:
            acc += scale * g * g
    if F_VIA_FP32:  # fp64 math into a 16-bit Fisher: narrow through fp32
        acc = acc.to(tl.float32)
    tl.store(f_ptr + offs, acc.to(F), mask=mask)


@triton.jit
def _fisher_update_kernel(
    tables, blocks, num_tensors, num_blocks, coefs,
    ACC: tl.constexpr, F: tl.constexpr, G: tl.constexpr, F_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, ABS: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    n = tl.load(tables + 2 * num_tensors + t)
    samples = tl.load(tables + 3 * num_tensors + t) // n
    f_ptr = role_pointer(tables, num_tensors, t, 0, start, F, ALIGNED)
    g_ptr = role_pointer(tables, num_tensors, t, 1, start, G, ALIGNED)
    if n - start >= BLOCK:  # a full block: no mask
        _fisher_block(f_ptr, g_ptr, n - start, n, samples, coefs, ACC, F, G, F_VIA_FP32, ALIGNED, BLOCK, True, ABS)
    else:
        _fisher_block(f_ptr, g_ptr, n - start, n, samples, coefs, ACC, F, G, F_VIA_FP32, ALIGNED, BLOCK, False, ABS)


def fisher_update(fisher, grads, decay, scale, absolute=False):
    check.check_stacks(fisher, grads)
    work = contiguous(fisher)  # a non-contiguous Fisher tensor is updated through a copy, written back below
    grads = contiguous(grads)
    acc = accumulate_dtype(fisher)
    # stacked gradients: sample s starts at s * numel(F) elements, aligned if the first one is and numel(F) allows
    stacks_aligned = [
        g.numel() == f.numel() or f.numel() * g.element_size() % ALIGNMENT.value == 0 for f, g in zip(work, grads)
    ]
    groups, _ = launch_groups((work, grads), BLOCK, stacks_aligned)
    device = fisher[0].device if fisher else None
    with on_device(device):
        coefs = torch.tensor([decay, scale], dtype=acc, device=device)  # in ACC: Triton passes floats as fp32
        for group in groups:
            if group.num_blocks:
                _fisher_update_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, coefs,
                    ACC=ACCUMULATE_TYPES[acc], F=group.dtypes[0], G=group.dtypes[1],
                    F_VIA_FP32=narrows_through_fp32(acc, group.dtypes[0]), ALIGNED=group.aligned, BLOCK=BLOCK,
                    ABS=absolute, num_warps=NUM_WARPS,
                )  # fmt: skip
    copy_back(fisher, work)


register(qualname("fisher_update", "_triton"), fisher_update)
