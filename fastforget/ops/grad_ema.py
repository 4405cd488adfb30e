"""Per-element gradient protection: an exponential moving mean and variance of every gradient element, and each
gradient element scaled by its own importance, in two fused passes over a whole list.

For x = inv_scale * g and one weight alpha per tensor, the Welford-style EMA (Finch 2009, "Incremental
calculation of weighted mean and variance", eqs. 124 and 143):

    d = x - m,    m' = m + alpha d,    v' = (1 - alpha) (v + alpha d^2)
    importance = sigmoid(v' * var_scale),    g' = (1 - importance) g  where importance > threshold, else g

With alpha = max(1/t, 1 - beta) at a tensor's t-th step (what ``GradientProtector(mode="element")`` passes), the
first 1/(1 - beta) steps give the exact running mean and population variance, and later steps an EMA.

* ``grad_ema_stats`` (pass 1) reads g, m, v and returns, per tensor, the max over its elements of v' (0 for an
  empty tensor; +inf when a v' is not finite: a NaN/Inf gradient, or an overflow). It writes nothing.
* ``grad_ema_protect`` (pass 2) reads g, m, v and writes m', v', g' -- unless ``skip`` (a 0-dim bool tensor,
  read on the device, so no host synchronisation) is set, in which case it writes nothing.

``grad_ema_protect_`` runs both: pass 1's maxima say whether the step is finite (a non-finite one leaves state and
gradients untouched) and give ``normalize="max"`` its divisor.
"""

import math

import torch

from fastforget import _validation as check
from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname
from fastforget.ops.grad_moments import _checked_grads, _inv_scale_tensor

NORMALIZE = ("none", "max")


def _ema_step(x, m, v, alpha):
    d = x - m
    return m + alpha * d, (1 - alpha) * (v + alpha * d * d)


def _updated(grads, mean, var, inv_scale, alpha):
    """(m', v') of every tensor, in the state's dtype."""
    acc = accumulate_dtype(mean)
    scale, alpha = inv_scale.to(acc), alpha.to(acc)
    for t, (g, m, v) in enumerate(zip(grads, mean, var)):
        yield _ema_step(g.to(acc) * scale, m.to(acc), v.to(acc), alpha[t])


def grad_ema_stats_ref(grads, mean, var, inv_scale, alpha):
    """Pure torch: per tensor, max of the updated variance v' (0 if empty, +inf if a v' is not finite)."""
    maxima = []
    for _, v_new in _updated(grads, mean, var, inv_scale, alpha):
        top = v_new.max() if v_new.numel() else v_new.new_zeros(())
        maxima.append(torch.where(v_new.isfinite().all(), top, math.inf))
    return torch.stack(maxima) if maxima else torch.zeros(0)


def grad_ema_protect_ref(grads, mean, var, inv_scale, alpha, var_scale, skip, threshold):
    """Pure torch: the EMA update of mean and var and the per-element scaling of grads, in place, unless skip."""
    acc = accumulate_dtype(mean)
    var_scale = var_scale.to(acc)
    with torch.no_grad():
        for t, (g, m, v, (m_new, v_new)) in enumerate(
            zip(grads, mean, var, _updated(grads, mean, var, inv_scale, alpha))
        ):
            importance = torch.sigmoid(v_new * var_scale[t])
            g_new = torch.where(importance > threshold, (1 - importance) * g.to(acc), g.to(acc))
            g.copy_(torch.where(skip, g, g_new))
            m.copy_(torch.where(skip, m, m_new))
            v.copy_(torch.where(skip, v, v_new))


def _var_scale(maxima, normalize, temperature):
    """The factor of v' inside the sigmoid: 1/T, or 1/(T max v') for normalize="max" (0 where max v' is 0)."""
    if normalize == "max":
        return torch.where(maxima > 0, 1 / (maxima * temperature), 0.0)
    return torch.full_like(maxima, 1 / temperature)


