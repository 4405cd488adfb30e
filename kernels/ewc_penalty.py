"""Triton kernels of the EWC penalty: lam * sum F (theta - anchor)^2 and its gradient 2 lam F (theta - anchor).

One launch per dtype group covers the whole list (multi_tensor.py); each program handles BLOCK elements of one
tensor and writes one partial; a single-program kernel then sums the partials in a fixed order (no atomics).
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

BLOCK = 4096
NUM_WARPS = 16  # 8 elements per thread: no spills with fp32 or 16-bit lists (tests/test_ptx.py)
PENALTY, GRADIENT, ACCUMULATE = 0, 1, 2


@triton.jit
def _ewc_block(
    tables, num_tensors, t, start, count, partials, coef_ptr,
    PASS: tl.constexpr, ACC: tl.constexpr, P: tl.constexpr, A: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
    G_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    offs, mask = block_offsets(count, BLOCK, FULL)
    p = tl.load(role_pointer(tables, num_tensors, t, 0, start, P, ALIGNED) + offs).to(ACC)
    a = tl.load(role_pointer(tables, num_tensors, t, 1, start, A, ALIGNED) + offs).to(ACC)
    f = tl.load(role_pointer(tables, num_tensors, t, 2, start, F, ALIGNED) + offs).to(ACC)
    d = p - a
    fd = f * d
    c = tl.load(coef_ptr)  # 2 lam (ACCUMULATE) or 2 lam grad_out (GRADIENT), in ACC
    g_ptr = role_pointer(tables, num_tensors, t, 3, start, G, ALIGNED) + offs
    if PASS != 0:
        if PASS == 1:  # GRADIENT: out = (2 lam grad_out) F d
            out = c * fd
        else:  # ACCUMULATE: grad += 2 lam F d
            out = tl.load(g_ptr).to(ACC) + c * fd
        if G_VIA_FP32:  # fp64 math into a 16-bit gradient: narrow through fp32
            out = out.to(tl.float32)
        tl.store(g_ptr, out.to(G), mask=mask)
    if PASS != 1:
        terms = fd * d
        if not FULL:  # past the end: the last element again (block_offsets)
            terms = tl.where(mask, terms, 0)
        tl.store(partials + tl.program_id(0), tl.sum(terms, axis=0))


@triton.jit
def _ewc_kernel(
    tables, blocks, num_tensors, num_blocks, partials, coef_ptr,
    PASS: tl.constexpr, ACC: tl.constexpr, P: tl.constexpr, A: tl.constexpr, F: tl.constexpr, G: tl.constexpr,
    G_VIA_FP32: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t, start = program_block(blocks, num_blocks, BLOCK)
    count = tl.load(tables + 4 * num_tensors + t) - start
    if count >= BLOCK:  # a full block: no mask
        _ewc_block(
            tables, num_tensors, t, start, count, partials, coef_ptr,
            PASS, ACC, P, A, F, G, G_VIA_FP32, ALIGNED, BLOCK, True,
        )  # fmt: skip
    else:
        _ewc_block(
            tables, num_tensors, t, start, count, partials, coef_ptr,
            PASS, ACC, P, A, F, G, G_VIA_FP32, ALIGNED, BLOCK, False,
        )  # fmt: skip


@triton.jit
def _sum_partials_kernel(partials, n, out, lam_ptr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=out.dtype.element_ty)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0)
    tl.store(out, tl.sum(acc, axis=0) * tl.load(lam_ptr))


def _run(pass_, params, anchors, fisher, targets, lam, grad_out=None):
    """Launches `pass_` over the list; `targets` are the outputs (GRADIENT) or gradients (ACCUMULATE).
    Returns lam * sum F (theta - anchor)^2 except for GRADIENT."""
    with on_device(params[0].device):
        return _launch(pass_, params, anchors, fisher, targets, lam, grad_out)


def _launch(pass_, params, anchors, fisher, targets, lam, grad_out):
    acc = accumulate_dtype(params)
    device = params[0].device
    # scalars travel in device memory, in ACC: Triton would pass Python floats as fp32
    scalars = torch.tensor([lam, 2.0 * lam], dtype=acc, device=device)
    coef = scalars[1:] * grad_out.to(scalars) if pass_ == GRADIENT else scalars[1:]
    roles = (params, anchors, fisher, targets if targets is not None else params)
    groups, total_blocks = launch_groups(roles, BLOCK)
    # GRADIENT writes no partials; `coef` stands in as a valid, never-written pointer
    partials = coef if pass_ == GRADIENT else torch.empty(total_blocks, dtype=acc, device=device)
    for group in groups:
        if group.num_blocks:
            _ewc_kernel[(group.num_blocks,)](
                group.tables, group.blocks, group.num_tensors, group.num_blocks,
                partials if pass_ == GRADIENT else partials[group.first_block :], coef,
                PASS=pass_, ACC=ACCUMULATE_TYPES[acc], P=group.dtypes[0], A=group.dtypes[1], F=group.dtypes[2],
                G=group.dtypes[3], G_VIA_FP32=narrows_through_fp32(acc, group.dtypes[3]), ALIGNED=group.aligned,
                BLOCK=BLOCK, num_warps=NUM_WARPS,
            )  # fmt: skip
    if pass_ == GRADIENT:
        return None
    out = torch.empty((), dtype=acc, device=device)
    _sum_partials_kernel[(1,)](partials, total_blocks, out, scalars, BLOCK=1024)
    return out


def check_inputs(params, anchors, fisher, grads=None):
    check.check_same_layout("anchors", anchors, params, "params")
    check.check_same_layout("fisher", fisher, params, "params")
    if grads is not None:
        check.check_same_layout("grads", grads, params, "params")


def ewc_penalty(params, anchors, fisher, lam):
    check_inputs(params, anchors, fisher)
    params, anchors, fisher = contiguous(params), contiguous(anchors), contiguous(fisher)
    return _run(PENALTY, params, anchors, fisher, None, lam)


def ewc_penalty_backward(params, anchors, fisher, lam, grad_out):
    check_inputs(params, anchors, fisher)
    check.check_numel("grad_out", grad_out, 1)
    params, anchors, fisher = contiguous(params), contiguous(anchors), contiguous(fisher)
    outs = [torch.empty_like(p) for p in params]
    _run(GRADIENT, params, anchors, fisher, outs, lam, grad_out.reshape(()))
    return outs


def ewc_penalty_accumulate(params, anchors, fisher, grads, lam):
    check_inputs(params, anchors, fisher, grads)
    params, anchors, fisher = contiguous(params), contiguous(anchors), contiguous(fisher)
    work = contiguous(grads)  # a non-contiguous gradient is updated through a copy, written back below
    penalty = _run(ACCUMULATE, params, anchors, fisher, work, lam)
    copy_back(grads, work)
    return penalty


for _op, _launcher in (
    ("ewc_penalty", ewc_penalty),
    ("ewc_penalty_backward", ewc_penalty_backward),
    ("ewc_penalty_accumulate", ewc_penalty_accumulate),
):
    register(qualname(_op, "_triton"), _launcher)
