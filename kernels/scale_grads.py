"""Triton kernel of scale_grads: grads[i] *= factors[i] over a whole list, in place, one launch per dtype group."""

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
def _scale_kernel(
    tables, blocks, num_tensors, num_blocks, factors,
    ACC: tl.constexpr, G: tl.constexpr, G_VIA_FP32: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    start = tl.load(blocks + num_blocks + pid)
    n = tl.load(tables + num_tensors + t)
    factor = tl.load(factors + tl.load(tables + 2 * num_tensors + t))
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    g_ptr = tl.load(tables + t).to(tl.pointer_type(G)) + offs
    out = factor * tl.load(g_ptr, mask=mask, other=0).to(ACC)
    if G_VIA_FP32:
        out = out.to(tl.float32)
    tl.store(g_ptr, out.to(G), mask=mask)


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
                    G_VIA_FP32=narrows_through_fp32(acc, group.dtypes[0]), BLOCK=BLOCK,
                )  # fmt: skip
    copy_back(grads, work)


register(qualname("scale_grads", "_triton"), scale_grads)
