"""QLoRA: a LoRA branch over a bitsandbytes-quantized base layer (Linear4bit nf4/fp4, Linear8bitLt).

The quantized layer computes its own output y = base(x) (bitsandbytes' kernels, its own backward for dx); the
rank-r branch is then added into y in place, as PEFT's bnb layers compute it (x cast to the adapter's dtype,
then ``result + lora_B(lora_A(dropout(x))) * scaling``), with keep the dropout's keep-mask and s = scale / (1 - p):

    S  = s (x * keep) A^T          (M, r)    saved for backward
    y += S B^T                                in place (addmm_, beta = 1): no second M x out tensor
    dS = s dY B,   dx += (dS A) * keep,   dA = dS^T (x * keep),   dB = dY^T S

where dY passes through to the base layer's backward unchanged. Under ``torch.autocast`` the branch is computed in
the autocast dtype, as PEFT's bnb layers compute it there (they skip their cast of x, and F.linear casts x, A and B):
x, A and B are cast to that dtype, the GEMMs run in it (fp32 accumulation), and A's and B's gradients reach the
fp32 adapter in fp32. bitsandbytes is not imported here.
"""

import math

import torch
from torch import nn

from fastforget import _autocast
from fastforget.ops.lora_linear import dropout_keep_mask


class _AddLoRA(torch.autograd.Function):
    """y += s (x * keep) A^T B^T in place; gradients to y (passed through), x, A and B."""

    @staticmethod
    def forward(ctx, y, x, lora_A, lora_B, keep, scale):
        dropped = x if keep is None else x * keep
        S = torch.mm(dropped, lora_A.t()).mul_(scale)
        y2d = y.view(x.shape[0], y.shape[-1])
        if y.dtype == S.dtype:
            y2d.addmm_(S, lora_B.t())
        else:  # a base computing in another dtype than the adapter's: PEFT's cast of the branch, then the sum
            y2d.add_(torch.mm(S, lora_B.t()).to(y.dtype))
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, lora_A, lora_B, keep, S)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_B, keep, S = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        grad = grad_y.reshape(S.shape[0], grad_y.shape[-1]).to(S.dtype)
        d_x = d_A = d_B = None
        if need_x or need_A:
            d_S = torch.mm(grad, lora_B).mul_(ctx.scale)
            if need_x:
                d_x = torch.mm(d_S, lora_A)
                d_x = d_x if keep is None else d_x.mul_(keep)
            if need_A:
                d_A = torch.mm(d_S.t(), x if keep is None else x * keep)
        if need_B:
            d_B = torch.mm(grad.t(), S)
        return grad_y, d_x, d_A, d_B, None, None


def add_lora_(y, x, lora_A, lora_B, scale, dropout_p=0.0, training=True):
    """``y + scale * (dropout(x) A^T) B^T`` for the output ``y`` of a quantized base layer, written into y.

    x (..., in) is cast to the adapter's dtype first, as PEFT does (under torch.autocast x, lora_A and lora_B are
    cast to the autocast dtype instead); y (..., out) is updated in place unless it is a view (PEFT clones a 4-bit
    layer's output for that case), and returned."""
    if y._is_view():
        y = y.clone()
    x2d = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    device_type = x.device.type
    compute = _autocast.dtype(device_type)
    if compute is None or lora_A.dtype == torch.float64:  # autocast leaves fp64 alone
        x2d = x2d.to(lora_A.dtype)
    else:
        x2d, lora_A, lora_B = _autocast.cast(compute, device_type, x2d, lora_A, lora_B)
    keep = dropout_keep_mask(x2d.shape, dropout_p, x.device) if training and dropout_p > 0 else None
    s = scale / (1 - dropout_p) if keep is not None else scale
    return _AddLoRA.apply(y, x2d, lora_A, lora_B, keep, float(s))


def dequantized_linear(layer):
    """A plain nn.Linear holding the dequantized weight (fp32) and the bias of a bitsandbytes Linear4bit or
    Linear8bitLt: where a LoRA adapter can be merged (then requantize it if needed)."""
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise ImportError("dequantized_linear needs bitsandbytes: pip install bitsandbytes") from error

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:
        dense = bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=dense.device)
    with torch.no_grad():
        linear.weight.copy_(dense.reshape(layer.out_features, layer.in_features))
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear.requires_grad_(False)
