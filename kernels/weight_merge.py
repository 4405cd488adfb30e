"""Triton kernel of the weight merge out = sum_k w_k theta_k, or sum_k s_k theta_k / sum_k s_k with
s_k = w_k max(F_k, floor_k) (fastforget/ops/weight_merge.py), over a whole list.

One launch per dtype group (normally one) through multi_tensor.py's pointer tables, whose roles are out, the K
models and the K Fishers; the model loop is unrolled (K is a compile-time constant, each source's element type
too). Each program reads BLOCK elements of every source once and writes out's once, after all its reads.
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
NUM_WARPS = 8


@triton.jit
def _merge_block(
    tables, num_tensors, t, start, count, coefs,
    ACC: tl.constexpr, TYPES: tl.constexpr, K: tl.constexpr, FISHER: tl.constexpr, OUT_VIA_FP32: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    offs, mask = block_offsets(count, BLOCK, FULL)
    num = tl.zeros((BLOCK,), ACC)
    den = tl.zeros((BLOCK,), ACC)
    for k in tl.static_range(K):
        theta = tl.load(role_pointer(tables, num_tensors, t, 1 + k, start, TYPES[1 + k], ALIGNED) + offs).to(ACC)
        w = tl.load(coefs + k)
        if FISHER:
            f = tl.load(role_pointer(tables, num_tensors, t, 1 + K + k, start, TYPES[1 + K + k], ALIGNED) + offs)
            f = f.to(ACC)
            floor = tl.load(coefs + K + k)
            scaled = w * tl.where(f < floor, floor, f)  # keeps a NaN Fisher NaN, as clamp_min does
            num += scaled * theta
            den += scaled
        else:
            num += w * theta
    if FISHER:
        num = num / den
    if OUT_VIA_FP32:  # fp64 math into a 16-bit output: narrow through fp32
        num = num.to(tl.float32)
    out_ptr = role_pointer(tables, num_tensors, t, 0, start, TYPES[0], ALIGNED)
    tl.store(out_ptr + offs, num.to(TYPES[0]), mask=mask)


@triton.jit
def _weight_merge_kernel(
    tables, blocks, num_tensors, num_blocks, coefs,
    ACC: tl.constexpr, TYPES: tl.constexpr, K: tl.constexpr, FISHER: tl.constexpr, OUT_VIA_FP32: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, ROLES: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    n = tl.load(tables + ROLES * num_tensors + t)
    if n - start >= BLOCK:  # a full block: no mask
        _merge_block(tables, num_tensors, t, start, n - start, coefs, ACC, TYPES, K, FISHER, OUT_VIA_FP32, ALIGNED,
                     BLOCK, True)  # fmt: skip
    else:
        _merge_block(tables, num_tensors, t, start, n - start, coefs, ACC, TYPES, K, FISHER, OUT_VIA_FP32, ALIGNED,
                     BLOCK, False)  # fmt: skip


def weight_merge(out, models, fisher, weights, floors):
    num_models = len(weights)
    if num_models == 0 or len(models) != num_models * len(out):
        raise RuntimeError(f"fastforget: models has {len(models)} tensors; expected {num_models} x {len(out)}")
    if len(fisher) not in (0, len(models)) or len(floors) != (num_models if fisher else 0):
        raise RuntimeError("fastforget: fisher must hold 0 or len(models) tensors, floors one per model with it")
    n = len(out)
    per_model = [models[k * n : (k + 1) * n] for k in range(num_models)]
    per_fisher = [fisher[k * n : (k + 1) * n] for k in range(num_models)] if fisher else []
    for k, source in enumerate(per_model + per_fisher):
        check.check_same_layout(f"source {k}", source, out, "out")
    if not out:
        return
    work = contiguous(out)  # a non-contiguous out tensor is written through a copy, written back below
    roles = [work] + [contiguous(m) for m in per_model] + [contiguous(f) for f in per_fisher]
    acc = accumulate_dtype(out)
    groups, _ = launch_groups(roles, BLOCK)
    device = out[0].device
    with on_device(device):
        coefs = torch.tensor([*weights, *floors], dtype=acc, device=device)  # in ACC: Triton passes floats as fp32
        for group in groups:
            if group.num_blocks:
                _weight_merge_kernel[(group.num_blocks,)](
                    group.tables, group.blocks, group.num_tensors, group.num_blocks, coefs,
                    ACC=ACCUMULATE_TYPES[acc], TYPES=group.dtypes, K=num_models, FISHER=bool(fisher),
                    OUT_VIA_FP32=narrows_through_fp32(acc, group.dtypes[0]), ALIGNED=group.aligned, BLOCK=BLOCK,
                    ROLES=len(roles), num_warps=NUM_WARPS,
                )  # fmt: skip
    copy_back(out, work)


register(qualname("weight_merge", "_triton"), weight_merge)
