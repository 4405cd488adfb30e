"""Anchored language-model loss: cross-entropy plus a KL anchor to a reference (base) model, without the logits.

With z = h W^T + b the student's logits, a = h_ref W_ref^T (+ b when the head is shared) the reference's, y the
labels, c_t = [y_t != ignore_index] and w_t the token weights (1 by default), over N tokens:

    CE_t  = logsumexp(z_t) - z_t[y_t]                              (unscaled logits)
    q_t   = softmax(z_t / T),   r_t = softmax(a_t / T)
    KL_t  = sum_j r_tj (log r_tj - log q_tj)      kl="forward": KL(p_ref || p_theta)
          = sum_j q_tj (log q_tj - log r_tj)      kl="reverse": KL(p_theta || p_ref)
    loss  = sum_t c_t (w_t g_t CE_t + kl_weight T^2 KL_t) / max(1, sum_t c_t)

where g_t, a token gate that is never differentiated, is 1, or with token_weighting:

    "dft"   g_t = sg(p_t[y_t]) = exp(-CE_t)                  DFT (Wu et al. 2025), TRL's loss_type="dft"
    "eaft"  g_t = (H20_t / 3)^alpha,  H20_t = the entropy of softmax over the 20 largest logits of z_t
                                                             EAFT (Diao et al. 2026), LLaMA-Factory's use_eaft_loss

and its gradient with respect to the logits (s = 1 / max(1, sum_t c_t), p_t = softmax(z_t)):

    d loss / d z_tj = s c_t (w_t g_t (p_tj - [j = y_t]) + kl_weight T k_tj)
    k_tj = q_tj - r_tj                                     (forward)
    k_tj = q_tj (log q_tj - log r_tj - KL_t)               (reverse)

The fused backends never hold more than chunk_size x V logits: per chunk of rows the logits come from one GEMM,
the row kernel (fastforget::anchored_lm_loss_rows: per row, the softmax sums over the vocabulary -- online in one
sweep on Triton -- then a sweep that writes the gradient) gives the rows' losses and d loss / d z, and then
dh = dz W and dW += dz^T h. The DFT gate is the row kernel's (it needs CE_t, which the kernel has); the EAFT
gate is a top-20 of the chunk's logits (torch.topk, chunk_size x 20) folded into the token weights. The
gradients are computed in the forward (as Liger-Kernel does); backward only scales them by the upstream gradient.
"""

import math
import numbers

import torch
import torch.nn.functional as F

from fastforget import _autocast, dispatch
from fastforget import _validation as check
from fastforget._dtypes import FLOAT_DTYPES
from fastforget._schemas import FLAVOURS, qualname

KL_DIRECTIONS = ("forward", "reverse")
TOKEN_WEIGHTINGS = ("dft", "eaft")
EAFT_TOP_K = 20  # LLaMA-Factory's and Axolotl's k
EAFT_NORM = 3.0  # LLaMA-Factory divides the top-20 entropy by 3 (about ln 20, its maximum)

# ---------------------------------------------------------------------------------------------------- reference


def _shifted(labels, token_weights, ignore_index):
    """The causal-LM shift on the targets: position t predicts labels[t + 1]; the last position predicts nothing."""
    pad = labels.new_full((*labels.shape[:-1], 1), ignore_index)
    labels = torch.cat([labels[..., 1:], pad], dim=-1)
    if token_weights is not None:
        token_weights = torch.cat([token_weights[..., 1:], token_weights.new_zeros(pad.shape)], dim=-1)
    return labels, token_weights


