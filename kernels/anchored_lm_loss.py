"""Triton row kernel of the anchored LM loss (the math: fastforget/ops/anchored_lm_loss.py): one program per row.

Pass 1 sweeps the vocabulary once in blocks with online softmax sums (Milakov & Gimelshein 2018): the running
maximum m and sum s of exp(x - m) of the logits z, of z / T and of the reference's a / T, and the running
KL cross term (sum of r (a - z) / T, or of q (z - a) / T for the reverse KL) rescaled with its softmax's maximum.
Pass 2 writes d loss / d z = s c (w (p - onehot) + kl_weight T g); with DFT, w is multiplied by the label's
probability exp(-CE), never differentiated. Sums in fp32 (fp64 for fp64); the gradient is
rounded once to the logits' dtype. An ignored row (c = 0) gets loss 0 and a zero gradient.
"""

import torch
import triton
import triton.language as tl

from fastforget import dispatch
from fastforget._schemas import qualname
from fastforget.kernels.multi_tensor import ACCUMULATE_TYPES, on_device, register

INTERPRETED = dispatch.triton_interpreted()


@triton.jit
def _online(m, s, x, mask):
    """The running (max, sum exp(x - max)) after one more block x (masked lanes are -inf)."""
    new_m = tl.maximum(m, tl.max(x, 0))
    return new_m, s * tl.exp(m - new_m) + tl.sum(tl.where(mask, tl.exp(x - new_m), 0.0), 0)


@triton.jit
def _rows_kernel(
    z_ptr, a_ptr, labels_ptr, weights_ptr, scale_ptr, loss_ptr, d_ptr, V, stride_z, stride_a, stride_d,
    kl_weight, temperature, ignore_index,
    ANCHORED: tl.constexpr, REVERSE: tl.constexpr, WEIGHTED: tl.constexpr, DFT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    counted = label != ignore_index
    label = tl.where(counted & (label >= 0) & (label < V), label, 0)  # an ignored row still reads a valid column
    c = tl.load(scale_ptr).to(ACC) * counted.to(ACC)
    if WEIGHTED:
        c_ce = c * tl.load(weights_ptr + row).to(ACC)
    else:
        c_ce = c
    inv_t = 1.0 / temperature
    z_row = z_ptr + row * stride_z
    a_row = a_ptr + row * stride_a
    d_row = d_ptr + row * stride_d
    neg_inf = tl.full((), float("-inf"), ACC)
    zero = tl.zeros((), ACC)
    m_z, s_z, m_q, s_q, m_r, s_r, cross = neg_inf, zero, neg_inf, zero, neg_inf, zero, zero
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(ACC)
        m_z, s_z = _online(m_z, s_z, z, mask)
        if ANCHORED:
            zq = z * inv_t
            aq = tl.load(a_row + cols, mask=mask, other=float("-inf")).to(ACC) * inv_t
            old_q, old_r = m_q, m_r
            m_q, s_q = _online(m_q, s_q, zq, mask)
            m_r, s_r = _online(m_r, s_r, aq, mask)
            gap = tl.where(mask, zq, 0.0) - tl.where(mask, aq, 0.0)  # (z - a) / T, 0 past the row (not inf - inf)
            if REVERSE:  # sum q (z - a) / T, with q's running maximum
                cross = cross * tl.exp(old_q - m_q) + tl.sum(tl.exp(zq - m_q) * gap, 0)
            else:  # sum r (a - z) / T, with r's running maximum
                cross = cross * tl.exp(old_r - m_r) - tl.sum(tl.exp(aq - m_r) * gap, 0)
    lse_z = m_z + tl.log(s_z)
    ce = lse_z - tl.load(z_row + label).to(ACC)
    if DFT:  # the CE weighted by sg(p_y) = exp(-CE)
        c_ce = c_ce * tl.exp(-ce)
    loss = c_ce * ce
    lse_q, lse_r, kl = zero, zero, zero
    if ANCHORED:
        lse_q = m_q + tl.log(s_q)
        lse_r = m_r + tl.log(s_r)
        if REVERSE:
            kl = cross / s_q + (lse_r - lse_q)
        else:
            kl = cross / s_r - (lse_r - lse_q)
        loss += c * kl_weight * temperature * temperature * kl
    c_kl = c * kl_weight * temperature
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(ACC)
        d = c_ce * (tl.exp(z - lse_z) - (cols == label).to(ACC))
        if ANCHORED:
            zq = z * inv_t
            aq = tl.load(a_row + cols, mask=mask, other=0.0).to(ACC) * inv_t
            q = tl.exp(zq - lse_q)
            if REVERSE:  # q (log q - log r - KL)
                d += c_kl * q * ((zq - lse_q) - (aq - lse_r) - kl)
            else:  # q - r
                d += c_kl * (q - tl.exp(aq - lse_r))
        tl.store(d_row + cols, d.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, loss)


def anchored_lm_loss_rows(logits, ref_logits, labels, token_weights, scale, kl_weight, temperature, reverse,
                          ignore_index, dft=False):  # fmt: skip
    rows, vocab = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if labels.shape != (rows,) or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 of shape ({rows},), got {labels.dtype} {tuple(labels.shape)}")
    anchored = ref_logits is not None and kl_weight != 0
    if anchored and (ref_logits.shape != logits.shape or ref_logits.dtype != logits.dtype):
        raise ValueError(f"ref_logits must match logits ({tuple(logits.shape)}, {logits.dtype})")
    if token_weights is not None and token_weights.shape != (rows,):
        raise ValueError(f"token_weights must have shape ({rows},), got {tuple(token_weights.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"scale must have one element, got {scale.numel()}")
    logits = logits.contiguous()
    ref = ref_logits.contiguous() if anchored else logits
    loss = torch.empty(rows, dtype=acc, device=logits.device)
    grad = torch.empty_like(logits)
    if rows == 0:
        return loss, grad
    # the interpreter runs numpy per block: 16 for small vocabularies (many blocks), 1024 for large ones
    block = (16 if vocab <= 256 else 1024) if INTERPRETED else min(4096, triton.next_power_of_2(vocab))
    with on_device(logits.device):
        _rows_kernel[(rows,)](
            logits, ref, labels, token_weights if token_weights is not None else logits, scale.to(acc), loss, grad,
            vocab, logits.stride(0), ref.stride(0), grad.stride(0), float(kl_weight), float(temperature), ignore_index,
            ANCHORED=anchored, REVERSE=reverse, WEIGHTED=token_weights is not None, DFT=dft, ACC=ACCUMULATE_TYPES[acc],
            BLOCK=block,
        )  # fmt: skip
    return loss, grad


register(qualname("anchored_lm_loss_rows", "_triton"), anchored_lm_loss_rows)
