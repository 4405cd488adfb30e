"""Triton kernel of scale_grads: grads[i] *= factors[i] over a whole list, in place, one launch per dtype group."""

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

BLOCK = 4096
NUM_WARPS = 16  # 8 elements per thread: no spills with fp32 or 16-bit lists (tests/test_ptx.py)


@triton.jit
def _scale_block(
    g_ptr, count, factor, ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
    FULL: tl.constexpr,
):  # fmt: skip
    offs, mask = block_offsets(count, BLOCK, FULL)
    out = factor * tl.load(g_ptr + offs).to(ACC)
    if G_VIA_FP32:
        out = out.to(tl.float32)
    tl.store(g_ptr + offs, out.to(G), mask=mask)


@triton.jit
def _scale_kernel(
    tables, blocks, num_tensors, num_blocks, factors,
    ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    count = tl.load(tables + num_tensors + t) - start
    factor = tl.load(factors + tl.load(tables + 2 * num_tensors + t))
    g_ptr = role_pointer(tables, num_tensors, t, 0, start, G, ALIGNED)
    if count >= BLOCK:  # a full block: no mask
        _scale_block(g_ptr, count, factor, ACC, G, G_VIA_FP32, BLOCK, True)
    else:
        _scale_block(g_ptr, count, factor, ACC, G, G_VIA_FP32, BLOCK, False)


def scale_grads(grads, factors):
    check.check_numel("factors", factors, len(grads))
    work = contiguous(grads)  # a non-contiguous gradient is updated through a copy, written back below
    acc = accumulate_dtype(grads)
    device = grads[0].device if grads else None
    groups, _ = launch_groups((work,), BLOCK) if grads else ([], 0)
    with on_device(device):
        factors = factors.to(device, acc).contiguous()
        for group in groups:
            if group.num_blocks:
                _scale_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, factors,
                    ACC=ACCUMULATE_TYPES[acc], G=group.dtypes[0],
                    G_VIA_FP32=narrows_through_fp32(acc, group.dtypes[0]), ALIGNED=group.aligned, BLOCK=BLOCK,
                    num_warps=NUM_WARPS,
                )  # fmt: skip
    copy_back(grads, work)


register(qualname("scale_grads", "_triton"), scale_grads)
