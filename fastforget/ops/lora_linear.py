"""LoRA linear layer (Hu et al. 2021): y = x W^T + b + scale * (dropout(x) A^T) B^T with one pass over the output.

Shapes follow torch.nn.Linear and PEFT: x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in),
lora_B (out, r). The ops work on x as (M, in), M = the product of its leading dims. With keep the dropout's
keep-mask (bool, M x in) and s = scale / (1 - p) (the dropout's rescaling folded into the scale; s = scale
without dropout):

    S  = s (x * keep) A^T                  (M, r)    computed first and saved for backward
    y  = x W^T + bias + S B^T              (M, out)  the rank-r term lands in the output tile's accumulator

and from dY (M, out):

    dS = s dY B                            (M, r)    once
    dx = dY W + (dS A) * keep              (M, in)   fused the same way
    dA = dS^T (x * keep),   dB = dY^T S              thin rank-r GEMMs
    dW = dY^T x,  db = sum over rows of dY           only when weight / bias require grad

Saved for backward: x and S, the mask (1 byte per element of x, only with dropout) and the weights themselves;
never a copy of W or an M x out intermediate. Inputs may be fp32, bf16, fp16 (or fp64), all of one dtype; every
GEMM accumulates in fp32 (fp64 for fp64) and rounds its result once to that dtype (S and dS too, as in PEFT).

The dropout mask is drawn here, with torch's generator, before any backend runs: ``torch.manual_seed`` reproduces
it and every backend drops the same elements.
"""

import numbers

import torch
import torch.nn.functional as F

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import FLOAT_DTYPES
from fastforget._schemas import FLAVOURS, qualname

# ---------------------------------------------------------------------------------------------------- reference


def lora_linear_ref(x, weight, bias, lora_A, lora_B, scale, keep=None, dropout_p=0.0):
    """PEFT's unfused formula in plain torch: base(x) + lora_B(lora_A(dropout(x))) * scale, in x's dtype.

    ``keep`` is the dropout's keep-mask (shaped like x; None: no dropout), applied as nn.Dropout does."""
    dropped = x if keep is None else x * keep / (1 - dropout_p)
    return F.linear(x, weight, bias) + F.linear(F.linear(dropped, lora_A), lora_B) * scale


# ---------------------------------------------------------------------------------------------------- public API


def _check_inputs(x, weight, bias, lora_A, lora_B, scale, dropout_p, training):
    tensors = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    for name, t in tensors.items():
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor, not {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; expected one of float32, bfloat16, float16, float64")
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight expects {in_features} input features (last dim)")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({out_features},) (out_features,)")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; expected (r, {in_features}) (r, in_features)")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError("lora_A has 0 rows: the rank r must be >= 1")
    if lora_B.shape != (out_features, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected ({out_features}, {r}) (out_features, r)")
    check.check_scalar("scale", scale)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, not {type(training).__name__}")


def dropout_keep_mask(shape, dropout_p, device):
    """The dropout's keep-mask: True with probability 1 - dropout_p, from torch's default generator of `device`."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - dropout_p)


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, training=True, *, backend="auto"):
    """x W^T + bias + scale * (dropout(x) A^T) B^T, differentiable in x, weight, bias, lora_A and lora_B.

    The dropout (probability ``dropout_p``, active when ``training``) applies to the LoRA branch only, as in PEFT.
    Returns a tensor shaped (*x.shape[:-1], out_features) in x's dtype. Errors: ``TypeError`` for a non-tensor,
    a dtype other than x's or an unsupported one; ``ValueError`` for mismatched shapes, devices, r = 0, or a
    dropout_p outside [0, 1).
    """
    _check_inputs(x, weight, bias, lora_A, lora_B, scale, dropout_p, training)
    x2d = x.reshape(-1, x.shape[-1])
    keep = dropout_keep_mask(x2d.shape, dropout_p, x.device) if training and dropout_p > 0 else None
    backend = dispatch.resolve(backend, x.device, "lora_linear")
    if backend == "reference":
        y = lora_linear_ref(x2d, weight, bias, lora_A, lora_B, scale, keep, dropout_p)
    else:
        s = scale / (1 - dropout_p) if keep is not None else scale
        y, _ = dispatch.native_op("lora_linear", backend)(x2d, weight, bias, lora_A, lora_B, keep, float(s))
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------- registration


def _register(flavour):
    forward, backward = qualname("lora_linear", flavour), qualname("lora_linear_backward", flavour)

    @torch.library.register_fake(forward)
    def _(x, weight, bias, lora_A, lora_B, keep, scale):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])

    @torch.library.register_fake(backward)
    def _(grad_y, x, weight, lora_A, lora_B, keep, S, scale, output_mask):
        shapes = (x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape)
        return tuple(x.new_empty(shape) if need else None for shape, need in zip(shapes, output_mask))

    def setup_context(ctx, inputs, output):
        x, weight, _, lora_A, lora_B, keep, ctx.scale = inputs
        S = output[1]
        ctx.mark_non_differentiable(S)  # an activation saved for backward, not a result
        ctx.save_for_backward(x, weight, lora_A, lora_B, keep, S)

    backward_op = getattr(torch.ops.fastforget, backward.split("::")[1]).default

    def backward_fn(ctx, grad_y, _grad_S):
        x, weight, lora_A, lora_B, keep, S = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:5])  # x, weight, bias, lora_A, lora_B
        grads = backward_op(grad_y, x, weight, lora_A, lora_B, keep, S, ctx.scale, output_mask)
        return *grads, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


for _flavour in FLAVOURS:
    _register(_flavour)