def eaft_gate(logits, alpha):
    """EAFT's token gate (H20 / 3)^alpha from (rows, V) logits, in fp32 (fp64 for fp64), never differentiated: the
    entropy of the softmax over each row's 20 largest logits (all of them when V < 20), as LLaMA-Factory's
    _eaft_cross_entropy computes it."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        top = torch.topk(logits.detach().to(acc), min(EAFT_TOP_K, logits.shape[-1]), dim=-1).values
        log_p = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return (entropy / EAFT_NORM).pow(alpha)


def anchored_lm_loss_ref(
    hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, kl_weight=0.0, temperature=1.0,
    kl="forward", ignore_index=-100, token_weights=None, shift=False, token_weighting=None, eaft_alpha=1.0,
):  # fmt: skip
    """The unfused formula on the full logits (HF style): F.cross_entropy + F.kl_div(log_softmax), in fp32 (fp64
    for fp64 inputs) after the GEMM in the inputs' dtype. The oracle of the fused backends; takes no validation."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if shift:
        labels, token_weights = _shifted(labels, token_weights, ignore_index)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    counted = labels != ignore_index
    logits = F.linear(hidden, weight, bias).to(acc)
    per_token = ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    if token_weights is not None:
        per_token = per_token * token_weights.reshape(-1).to(acc)
    if token_weighting == "dft":  # TRL: per_token_loss * log_probs.exp().detach()
        per_token = per_token * torch.exp(-ce).detach()
    elif token_weighting == "eaft":
        per_token = per_token * eaft_gate(logits, eaft_alpha)
    if kl_weight:
        with torch.no_grad():
            head = (weight, bias) if ref_weight is None else (ref_weight, None)
            ref_logits = F.linear(ref_hidden.reshape(-1, ref_hidden.shape[-1]), *head).to(acc)
        log_q = F.log_softmax(logits / temperature, dim=-1)
        log_r = F.log_softmax(ref_logits / temperature, dim=-1)
        pair = (log_q, log_r) if kl == "forward" else (log_r, log_q)  # kl_div(input, target) = KL(target || input)
        kl_t = F.kl_div(*pair, reduction="none", log_target=True).sum(-1)
        per_token = per_token + kl_weight * temperature**2 * torch.where(counted, kl_t, 0)
    return per_token.sum() / counted.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------- validation


def _check_tensor(name, t, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, not {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of {names}")


def _check_like(name, t, hidden, shape, what):
    if t.device != hidden.device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)} ({what})")


def _check_labels(labels, vocab, ignore_index):
    """A label outside [0, V) that is not ignore_index is an error naming the first one (not while tracing)."""
    if torch.compiler.is_compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        index = index[0] if len(index) == 1 else index
        raise ValueError(
            f"labels[{index}] = {int(labels[index])} is not a token id in [0, {vocab}) "
            f"nor ignore_index ({ignore_index})"
        )


