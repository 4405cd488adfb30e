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

Under torch.func transforms (vmap, grad, vjp, jacrev: per-sample gradients) ``lora_linear`` applies
_TransformableLoRALinear around the same ops, whose vmap rules are registered below (see "vmap rules").
"""

import math
import numbers

import torch
import torch.nn.functional as F

from fastforget import _autocast, dispatch
from fastforget import _validation as check
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
    """The dropout's keep-mask: True with probability 1 - dropout_p, from torch's default generator of `device`.

    u >= p for uniform u in [0, 1): on the CPU twice as fast as ``bernoulli_`` into a bool tensor (14 against 26 ms
    for 4096 x 1024; torch's CPU generator is serial, and this draw is most of what dropout adds to a layer)."""
    return torch.rand(shape, device=device) >= dropout_p


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, training=True, *, backend="auto"):
    """x W^T + bias + scale * (dropout(x) A^T) B^T, differentiable in x, weight, bias, lora_A and lora_B.

    The dropout (probability ``dropout_p``, active when ``training``) applies to the LoRA branch only, as in PEFT.
    Returns a tensor shaped (*x.shape[:-1], out_features) in x's dtype. Errors: ``TypeError`` for a non-tensor,
    a dtype other than x's or an unsupported one; ``ValueError`` for mismatched shapes, devices, r = 0, or a
    dropout_p outside [0, 1).

    Under ``torch.autocast`` x, weight, bias, lora_A and lora_B are first cast to the autocast dtype, as F.linear's
    are (fp64 ones excepted): the result is in that dtype and the gradients reach fp32 masters in fp32.
    """
    x, weight, bias, lora_A, lora_B = _autocast.cast_inputs(x, weight, bias, lora_A, lora_B)
    _check_inputs(x, weight, bias, lora_A, lora_B, scale, dropout_p, training)
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: x may have no elements (a vmap of 0 samples)
    keep = dropout_keep_mask(x2d.shape, dropout_p, x.device) if training and dropout_p > 0 else None
    backend = dispatch.resolve(backend, x.device, "lora_linear")
    if backend == "reference":
        y = lora_linear_ref(x2d, weight, bias, lora_A, lora_B, scale, keep, dropout_p)
    else:
        s = scale / (1 - dropout_p) if keep is not None else scale
        args = (x2d, weight, bias, lora_A, lora_B, keep, float(s))
        if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():
            y, _ = _TransformableLoRALinear.apply(*args, backend)  # under torch.func: see the class
        else:
            y, _ = dispatch.native_op("lora_linear", backend)(*args)
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------------------------------------------- vmap rules
#
# torch.func.vmap of the two ops (torch.library.register_vmap; `info.batch_size` = B, the vmapped dim moved to the
# front). The ops take x as (M, in): rows are independent, so when only the per-row tensors (x, keep, S, grad_y)
# are batched, their B x M rows are folded into one M and the op runs once -- exact, nothing but a reshape. The
# backward's dweight, dbias, dlora_A and dlora_B are sums over the rows, which must stay per vmapped sample
# (per-sample gradients): they are batched matmuls over the B samples, each reducing its own M rows, in fp32 (fp64
# for fp64) and rounded once, as the op does. When a weight or an adapter is batched (per-sample weights, e.g. an
# ensemble), the op runs once per sample and the results are stacked.


def _batch_first(t, dim, size):
    """`t` with its vmapped dim at the front (expanded to `size` when `t` is not batched); None stays None."""
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _fold(t):
    """(B, M, n) -> (B * M, n)."""
    return None if t is None else t.reshape(t.shape[0] * t.shape[1], t.shape[2])


def _per_sample(op, size, in_dims, args):
    """Stacked results of `op` run on each sample's slice of the batched args (the unbatched ones shared)."""
    args = [a if d is None else a.movedim(d, 0) for a, d in zip(args, in_dims)]
    if size == 0:  # no samples: one run on zeros gives the shapes, none of it is kept
        args = [a if d is None else a.new_zeros(1, *a.shape[1:]) for a, d in zip(args, in_dims)]
    results = [op(*(a if d is None else a[i] for a, d in zip(args, in_dims))) for i in range(max(size, 1))]
    return [None if r[0] is None else torch.stack(r)[:size] for r in zip(*results)]