def _check_state(name, state, grads, acc):
    state = check.tensor_list(name, state)
    check.check_like_params(name, state, grads, "grads")
    for i, s in enumerate(state):
        if s.dtype != acc:
            raise TypeError(f"{name}[{i}] has dtype {s.dtype}; the state must be all float32 or all float64")
        if not s.is_contiguous():
            raise ValueError(f"{name}[{i}] is not contiguous; the state is updated in place")
    return state


def _alpha_tensor(alpha, count, device, acc):
    if isinstance(alpha, torch.Tensor):
        if alpha.shape != (count,) or not alpha.is_floating_point():
            raise ValueError(f"alpha must be a float or a floating point tensor of shape ({count},)")
        return alpha.to(device, acc)
    alpha = check.check_scalar("alpha", alpha)
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return torch.full((count,), alpha, dtype=acc, device=device)


def grad_ema_protect_(
    grads, mean, var, alpha, *, threshold=0.1, normalize="none", temperature=1.0, inv_scale=1.0, backend="auto"
):
    """Per-element gradient protection, in place (see the module doc for the formulas).

    ``mean``/``var``: the EMA state, one contiguous tensor per gradient, shaped like it, all fp32 or all fp64:
    the math runs in that dtype, whatever the gradients' dtypes. ``alpha``: the EMA weight in (0, 1], a float
    or one per tensor (a tensor's values are not checked). ``normalize="max"`` divides v' by its tensor's max;
    ``temperature`` T divides the sigmoid's argument. Returns ``(importance, found_inf)``: per tensor the
    largest element importance of this step (NaN when the step is skipped) and a 0-dim bool tensor, set when a
    gradient held a NaN/Inf, in which case nothing was written. Nothing is written on bad input either.
    """
    grads = _checked_grads(grads)
    mean, var = check.tensor_list("mean", mean), check.tensor_list("var", var)
    acc = mean[0].dtype if mean and mean[0].dtype in (torch.float32, torch.float64) else torch.float32
    mean, var = _check_state("mean", mean, grads, acc), _check_state("var", var, grads, acc)
    if normalize not in NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZE}")
    threshold = check.check_scalar("threshold", threshold)
    temperature = check.check_scalar("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    check.check_distinct("grads", grads)
    check.check_writes([("grads", grads), ("mean", mean), ("var", var)])
    if not grads:
        return torch.zeros(0), torch.zeros((), dtype=torch.bool)
    device = grads[0].device
    alpha = _alpha_tensor(alpha, len(grads), device, acc)
    inv_scale = _inv_scale_tensor(inv_scale, device)
    return run_grad_ema_protect(grads, mean, var, inv_scale, alpha, threshold, normalize, temperature, backend)


def run_grad_ema_protect(
    grads, mean, var, inv_scale, alpha, threshold, normalize, temperature, backend, reduce_maxima=None
):
    """grad_ema_protect_ without the argument checks, for callers whose lists are valid by construction.

    ``reduce_maxima`` (in place, between the passes) combines the per-tensor maxima of sharded tensors' shards."""
    backend = dispatch.resolve(backend, grads[0].device, "grad_ema_protect_")
    with torch.no_grad():
        if backend == "reference":
            stats, protect = grad_ema_stats_ref, grad_ema_protect_ref
        else:
            stats, protect = (
                dispatch.native_op("grad_ema_stats", backend),
                dispatch.native_op("grad_ema_protect", backend),
            )
        maxima = stats(grads, mean, var, inv_scale, alpha)
        if reduce_maxima is not None:
            maxima = reduce_maxima(maxima)
        found_inf = ~maxima.isfinite().all()
        var_scale = _var_scale(maxima, normalize, temperature)
        protect(grads, mean, var, inv_scale, alpha, var_scale, found_inf, threshold)
    importance = torch.where(found_inf, math.nan, torch.sigmoid(maxima * var_scale))
    return importance, found_inf


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("grad_ema_stats", _flavour))(
        lambda grads, mean, var, inv_scale, alpha: grads[0].new_empty(len(grads), dtype=accumulate_dtype(mean))
    )
    torch.library.register_fake(qualname("grad_ema_protect", _flavour))(
        lambda grads, mean, var, inv_scale, alpha, var_scale, skip, threshold: None
    )
