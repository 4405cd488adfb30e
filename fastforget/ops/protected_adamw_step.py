"""The whole protected optimizer step in one pass over memory: EWC gradient, gradient protection, AdamW update
and Synaptic Intelligence's path integral, fused over a parameter list (one param group).

Per element, in the accumulation dtype (fp32; fp64 for fp64 params), with g the stored gradient:

    g_task = s g,  s = (-1 if maximize else 1) / grad_scale                     (grad_scale: 1 when None)
    g_ewc  = g_task + 2 lam F (theta - anchor)                 penalty += lam F (theta - anchor)^2   (EWC)
    g'     = factors[t] g_ewc                                                    (protection, mode "tensor")
             or, with d = g_ewc - m:  m <- m + alpha d,  v <- (1 - alpha)(v + alpha d^2),
             s_imp = sigmoid(v var_scale[t]),  g' = (1 - s_imp) g_ewc if s_imp > threshold  (mode "element",
             the EMA of ``grad_ema_protect``, Finch 2009)
    AdamW (Loshchilov & Hutter 2019, torch.optim.AdamW's order): k = step + 1,
        theta <- theta (1 - lr wd);  m1 <- m1 + (1 - beta1)(g' - m1);  m2 <- beta2 m2 + (1 - beta2) g'^2
        theta <- theta - lr / (1 - beta1^k) * m1 / (sqrt(m2) / sqrt(1 - beta2^k) + eps);  step <- k
    omega  <- omega - g_task (theta_new - theta_old)           (Synaptic Intelligence, Zenke et al. 2017, eq. 3;
                                                                theta_new as stored, i.e. rounded)

Each part is optional (an empty list, or None). When ``found_inf`` (a one-element tensor, read on the device) is
nonzero, nothing at all is written (torch's fused AdamW semantics, no host synchronisation). The gradients are
never written. Returns lam * sum F (theta - anchor)^2 at the parameters before the step (0-dim, fp32; 0 when
the step is skipped).

Bytes per parameter (fp32 everything): AdamW 28 (reads theta, g, m1, m2; writes theta, m1, m2), EWC +8 (anchor,
F), element protection +16 (m, v read and written), SI +8 (omega read and written); mode "tensor" needs one
``grad_moments`` pass first (+4: reads g).
"""

from collections.abc import Sequence

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname
from fastforget.ops.ewc_penalty import ewc_penalty_accumulate_ref
from fastforget.ops.grad_ema import grad_ema_protect_ref
from fastforget.ops.scale_grads import scale_grads_ref

_ANCHOR_DTYPES = (torch.float32, torch.bfloat16)  # or the param dtype


# ---------------------------------------------------------------------------------------------------- reference


def _adamw_update(p, m1, m2, g, step, lr, beta1, beta2, eps, weight_decay):
    """torch.optim.AdamW's single-tensor update in the accumulation dtype; returns (theta, m1, m2)."""
    k = step.double().reshape(()) + 1  # a tensor, so that the reference traces without a host sync
    bias_correction1 = (1 - beta1**k).to(p.dtype)
    bias_correction2_sqrt = (1 - beta2**k).sqrt().to(p.dtype)
    p = p * (1 - lr * weight_decay)
    m1 = m1.lerp(g, 1 - beta1)
    m2 = m2 * beta2 + (1 - beta2) * g * g
    return p - (lr / bias_correction1) * m1 / (m2.sqrt() / bias_correction2_sqrt + eps), m1, m2


def protected_adamw_step_ref(
    params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, ema_mean, ema_var, alpha, var_scale,
    omega, grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, lam, threshold, maximize,
):  # fmt: skip
    """The oracle: the existing ops' references in ProtectedTrainer's order, then torch.optim.AdamW's math."""
    acc = accumulate_dtype(params)
    device = params[0].device
    skip = torch.zeros((), dtype=torch.bool, device=device) if found_inf is None else found_inf.reshape(()) != 0
    with torch.no_grad():
        sign = -1.0 if maximize else 1.0
        g_task = [sign * g.to(acc) for g in grads]
        if grad_scale is not None:
            g_task = [g / grad_scale.reshape(()).to(acc) for g in g_task]
        work = [g.clone() for g in g_task]
        penalty = torch.zeros((), dtype=acc, device=device)
        if anchors:
            penalty = ewc_penalty_accumulate_ref(params, anchors, fisher, work, lam)
        if factors is not None:
            scale_grads_ref(work, factors)
        if ema_mean:
            one = torch.ones((), dtype=acc, device=device)
            grad_ema_protect_ref(work, ema_mean, ema_var, one, alpha, var_scale, skip, threshold)
        for i, (p, g, m1, m2, step) in enumerate(zip(params, work, exp_avg, exp_avg_sq, steps)):
            new_p, new_m1, new_m2 = _adamw_update(
                p.to(acc), m1.to(acc), m2.to(acc), g, step, lr, beta1, beta2, eps, weight_decay
            )
            old_p = p.to(acc, copy=True)  # p itself when it already is acc
            p.copy_(torch.where(skip, p, new_p.to(p.dtype)))
            m1.copy_(torch.where(skip, m1, new_m1))
            m2.copy_(torch.where(skip, m2, new_m2))
            if omega:
                omega[i].copy_(torch.where(skip, omega[i], omega[i] - g_task[i] * (p.to(acc) - old_p)))
        for step in steps:
            step.add_((~skip).to(step.dtype))
    return torch.where(skip, 0.0, penalty)


