"""Triton kernels of the LoRA linear layer: one tiled GEMM kernel with LoRA's extras fused in, launched per product.

    C = alpha * ((a * keep_a) @ b + (s @ f) * keep_c) + bias          (fp32 accumulation, C rounded once)

Every operand is a strided view, so a transposed operand or output costs nothing. With keep the dropout's
keep-mask, scale s (the dropout's 1 / (1 - p) folded in) and S the scaled LoRA activations:

    forward   S  = s (x * keep) A^T        a = x,    b = A^T,  keep_a = keep,  alpha = s      (M, r)
              y  = x W^T + S B^T + bias    a = x,    b = W^T,  s @ f = S B^T, bias          (M, out)
    backward  dS = s dY B                  a = dY,   b = B,    alpha = s                    (M, r)
              dx = dY W + (dS A) * keep    a = dY,   b = W,    s @ f = dS A, keep_c = keep  (M, in)
              dA = dS^T (x * keep)         as dA^T = (x * keep)^T dS: a = x^T, keep_a = keep^T
              dB = dY^T S,  dW = dY^T x    a = dY^T

The rank-r term (K = r) is accumulated into the output tile's fp32 accumulator itself; only when the dropout mask
applies to it (dx) does it go through a second accumulator, masked before the sum. No M x out temporary exists
besides the output.

Split-K: a product with few output tiles but a long K (S, dS: N = r; dA, dB: N = r and K = the batch's rows) would
occupy a few of the GPU's SMs. Where its tiles would be fewer than SPLIT_K_BELOW (default: the device's SM count),
each tile's K range is cut into SPLIT_K consecutive pieces, each program writes its piece's fp32 sum to a
workspace, and _sum_splits_kernel adds the pieces in order 0, 1, ...: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from fastforget import dispatch
from fastforget._schemas import qualname
from fastforget.kernels.multi_tensor import ACCUMULATE_TYPES, on_device, register

INTERPRETED = dispatch.triton_interpreted()
SPLIT_K_BELOW = None  # split K where a product has fewer output tiles than this; None: the device's SM count
MIN_K_BLOCKS_PER_SPLIT = 4  # each piece streams at least 4 K steps
SUM_BLOCK = 1024
# torch.set_float32_matmul_precision, honoured for fp32 operands as torch's own fp32 GEMMs honour it
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
        a = a.to(acc.dtype)
        b = b.to(acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _gemm_kernel(
    a, b, s, f, keep, bias, c, alpha_ptr, M, N, K, R, K_PER_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn, stride_sm, stride_sr, stride_fr, stride_fn,
    stride_keep_row, stride_keep_col, stride_cm, stride_cn,
    KEEP_A: tl.constexpr, RANK: tl.constexpr, KEEP_C: tl.constexpr, BIAS: tl.constexpr, ACC: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """SPLIT: program (tile, piece) sums K in [piece K_PER_SPLIT, (piece + 1) K_PER_SPLIT) into c[piece], a
    (pieces, M, N) workspace in ACC (no RANK, KEEP_C or BIAS; _sum_splits_kernel applies alpha)."""
    # grouped tile order: GROUP_M row-tiles share their b columns while they are in L2
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_rows = min(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    in_m = offs_m < M
    in_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    k_begin = tl.program_id(1) * K_PER_SPLIT  # 0 without a split, with K_PER_SPLIT = K
    k_end = tl.minimum(K, k_begin + K_PER_SPLIT)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        in_k = offs_k < k_end
        a_in = in_m[:, None] & in_k[None, :]
        a_tile = tl.load(a + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak, mask=a_in, other=0)
        if KEEP_A:
            kept = tl.load(keep + offs_m[:, None] * stride_keep_row + offs_k[None, :] * stride_keep_col, a_in, other=0)
            a_tile = a_tile * kept.to(a_tile.dtype)  # a product, as nn.Dropout: a dropped inf or NaN gives NaN
        b_in = in_k[:, None] & in_n[None, :]
        b_tile = tl.load(b + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=b_in, other=0)
        acc = _dot(a_tile, b_tile, acc, PRECISION, UPCAST)

    if RANK:  # + s @ f, K = r: into acc itself, or into a second accumulator when it is masked
        low = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC) if KEEP_C else acc
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            in_r = offs_r < R
            s_tile = tl.load(
                s + offs_m[:, None] * stride_sm + offs_r[None, :] * stride_sr, in_m[:, None] & in_r[None, :], other=0
            )
            f_tile = tl.load(
                f + offs_r[:, None] * stride_fr + offs_n[None, :] * stride_fn, in_r[:, None] & in_n[None, :], other=0
            )
            low = _dot(s_tile, f_tile, low, PRECISION, UPCAST)
        if KEEP_C:
            c_in = in_m[:, None] & in_n[None, :]
            kept = tl.load(keep + offs_m[:, None] * stride_keep_row + offs_n[None, :] * stride_keep_col, c_in, other=0)
            acc += low * kept.to(ACC)
        else:
            acc = low

    if SPLIT:  # this piece's sum, into the workspace
        c += tl.program_id(1).to(tl.int64) * M * N
    else:
        acc = acc * tl.load(alpha_ptr)
    if BIAS:
        acc += tl.load(bias + offs_n, mask=in_n, other=0).to(ACC)[None, :]
    c_ptrs = c + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _sum_splits_kernel(workspace, c, alpha_ptr, M, N, pieces, stride_cm, stride_cn, BLOCK: tl.constexpr):
    """c = alpha * (workspace[0] + workspace[1] + ...), in this order; workspace (pieces, M, N) contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    size = M.to(tl.int64) * N
    inside = offs < size
    acc = tl.load(workspace + offs, mask=inside, other=0)
    for piece in range(1, pieces):
        acc += tl.load(workspace + piece * size + offs, mask=inside, other=0)
    acc = acc * tl.load(alpha_ptr)
    c_ptrs = c + (offs // N) * stride_cm + (offs % N) * stride_cn
    tl.store(c_ptrs, acc.to(c.dtype.element_ty), mask=inside)


def _split_k(tiles, K, block_k, device):
    """How many pieces to cut K into: enough for SPLIT_K_BELOW programs (default: the device's SM count), with at
    least MIN_K_BLOCKS_PER_SPLIT K steps each, and no empty piece. Returns (pieces, K elements per piece)."""
    below = SPLIT_K_BELOW
    if below is None:
        below = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
    k_blocks = triton.cdiv(K, block_k)
    if tiles >= below or k_blocks < 2 * MIN_K_BLOCKS_PER_SPLIT:
        return 1, K
    pieces = max(1, min(triton.cdiv(below, tiles), k_blocks // MIN_K_BLOCKS_PER_SPLIT))
    per_piece = triton.cdiv(k_blocks, pieces) * block_k
    return triton.cdiv(K, per_piece), per_piece


def _blocks(n, element_size):
    """Tile sizes: 16 under the interpreter (numpy, tiny tests); on GPUs 128 x 128 output tiles, or as narrow as
    the output for the rank-r products (n = r), and K steps of 128 bytes, in 3 pipeline stages (2 for fp32, whose
    tiles take twice the registers: 3 spill, tests/test_ptx.py)."""
    if INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    block_n = 128 if n > 64 else max(16, triton.next_power_of_2(n))
    block_k = 128 // element_size
    stages = 2 if element_size == 4 else 3
    return dict(BLOCK_M=128, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8 if block_n == 128 else 4, num_stages=stages)


def _gemm(a, b, out, alpha, *, keep_a=None, rank=None, keep_c=None, bias=None):
    """out = alpha * ((a * keep_a) @ b + (rank[0] @ rank[1]) * keep_c) + bias; a (M, K), b (K, N), out (M, N),
    any strides; alpha a 1-element tensor of the accumulation dtype. Returns out."""
    M, K = a.shape
    N = b.shape[1]
    if out.numel() == 0:
        return out
    keep = keep_a if keep_a is not None else keep_c
    s, f = rank if rank is not None else (a, b)  # stand-ins: never read without RANK
    R = s.shape[1] if rank is not None else 0
    acc = ACCUMULATE_TYPES[alpha.dtype]
    precision = _FP32_PRECISION[torch.get_float32_matmul_precision()] if a.dtype == torch.float32 else "ieee"
    blocks = _blocks(N, a.element_size())
    block_r = 16 if INTERPRETED else max(16, min(64, triton.next_power_of_2(R)))
    tiles = triton.cdiv(M, blocks["BLOCK_M"]) * triton.cdiv(N, blocks["BLOCK_N"])
    pieces, per_piece = (
        (1, K) if rank is not None or bias is not None else _split_k(tiles, K, blocks["BLOCK_K"], a.device)
    )
    # split: the pieces' sums go to an fp32 (fp64) workspace, summed into out below
    target = out if pieces == 1 else torch.empty(pieces, M, N, dtype=alpha.dtype, device=out.device)
    _gemm_kernel[(tiles, pieces)](
        a, b, s, f, keep.view(torch.uint8) if keep is not None else a, bias if bias is not None else a, target, alpha,
        M, N, K, R, per_piece, *a.stride(), *b.stride(), *s.stride(), *f.stride(),
        *(keep.stride() if keep is not None else (0, 0)), *(out.stride() if pieces == 1 else (N, 1)),
        KEEP_A=keep_a is not None, RANK=rank is not None, KEEP_C=keep_c is not None, BIAS=bias is not None,
        ACC=acc, PRECISION=precision, UPCAST=INTERPRETED and a.dtype == torch.bfloat16, BLOCK_R=block_r,
        GROUP_M=8, SPLIT=pieces > 1, **blocks,
    )  # fmt: skip
    if pieces > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, SUM_BLOCK),)](
            target, out, alpha, M, N, pieces, *out.stride(), BLOCK=SUM_BLOCK
        )
    return out