def _forward_vmap(op):
    def rule(info, in_dims, x, weight, bias, lora_A, lora_B, keep, scale):
        size = info.batch_size
        x_dim, _, _, _, _, keep_dim, _ = in_dims
        if all(d is None for d in in_dims[1:5]):  # rows only: fold them into M, one call
            xb = _batch_first(x, x_dim, size)
            keepb = _batch_first(keep, keep_dim, size)
            rows = xb.shape[1]
            y, S = op(_fold(xb), weight, bias, lora_A, lora_B, _fold(keepb), scale)
            return (y.reshape(size, rows, y.shape[-1]), S.reshape(size, rows, S.shape[-1])), (0, 0)
        y, S = _per_sample(
            lambda *a: op(*a, scale), size, in_dims[:6], [x, weight, bias, lora_A, lora_B, keep]
        )  # fmt: skip
        return (y, S), (0, 0)

    return rule


def _weight_grads(grad_y, x, lora_A, lora_B, keep, S, scale, output_mask):
    """dweight, dbias, dlora_A, dlora_B per sample, for batched (B, M, .) or shared (M, .) row tensors and shared
    weights: batched matmuls reducing each sample's M rows, in fp32 (fp64 for fp64), each rounded once to x's
    dtype (dS too, as the op does). A result is batched (B, .) when one of its row tensors is."""
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    gy = grad_y.to(acc)
    _, need_weight, need_bias, need_A, need_B = output_mask
    d_weight = (gy.mT @ x.to(acc)).to(dtype) if need_weight else None
    d_bias = gy.sum(-2).to(dtype) if need_bias else None
    d_A = d_B = None
    if need_A:
        d_S = (gy @ lora_B.to(acc)).mul_(scale).to(dtype)
        dropped = x if keep is None else x * keep
        d_A = (d_S.to(acc).mT @ dropped.to(acc)).to(dtype)
    if need_B:
        d_B = (gy.mT @ S.to(acc)).to(dtype)
    return d_weight, d_bias, d_A, d_B


def _backward_vmap(op):
    def rule(info, in_dims, grad_y, x, weight, lora_A, lora_B, keep, S, scale, output_mask):
        size = info.batch_size
        grad_y_dim, x_dim, weight_dim, A_dim, B_dim, keep_dim, S_dim, _, _ = in_dims
        if any(d is not None for d in (weight_dim, A_dim, B_dim)):  # per-sample weights: one call per sample
            grads = _per_sample(
                lambda *a: op(*a, scale, output_mask), size, in_dims[:7], [grad_y, x, weight, lora_A, lora_B, keep, S]
            )  # fmt: skip
            return tuple(grads), tuple(None if g is None else 0 for g in grads)
        rows = ((grad_y, grad_y_dim), (x, x_dim), (keep, keep_dim), (S, S_dim))
        d_x = None
        if output_mask[0]:  # rows are independent: fold the B x M rows into M, one call
            grad_yb, xb, keepb, Sb = (_batch_first(t, d, size) for t, d in rows)
            only_dx = [True, False, False, False, False]
            d_x = op(_fold(grad_yb), _fold(xb), weight, lora_A, lora_B, _fold(keepb), _fold(Sb), scale, only_dx)[0]
            d_x = d_x.reshape(xb.shape)
        grad_y, x, keep, S = (t if d is None else t.movedim(d, 0) for t, d in rows)
        weight_grads = _weight_grads(grad_y, x, lora_A, lora_B, keep, S, scale, output_mask)
        unbatched_dims = (weight.dim(), 1, lora_A.dim(), lora_B.dim())
        out_dims = (None if d_x is None else 0,) + tuple(
            None if g is None or g.dim() == n else 0 for g, n in zip(weight_grads, unbatched_dims)
        )
        return (d_x, *weight_grads), out_dims

    return rule


