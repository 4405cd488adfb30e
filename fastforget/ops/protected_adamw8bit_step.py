"""``protected_adamw_step`` with AdamW's moments (and optionally EWC's Fisher) stored at 8 bits per element, in
bitsandbytes' block-wise format (``fastforget/quantize.py``: blocks of 256 elements restarting at every tensor's
element 0, one fp32 absmax per block, uint8 codes into the signed dynamic map for exp_avg and the unsigned one for
exp_avg_sq and the Fisher).

Per element, in fp32: m1 = qmap_signed[c1] absmax1[block], m2 = qmap_unsigned[c2] absmax2[block] (F likewise when
the Fisher is 8-bit); then exactly the 32-bit step's math (``fastforget/ops/protected_adamw_step.py``: EWC,
protection, torch's AdamW order, SI), the param updated from the unquantized new moments (as bitsandbytes'
``optimizer_update_8bit_blockwise`` does); then per block the new absmax = max |new m| and the codes of the new
moments by the nearest-map-entry rule. When ``found_inf`` is nonzero nothing is written (codes, absmax, params,
steps, protection state, omega). Returns the EWC penalty at the params before the step, as the 32-bit op.

Bytes of state per parameter: 2 (two uint8 moments) + 8/256 (their absmax) instead of 8; an 8-bit Fisher with a
bf16 anchor adds 3 + 4/256 (fp32 Fisher and anchor: 8).
"""

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._schemas import FLAVOURS, qualname
from fastforget.ops.protected_adamw_step import (
    _check_ewc,
    _hyperparameters,
    check_extras,
    check_no_overlap,
    check_params_and_grads,
    check_steps,
    protected_adamw_step_ref,
)
from fastforget.quantize import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # bitsandbytes' 8-bit optimizers take the same


def blocks(numel: int) -> int:
    """The number of quantization blocks (absmax entries) of a tensor of ``numel`` elements."""
    return -(-numel // BLOCKSIZE)


# ---------------------------------------------------------------------------------------------------- reference


def protected_adamw8bit_step_ref(
    params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed, qmap_unsigned, steps,
    anchors, fisher, fisher_absmax, factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf, lr,
    beta1, beta2, eps, weight_decay, lam, threshold, maximize,
):  # fmt: skip
    """The oracle: dequantize (``fastforget.quantize``) -> ``protected_adamw_step_ref`` on fp32 moments ->
    quantize back (unless found_inf)."""
    with torch.no_grad():
        m1 = [dequantize_blockwise(c, a, qmap_signed) for c, a in zip(exp_avg, exp_avg_absmax)]
        m2 = [dequantize_blockwise(c, a, qmap_unsigned) for c, a in zip(exp_avg_sq, exp_avg_sq_absmax)]
        if fisher_absmax:
            fisher = [dequantize_blockwise(c, a, qmap_unsigned) for c, a in zip(fisher, fisher_absmax)]
        penalty = protected_adamw_step_ref(
            params, grads, m1, m2, steps, anchors, fisher, factors, ema_mean, ema_var, alpha, var_scale, omega,
            grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, lam, threshold, maximize,
        )  # fmt: skip
        device = params[0].device
        skip = torch.zeros((), dtype=torch.bool, device=device) if found_inf is None else found_inf.reshape(()) != 0
        for moments, codes, absmax, qmap in ((m1, exp_avg, exp_avg_absmax, qmap_signed),
                                             (m2, exp_avg_sq, exp_avg_sq_absmax, qmap_unsigned)):  # fmt: skip
            for m, c, a in zip(moments, codes, absmax):
                new_c, new_a = quantize_blockwise(m, qmap)
                c.copy_(torch.where(skip, c, new_c))
                a.copy_(torch.where(skip, a, new_a))
    return penalty


# ---------------------------------------------------------------------------------------------------- checks


def _check_codes(name, codes, params):
    """uint8 code tensors shaped and placed like params, contiguous (written in place)."""
    codes = check.tensor_list(name, codes)
    check.check_like_params(name, codes, params)
    for i, c in enumerate(codes):
        check.check_dtype(name, i, c, (torch.uint8,))
        if not c.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; the state is updated in place")
    return codes


def _check_absmax(name, absmax, params):
    """One contiguous fp32 tensor of shape (ceil(numel / 256),) per param, on its device."""
    absmax = check.tensor_list(name, absmax)
    if len(absmax) != len(params):
        raise ValueError(f"{name} has {len(absmax)} tensors but params has {len(params)}")
    for i, (a, p) in enumerate(zip(absmax, params)):
        check.check_dtype(name, i, a, (torch.float32,))
        if a.shape != (blocks(p.numel()),) or not a.is_contiguous():
            raise ValueError(
                f"{name}[{i}] must be a contiguous tensor of shape ({blocks(p.numel())},) (one fp32 scale per "
                f"{BLOCKSIZE} elements of params[{i}]), got shape {tuple(a.shape)}"
            )
        if a.device != p.device:
            raise ValueError(f"{name}[{i}] is on {a.device} but params[{i}] is on {p.device}")
    return absmax


def _check_qmap(name, qmap, device):
    if not isinstance(qmap, torch.Tensor) or qmap.shape != (256,) or qmap.dtype != torch.float32:
        found = f"{tuple(qmap.shape)} {qmap.dtype}" if isinstance(qmap, torch.Tensor) else type(qmap).__name__
        raise ValueError(f"{name} must be a float32 tensor of shape (256,) (a sorted quantization map), got {found}")
    if device is not None and qmap.device != device:
        raise ValueError(f"{name} is on {qmap.device} but the params are on {device}")
    return qmap.contiguous()


def _checked(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed, qmap_unsigned,
             steps, anchors, fisher, fisher_absmax, factors, ema, alpha, var_scale, omega, grad_scale,
             found_inf):  # fmt: skip
    params, grads, acc = check_params_and_grads(params, grads, PARAM_DTYPES)
    exp_avg, exp_avg_sq = (_check_codes(n, v, params) for n, v in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)))
    exp_avg_absmax, exp_avg_sq_absmax = (
        _check_absmax(n, v, params)
        for n, v in (("exp_avg_absmax", exp_avg_absmax), ("exp_avg_sq_absmax", exp_avg_sq_absmax))
    )
    device = params[0].device if params else None
    qmap_signed = _check_qmap("qmap_signed", dynamic_map(True, device) if qmap_signed is None else qmap_signed, device)
    qmap_unsigned = _check_qmap(
        "qmap_unsigned", dynamic_map(False, device) if qmap_unsigned is None else qmap_unsigned, device
    )
    steps = check_steps(steps, params)
    anchors, fisher = check.tensor_list("anchors", anchors), check.tensor_list("fisher", fisher)
    fisher_absmax = check.tensor_list("fisher_absmax", fisher_absmax)
    if anchors or fisher or fisher_absmax:
        if not anchors or not fisher:
            raise ValueError("anchors and fisher come together (EWC); fisher_absmax only with an 8-bit fisher")
        anchors = _check_ewc("anchors", anchors, params)
        if fisher_absmax:
            fisher = _check_codes("fisher", fisher, params)
            fisher_absmax = _check_absmax("fisher_absmax", fisher_absmax, params)
        else:
            fisher = _check_ewc("fisher", fisher, params)
    extras = check_extras(params, acc, factors, ema, alpha, var_scale, omega, grad_scale, found_inf)
    check_no_overlap(
        params, steps, grads, extras,
        [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("exp_avg_absmax", exp_avg_absmax),
         ("exp_avg_sq_absmax", exp_avg_sq_absmax)],
        [("anchors", anchors), ("fisher", fisher), ("fisher_absmax", fisher_absmax), ("qmap_signed", [qmap_signed]),
         ("qmap_unsigned", [qmap_unsigned])],
    )  # fmt: skip
    factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf = extras
    return (params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed, qmap_unsigned, steps,
            anchors, fisher, fisher_absmax, factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale,
            found_inf)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- public API