# ---------------------------------------------------------------------------------------------------- checks


def _check_state(name, tensors, params, acc):
    """An optimizer-state list: shaped and placed like params, contiguous, in the accumulation dtype."""
    tensors = check.tensor_list(name, tensors)
    check.check_like_params(name, tensors, params)
    for i, t in enumerate(tensors):
        if t.dtype != acc:
            raise TypeError(f"{name}[{i}] has dtype {t.dtype}; the state of these params must be {acc}")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; the state is updated in place")
    return tensors


def _check_ewc(name, tensors, params):
    """An EWC list (anchors, or a float Fisher): like params, in fp32, bf16 or the param's dtype."""
    check.check_like_params(name, tensors, params)
    for i, (t, p) in enumerate(zip(tensors, params)):
        check.check_dtype(name, i, t, (*_ANCHOR_DTYPES, p.dtype))
    return tensors


def _optional_pair(names, pair, params, acc=None):
    """Both lists empty (absent), or both like params; acc: the state dtype they must have (else EWC dtypes)."""
    first, second = (check.tensor_list(n, v) for n, v in zip(names, pair))
    if not first and not second:
        return [], []
    if acc is not None:
        return _check_state(names[0], first, params, acc), _check_state(names[1], second, params, acc)
    return _check_ewc(names[0], first, params), _check_ewc(names[1], second, params)


def _per_tensor(name, value, count, device):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.shape != (count,) or not value.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor of shape ({count},)")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the params are on {device}")
    return value


def _one_element(name, value, device):
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{name} must be None or a one-element floating point tensor")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the params are on {device}")
    return value.reshape(())


def _hyperparameters(lr, betas, eps, weight_decay, lam, threshold):
    lr = check.check_scalar("lr", lr, minimum=0.0)
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (check.check_scalar(f"betas[{i}]", b, minimum=0.0) for i, b in enumerate(betas))
    if beta1 >= 1 or beta2 >= 1:
        raise ValueError(f"betas must be in [0, 1), got {tuple(betas)}")
    eps = check.check_scalar("eps", eps, minimum=0.0)
    weight_decay = check.check_scalar("weight_decay", weight_decay, minimum=0.0)
    lam = check.check_scalar("lam", lam, minimum=0.0)
    return lr, beta1, beta2, eps, weight_decay, lam, check.check_scalar("threshold", threshold)


def check_params_and_grads(params, grads, dtypes=check.FLOAT_DTYPES):
    """The params (one device, distinct, of ``dtypes``) and their gradients; returns them and the accumulation
    dtype."""
    params = check.tensor_list("params", params)
    check.check_one_device("params", params)
    for i, p in enumerate(params):
        check.check_dtype("params", i, p, dtypes)
    check.check_distinct("params", params)
    grads = check.tensor_list("grads", grads)
    check.check_like_params("grads", grads, params)
    for i, g in enumerate(grads):
        check.check_dtype("grads", i, g, check.FLOAT_DTYPES)
    return params, grads, accumulate_dtype(params)


def check_steps(steps, params):
    steps = check.tensor_list("steps", steps)
    if len(steps) != len(params):
        raise ValueError(f"steps has {len(steps)} tensors but params has {len(params)}")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype not in (torch.float32, torch.float64) or (params and s.device != params[0].device):
            raise ValueError(f"steps[{i}] must be a one-element float32/float64 tensor on the params' device")
    return steps