def _coefficients(x, scale):
    """(1, scale) in the accumulation dtype, on x's device: the alphas (Triton would pass a Python float as fp32)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    coefs = torch.tensor([1.0, scale], dtype=acc, device=x.device)
    return coefs[:1], coefs[1:]


def lora_linear(x, weight, bias, lora_A, lora_B, keep, scale):
    one, scaled = _coefficients(x, scale)
    with on_device(x.device):
        S = _gemm(x, lora_A.t(), x.new_empty(x.shape[0], lora_A.shape[0]), scaled, keep_a=keep)
        y = _gemm(x, weight.t(), x.new_empty(x.shape[0], weight.shape[0]), one, rank=(S, lora_B.t()), bias=bias)
    return y, S


def lora_linear_backward(grad_y, x, weight, lora_A, lora_B, keep, S, scale, output_mask):
    need_x, need_weight, need_bias, need_A, need_B = output_mask
    one, scaled = _coefficients(x, scale)
    dx = dweight = dbias = dA = dB = None
    with on_device(x.device):
        if need_x or need_A:
            dS = _gemm(grad_y, lora_B, x.new_empty(S.shape), scaled)
            if need_x:
                dx = _gemm(grad_y, weight, x.new_empty(x.shape), one, rank=(dS, lora_A), keep_c=keep)
            if need_A:
                dA = x.new_empty(lora_A.shape)
                _gemm(x.t(), dS, dA.t(), one, keep_a=keep.t() if keep is not None else None)
        if need_weight:
            dweight = _gemm(grad_y.t(), x, x.new_empty(weight.shape), one)
        if need_bias:
            dbias = grad_y.sum(0, dtype=one.dtype).to(grad_y.dtype)
        if need_B:
            dB = _gemm(grad_y.t(), S, x.new_empty(lora_B.shape), one)
    return dx, dweight, dbias, dA, dB


register(qualname("lora_linear", "_triton"), lora_linear)
register(qualname("lora_linear_backward", "_triton"), lora_linear_backward)