def protected_adamw8bit_step(
    params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, steps, *, lr, betas=(0.9, 0.999),
    eps=1e-8, weight_decay=1e-2, qmap_signed=None, qmap_unsigned=None, anchors=(), fisher=(), fisher_absmax=(),
    lam=0.0, factors=None, ema_mean=(), ema_var=(), alpha=None, var_scale=None, threshold=0.1, omega=(),
    grad_scale=None, found_inf=None, maximize=False, backend="auto",
):  # fmt: skip
    """One fused protected AdamW step with 8-bit moments, in place (see the module doc); returns the step's EWC
    penalty (detached).

    ``exp_avg``/``exp_avg_sq``: contiguous uint8 codes shaped like the params (bitsandbytes' ``state1``/``state2``);
    ``exp_avg_absmax``/``exp_avg_sq_absmax``: one contiguous fp32 tensor of ceil(numel / 256) scales per param
    (``absmax1``/``absmax2``); ``qmap_signed``/``qmap_unsigned``: the (256,) fp32 maps (``qmap1``/``qmap2``;
    None: ``fastforget.quantize.dynamic_map``). ``fisher``: float as in ``protected_adamw_step``, or uint8 codes
    with ``fisher_absmax`` (unsigned map). Every other argument as in ``protected_adamw_step``. Params: fp32, bf16
    or fp16. Everything is checked before anything is written: a rejected call changes nothing.
    """
    lr, beta1, beta2, eps, weight_decay, lam, threshold = _hyperparameters(lr, betas, eps, weight_decay, lam, threshold)
    args = _checked(params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed,
                    qmap_unsigned, steps, anchors, fisher, fisher_absmax, factors, (ema_mean, ema_var), alpha,
                    var_scale, omega, grad_scale, found_inf)  # fmt: skip
    if not args[0]:
        return torch.zeros(())
    return run_protected_adamw8bit_step(
        *args, lr, beta1, beta2, eps, weight_decay, lam, threshold, bool(maximize), backend=backend
    )


def run_protected_adamw8bit_step(*args, backend):
    """protected_adamw8bit_step without the argument checks (the schema's positional arguments), for callers whose
    lists are valid by construction (``ff.optim.ProtectedAdamW(state_bits=8)``). A backend whose kernel of this op
    is not built runs the reference."""
    device = args[0][0].device
    backend = dispatch.resolve(backend, device, "protected_adamw8bit_step")
    with torch.no_grad():
        if backend == "reference" or not dispatch.has_kernel("protected_adamw8bit_step", backend, device):
            return protected_adamw8bit_step_ref(*args)
        return dispatch.native_op("protected_adamw8bit_step", backend)(*args)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("protected_adamw8bit_step", _flavour))(
        lambda params, *rest: params[0].new_empty((), dtype=torch.float32)
    )