def check_extras(params, acc, factors, ema, alpha, var_scale, omega, grad_scale, found_inf):
    """Protection (per tensor or per element), SI's omega, grad_scale and found_inf: (factors, ema_mean, ema_var,
    alpha, var_scale, omega, grad_scale, found_inf), checked."""
    ema_mean, ema_var = _optional_pair(("ema_mean", "ema_var"), ema, params, acc)
    omega = check.tensor_list("omega", omega)
    if omega:
        omega = _check_state("omega", omega, params, acc)
    device = params[0].device if params else None
    factors = _per_tensor("factors", factors, len(params), device)
    alpha, var_scale = (_per_tensor(n, v, len(params), device) for n, v in (("alpha", alpha), ("var_scale", var_scale)))
    if factors is not None and ema_mean:
        raise ValueError("pass factors (protection mode 'tensor') or ema_mean/ema_var (mode 'element'), not both")
    if bool(ema_mean) != (alpha is not None) or bool(ema_mean) != (var_scale is not None):
        raise ValueError("ema_mean/ema_var, alpha and var_scale come together (protection mode 'element')")
    grad_scale, found_inf = _one_element("grad_scale", grad_scale, device), _one_element("found_inf", found_inf, device)
    return factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf


def check_no_overlap(params, steps, grads, extras, written=(), read=()):
    """No written list shares memory with another or with anything read; ``written``/``read``: the op's own
    (name, list) pairs besides params, steps, grads and the extras (the tuple check_extras returns)."""
    factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf = extras
    check.check_writes(
        [("params", params), *written, ("steps", steps), ("ema_mean", ema_mean), ("ema_var", ema_var),
         ("omega", omega)],
        [("grads", grads), *read, ("factors", [factors]), ("alpha", [alpha]), ("var_scale", [var_scale]),
         ("grad_scale", [grad_scale]), ("found_inf", [found_inf])],
    )  # fmt: skip


def _checked(params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, ema, alpha, var_scale, omega,
             grad_scale, found_inf):  # fmt: skip
    params, grads, acc = check_params_and_grads(params, grads)
    exp_avg, exp_avg_sq = (
        _check_state(n, v, params, acc) for n, v in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq))
    )
    steps = check_steps(steps, params)
    anchors, fisher = _optional_pair(("anchors", "fisher"), (anchors, fisher), params)
    extras = check_extras(params, acc, factors, ema, alpha, var_scale, omega, grad_scale, found_inf)
    check_no_overlap(
        params, steps, grads, extras, [("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
        [("anchors", anchors), ("fisher", fisher)],
    )  # fmt: skip
    factors, ema_mean, ema_var, alpha, var_scale, omega, grad_scale, found_inf = extras
    return (params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, ema_mean, ema_var, alpha, var_scale,
            omega, grad_scale, found_inf)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- public API


def protected_adamw_step(
    params, grads, exp_avg, exp_avg_sq, steps, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
    anchors=(), fisher=(), lam=0.0, factors=None, ema_mean=(), ema_var=(), alpha=None, var_scale=None,
    threshold=0.1, omega=(), grad_scale=None, found_inf=None, maximize=False, backend="auto",
):  # fmt: skip
    """One fused protected AdamW step, in place (see the module doc); returns the step's EWC penalty (detached).

    ``exp_avg``/``exp_avg_sq``/``ema_mean``/``ema_var``/``omega``: contiguous tensors shaped like the params in
    the accumulation dtype (fp32 for fp32/bf16/fp16 params). ``steps``: one one-element float tensor per param on
    their device. ``anchors``/``fisher``: the EWC state (fp32, bf16 or the param dtype). ``factors`` (mode
    "tensor") or ``alpha`` and ``var_scale`` (mode "element"): one entry per tensor. Everything is checked before
    anything is written: a rejected call changes nothing.
    """
    lr, beta1, beta2, eps, weight_decay, lam, threshold = _hyperparameters(lr, betas, eps, weight_decay, lam, threshold)
    args = _checked(params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, (ema_mean, ema_var), alpha,
                    var_scale, omega, grad_scale, found_inf)  # fmt: skip
    if not args[0]:
        return torch.zeros(())
    return run_protected_adamw_step(
        *args, lr, beta1, beta2, eps, weight_decay, lam, threshold, bool(maximize), backend=backend
    )


def run_protected_adamw_step(*args, backend):
    """protected_adamw_step without the argument checks (the schema's positional arguments), for callers whose
    lists are valid by construction (``ff.optim.ProtectedAdamW``)."""
    backend = dispatch.resolve(backend, args[0][0].device, "protected_adamw_step")
    with torch.no_grad():
        if backend == "reference":
            return protected_adamw_step_ref(*args)
        return dispatch.native_op("protected_adamw_step", backend)(*args)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("protected_adamw_step", _flavour))(
        lambda params, *rest: params[0].new_empty((), dtype=accumulate_dtype(params))
    )
