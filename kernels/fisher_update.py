"""Triton kernel of the Fisher accumulation F <- decay * F + scale * sum_s g_s^2, in place, over a whole list.

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
    contiguous,
    copy_back,
    launch_groups,
    narrows_through_fp32,
    on_device,
    register,
)

BLOCK = 4096


@triton.jit
def _fisher_update_kernel(
    tables, blocks, num_tensors, num_blocks, coefs,
    ACC: tl.constexpr, F: tl.constexpr, G: tl.constexpr, F_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + 2 * num_tensors + t)
    samples = tl.load(tables + 3 * num_tensors + t) // n
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    decay = tl.load(coefs)
    scale = tl.load(coefs + 1)
    f_ptr = tl.load(tables + t).to(tl.pointer_type(F)) + offs
    g_ptr = tl.load(tables + num_tensors + t).to(tl.pointer_type(G)) + offs
    acc = decay * tl.load(f_ptr, mask=mask, other=0).to(ACC)
    for s in range(0, samples):
        g = tl.load(g_ptr + s * n, mask=mask, other=0).to(ACC)
        acc += scale * g * g
    if F_VIA_FP32:  # fp64 math into a 16-bit Fisher: narrow through fp32
        acc = acc.to(tl.float32)
    tl.store(f_ptr, acc.to(F), mask=mask)


def fisher_update(fisher, grads, decay, scale):
    check.check_stacks(fisher, grads)
    work = contiguous(fisher)  # a non-contiguous Fisher tensor is updated through a copy, written back below
    grads = contiguous(grads)
    acc = accumulate_dtype(fisher)
    groups, _ = launch_groups((work, grads), BLOCK)
    device = fisher[0].device if fisher else None
    with on_device(device):
        coefs = torch.tensor([decay, scale], dtype=acc, device=device)  # in ACC: Triton passes floats as fp32
        for group in groups:
            if group.num_blocks:
                _fisher_update_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, coefs,
                    ACC=ACCUMULATE_TYPES[acc], F=group.dtypes[0], G=group.dtypes[1],
                    F_VIA_FP32=narrows_through_fp32(acc, group.dtypes[0]), BLOCK=BLOCK,
                )  # fmt: skip
    copy_back(fisher, work)


register(qualname("fisher_update", "_triton"), fisher_update)