def _check_inputs(hidden, weight, labels, bias, ref_hidden, ref_weight, kl_weight, temperature, kl, ignore_index,
                  token_weights, shift, chunk_size, token_weighting, eaft_alpha):  # fmt: skip
    if token_weighting is not None:
        check.check_choice("token_weighting", token_weighting, TOKEN_WEIGHTINGS)
    eaft_alpha = check.check_scalar("eaft_alpha", eaft_alpha, minimum=0.0)
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but hidden has dtype {hidden.dtype}; they must match")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (vocab, hidden_size), got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if vocab < 1:
        raise ValueError("weight has 0 rows: the vocabulary must not be empty")
    if hidden.dim() < 2 or hidden.shape[-1] != width:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}; expected (N, {width}) or (B, T, {width})")
    _check_like("weight", weight, hidden, weight.shape, "")
    _check_tensor("labels", labels, None)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels has dtype {labels.dtype}; expected an integer dtype (token ids)")
    _check_like("labels", labels, hidden, hidden.shape[:-1], "hidden's leading dims")
    if bias is not None:
        _check_tensor("bias", bias, (hidden.dtype,))
        _check_like("bias", bias, hidden, (vocab,), "(vocab,)")
    if token_weights is not None:
        _check_tensor("token_weights", token_weights)
        _check_like("token_weights", token_weights, hidden, labels.shape, "one weight per label")
    kl_weight = check.check_scalar("kl_weight", kl_weight, minimum=0.0)
    temperature = check.check_scalar("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if kl not in KL_DIRECTIONS:
        raise ValueError(f"kl must be one of {KL_DIRECTIONS}, got {kl!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, not {type(ignore_index).__name__}")
    if not isinstance(shift, bool):
        raise TypeError(f"shift must be a bool, not {type(shift).__name__}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if kl_weight > 0:
        if ref_hidden is None:
            raise ValueError("kl_weight > 0 needs ref_hidden, the reference model's final hidden states")
        _check_tensor("ref_hidden", ref_hidden, (hidden.dtype,))
        ref_width = width
        if ref_weight is not None:
            _check_tensor("ref_weight", ref_weight, (hidden.dtype,))
            if ref_weight.dim() != 2 or ref_weight.shape[0] != vocab:
                raise ValueError(f"ref_weight has shape {tuple(ref_weight.shape)}; expected ({vocab}, hidden_size)")
            _check_like("ref_weight", ref_weight, hidden, ref_weight.shape, "")
            ref_width = ref_weight.shape[1]
        _check_like("ref_hidden", ref_hidden, hidden, (*hidden.shape[:-1], ref_width), "hidden's leading dims")
    if token_weights is not None and not torch.compiler.is_compiling() and not torch.isfinite(token_weights).all():
        raise ValueError("token_weights has a non-finite value")
    _check_labels(labels, vocab, ignore_index)
    return kl_weight, temperature, eaft_alpha


def default_chunk_size(tokens, width, vocab):
    """Rows per chunk: about as many logits per chunk as hidden states in all (as Liger-Kernel picks), a power of 2
    between 256 and 1024: the chunk's logits stay a small part of the memory, and the GEMMs efficient (on a 2-core
    CPU, GEMMs of 32 rows against a 32,000 x 1,024 head ran at a third of the rate of 256-row ones)."""
    rows = math.ceil(tokens / max(1, math.ceil(vocab / width)))
    return min(1024, max(256, 1 << max(0, rows - 1).bit_length()))


# ---------------------------------------------------------------------------------------------------- public API


def anchored_lm_loss(
    hidden, weight, labels, *, bias=None, ref_hidden=None, ref_weight=None, kl_weight=0.0, temperature=1.0,
    kl="forward", ignore_index=-100, token_weights=None, shift=False, chunk_size=None, backend="auto",
    token_weighting=None, eaft_alpha=1.0,
):  # fmt: skip
    """mean over counted tokens of [w_t g_t CE_t + kl_weight T^2 KL_t] (the module docstring), a 0-dim fp32 tensor
    (fp64 for fp64 inputs), without materialising the (N, V) logits on a fused backend.

    hidden (N, H) or (B, T, H), weight (V, H) (the LM head), labels shaped like hidden's leading dims (a label equal
    to ignore_index is not counted), bias (V,) or None. The reference distribution comes from ref_hidden (hidden's
    leading dims, H_ref) and ref_weight (V, H_ref; default: weight and bias, a shared head) and is never
    differentiated; it is only needed when kl_weight > 0. token_weights (one per label, not differentiated) scale
    the CE. token_weighting gates each token's CE by a factor that is never differentiated (module docstring):
    "dft" (Dynamic Fine-Tuning: the label's probability, TRL's loss_type="dft"; with kl_weight > 0 this is ASFT),
    "eaft" (entropy-adaptive: (H20 / 3)^eaft_alpha, LLaMA-Factory's EAFT), or None. shift=True predicts
    labels[..., t + 1] from hidden[..., t, :] (the causal-LM shift). Gradients flow to hidden, weight and bias.
    Errors: TypeError for wrong types or dtypes (all float tensors of hidden's dtype), ValueError for shapes,
    devices, a label outside [0, V) that is not ignore_index (naming the first), a negative or non-finite kl_weight,
    a non-positive or non-finite temperature, non-finite token_weights, a token_weighting other than "dft", "eaft"
    or None, a negative or non-finite eaft_alpha.

    Under ``torch.autocast`` it computes what the unfused formula computes there: hidden, weight, bias, ref_hidden
    and ref_weight are cast to the autocast dtype for the logits' GEMMs (F.linear's rule), the softmax, CE and KL
    run in fp32 on those logits (the rule of log_softmax, cross_entropy and kl_div), and the loss is fp32;
    gradients reach fp32 masters in fp32.
    """
    hidden, weight, bias, ref_hidden, ref_weight = _autocast.cast_inputs(hidden, weight, bias, ref_hidden, ref_weight)
    kl_weight, temperature, eaft_alpha = _check_inputs(
        hidden, weight, labels, bias, ref_hidden, ref_weight, kl_weight, temperature, kl, ignore_index,
        token_weights, shift, chunk_size, token_weighting, eaft_alpha,
    )  # fmt: skip
    if kl_weight == 0:
        ref_hidden = ref_weight = None
    labels = labels.long()  # any integer dtype in; F.cross_entropy and the kernels index with int64
    backend = dispatch.resolve(backend, hidden.device, "anchored_lm_loss")
    if backend == "reference":
        return anchored_lm_loss_ref(
            hidden, weight, labels, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight, kl_weight=kl_weight,
            temperature=temperature, kl=kl, ignore_index=ignore_index, token_weights=token_weights, shift=shift,
            token_weighting=token_weighting, eaft_alpha=eaft_alpha,
        )  # fmt: skip
    if shift:
        labels, token_weights = _shifted(labels, token_weights, ignore_index)
    width = hidden.shape[-1]
    hidden2d, labels1d = hidden.reshape(-1, width), labels.reshape(-1)
    if token_weights is not None:
        token_weights = token_weights.detach().reshape(-1).float()
    ref_bias = None
    if ref_hidden is not None:
        ref_bias = bias.detach() if ref_weight is None and bias is not None else None
        ref_weight = (weight if ref_weight is None else ref_weight).detach()
        ref_hidden = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
    grad_on = torch.is_grad_enabled()
    output_mask = [grad_on and t is not None and t.requires_grad for t in (hidden, weight, bias)]
    chunk = chunk_size or default_chunk_size(*hidden2d.shape, weight.shape[0])
    loss, *_ = dispatch.native_op("anchored_lm_loss", backend)(
        hidden2d, weight, bias, labels1d, ref_hidden, ref_weight, ref_bias, token_weights, kl_weight, temperature,
        kl == "reverse", ignore_index, chunk, output_mask, token_weighting == "dft",
        eaft_alpha if token_weighting == "eaft" else -1.0,
    )  # fmt: skip
    return loss


# ---------------------------------------------------------------------------------------------------- the chunk loop


def _same_tensor(a, b):
    """Whether a and b are the same elements (e.g. a detached view of a shared head), or both None."""
    if a is None or b is None:
        return a is b
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


def _chunked(rows_op):
    """The fused op's kernel for one flavour: the chunk loop around that flavour's row op (any device)."""

    def run(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, token_weights, kl_weight, temperature,
            reverse, ignore_index, chunk_size, output_mask, dft=False, eaft_alpha=-1.0):  # fmt: skip
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_hidden, need_weight, need_bias = output_mask
        n = hidden.shape[0]
        shared = ref_hidden is not None and _same_tensor(ref_weight, weight) and _same_tensor(ref_bias, bias)
        scale = 1 / (labels != ignore_index).sum().clamp(min=1).to(acc).reshape(1)  # on the device: no sync
        d_hidden = hidden.new_empty(hidden.shape) if need_hidden else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None
        partials = []
        stacked = hidden.new_empty(2 * min(n, chunk_size), hidden.shape[1]) if shared else None  # reused per chunk
        for start in range(0, n, chunk_size):
            rows = slice(start, min(n, start + chunk_size))
            h = hidden[rows]
            if shared:  # one GEMM of twice the rows for both models' logits
                pair = torch.cat([h, ref_hidden[rows]], out=stacked[: 2 * h.shape[0]])
                both = F.linear(pair, weight, bias)
                logits, ref_logits = both[: h.shape[0]], both[h.shape[0] :]
                del both
            else:
                logits = F.linear(h, weight, bias)
                ref_logits = F.linear(ref_hidden[rows], ref_weight, ref_bias) if ref_hidden is not None else None
            weights = token_weights[rows] if token_weights is not None else None
            if eaft_alpha >= 0:  # the EAFT gate from this chunk's logits (a no-grad top-20), folded into the weights
                gate = eaft_gate(logits, eaft_alpha).float()
                weights = gate if weights is None else weights * gate
            loss_rows, d_logits = rows_op(
                logits, ref_logits, labels[rows], weights, scale, kl_weight, temperature, reverse, ignore_index, dft
            )
            del logits, ref_logits  # before the gradient GEMMs: at most two chunks of logits live at once
            partials.append(loss_rows.sum())
            if need_hidden:
                torch.mm(d_logits, weight, out=d_hidden[rows])
            if need_weight:  # fp32 accumulation across chunks (a no-op .to for fp32 and fp64)
                d_weight.addmm_(d_logits.t().to(acc), h.to(acc))
            if need_bias:
                d_bias += d_logits.sum(0, dtype=acc)
        loss = torch.stack(partials).sum() if partials else torch.zeros((), dtype=acc, device=hidden.device)
        d_weight = d_weight.to(weight.dtype) if need_weight else None
        d_bias = d_bias.to(bias.dtype) if need_bias else None
        return loss, d_hidden, d_weight, d_bias

    return run


# ---------------------------------------------------------------------------------------------------- registration


def _register(flavour):
    rows, fused = qualname("anchored_lm_loss_rows", flavour), qualname("anchored_lm_loss", flavour)

    @torch.library.register_fake(rows)
    def _(logits, ref_logits, labels, token_weights, scale, kl_weight, temperature, reverse, ignore_index, dft=False):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty(logits.shape[0], dtype=acc), logits.new_empty(logits.shape)

    @torch.library.register_fake(fused)
    def _(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, token_weights, kl_weight, temperature,
          reverse, ignore_index, chunk_size, output_mask, dft=False, eaft_alpha=-1.0):  # fmt: skip
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        shapes = (hidden.shape, weight.shape, weight.shape[:1])
        grads = [hidden.new_empty(s) if need else None for s, need in zip(shapes, output_mask)]
        return hidden.new_empty((), dtype=acc), *grads

    rows_op = getattr(torch.ops.fastforget, rows.split("::")[1]).default

    # torch.autocast, as on the unfused formula: the GEMMs' inputs in the autocast dtype, the row math (softmax,
    # CE, KL) on fp32 logits; token_weights and scale are fp32 in any case
    lower, fp32 = _autocast.LOWER, _autocast.FP32
    _autocast.register(fused.split("::")[1], (lower, lower, lower, None, lower, lower, lower, fp32) + (None,) * 8)
    _autocast.register(rows.split("::")[1], (fp32, fp32, None, fp32, fp32) + (None,) * 5)
    device_types = ("cpu", "cuda")
    torch.library.register_kernel(fused, device_types, _chunked(rows_op))

    def setup_context(ctx, inputs, output):
        _, *grads = output
        ctx.mark_non_differentiable(*(g for g in grads if g is not None))  # gradients, not results
        ctx.save_for_backward(*grads)

    def backward(ctx, grad_loss, *_):
        grads = [None if g is None else g * grad_loss for g in ctx.saved_tensors]
        return *grads, *[None] * 13  # labels .. eaft_alpha get none

    torch.library.register_autograd(fused, backward, setup_context=setup_context)


for _flavour in FLAVOURS:
    _register(_flavour)