def _save_for_backward(ctx, inputs, output):
    """What the op's autograd keeps (the op's inputs and its outputs (y, S)); csrc/lora_linear_autograd.cpp keeps the
    same for the native flavour."""
    x, weight, _, lora_A, lora_B, keep, ctx.scale = inputs
    S = output[1]
    ctx.mark_non_differentiable(S)  # an activation saved for backward, not a result
    ctx.save_for_backward(x, weight, lora_A, lora_B, keep, S)


def _gradients(ctx, backward_op, grad_y):
    """(dx, dweight, dbias, dlora_A, dlora_B) from what _save_for_backward kept, each only where it is needed."""
    x, weight, lora_A, lora_B, keep, S = ctx.saved_tensors
    output_mask = list(ctx.needs_input_grad[:5])  # x, weight, bias, lora_A, lora_B
    return backward_op(grad_y, x, weight, lora_A, lora_B, keep, S, ctx.scale, output_mask)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes gradients of lora_linear through, linked to what they were computed from (grad_y and the saved
    tensors), so that a derivative taken through them reaches this node and raises: the op has no second
    derivative. The Triton flavour's guard; the native one is torch's not-implemented autograd (C++)."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "fastforget::lora_linear_backward_triton has no derivative: lora_linear has no double backward"
        )

    @staticmethod
    def wrap(gradients, *sources):
        present = [g for g in gradients if g is not None]
        linked = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
        passed = iter(_FirstOrderOnly.apply(len(present), *present, *linked) if linked else present)
        return tuple(None if g is None else next(passed) for g in gradients)


class _TransformableLoRALinear(torch.autograd.Function):
    """The op's autograd in the form torch.func accepts, for ff.lora_linear under torch.func transforms.

    The Function that torch.library.register_autograd generates has no setup_context, so torch.func.grad, vjp and
    jacrev refuse the op (pytorch/pytorch#168393); and an autograd.Function cannot be applied from inside the
    dispatcher (the op's Autograd kernel) under those transforms. ff.lora_linear therefore applies this Function
    itself, before the dispatcher, when a transform is active: the same forward and backward ops and the same
    saved tensors as the registered autograd, and a vmap rule generated by vmapping forward and backward, which
    runs the ops' vmap rules above."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, lora_A, lora_B, keep, scale, backend):
        return dispatch.native_op("lora_linear", backend)(x, weight, bias, lora_A, lora_B, keep, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_for_backward(ctx, inputs[:7], output)
        ctx.backend = inputs[7]

    @staticmethod
    def backward(ctx, grad_y, _grad_S):
        backward_op = dispatch.native_op("lora_linear_backward", ctx.backend)
        return *_gradients(ctx, backward_op, grad_y), None, None, None


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

    backward_op = getattr(torch.ops.fastforget, backward.split("::")[1]).default

    # torch.autocast: the forward casts its floating inputs as F.linear does; the backward runs in the dtypes the
    # forward saved (as torch's backward ops do), with autocast off inside its kernels
    _autocast.register(forward.split("::")[1], (_autocast.LOWER,) * 5 + (None, None))
    _autocast.register(backward.split("::")[1], (None,) * 9)

    # The native flavour's autograd is C++ (csrc/lora_linear_autograd.cpp), so eager calls run no Python; that file
    # also gives both flavours' backward ops torch's not-implemented autograd, so a double backward raises. The
    # Triton flavour raises without the extension too (_FirstOrderOnly), not a silently wrong second derivative.
    if flavour:

        def backward_fn(ctx, grad_y, _grad_S):
            if not torch.is_grad_enabled():
                return *_gradients(ctx, backward_op, grad_y), None, None
            with torch.no_grad():  # create_graph=True: these gradients must not be differentiated
                gradients = _gradients(ctx, backward_op, grad_y)
            return *_FirstOrderOnly.wrap(gradients, grad_y, *ctx.saved_tensors), None, None

        torch.library.register_autograd(forward, backward_fn, setup_context=_save_for_backward)
    forward_op = getattr(torch.ops.fastforget, forward.split("::")[1]).default
    torch.library.register_vmap(forward, _forward_vmap(forward_op))
    torch.library.register_vmap(backward, _backward_vmap(backward_op))


for _flavour in FLAVOURS:
    _register(_flavour)
