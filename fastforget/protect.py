"""Gradient protection: shrink the gradients of parameters whose recent gradients vary a lot.

The seed's rule, for each parameter with a gradient (one whose ``.grad`` is None is skipped and its history does
not advance): append the gradient to its history (the last ``window`` steps), compute

    importance = sigmoid(z),   z = var(all elements of all gradients in the window) (unbiased, N - 1)

and, if importance > threshold, ``grad *= 1 - importance``. With ``normalize="none"`` (the seed), z >= 0 so
importance >= 0.5: every protected gradient is at least halved. ``normalize="max"`` divides each tensor's variance
by the largest (defined) variance among this step's tensors (as UPGD scales its utilities by their maximum), so
z = var / max var in [0, 1]; ``temperature`` T divides z in both: importance = sigmoid(z / T).

``mode="tensor"``: ``GradientProtector`` computes exactly the seed's variance with O(window) numbers per tensor
instead of the window's gradients: per step, one fused pass (``ff.grad_moments``) gives each gradient's
(count, mean, M2), a ring keeps the last ``window`` triples per tensor, and the window's variance is their exact
pooled combination

    N = sum n_s,  mean = sum n_s mean_s / N,  M2 = sum M2_s + sum n_s (mean_s - mean)^2,  var = M2 / (N - 1)

(in fp64); one fused in-place pass (``ff.scale_grads_``) applies the factors. No host synchronisation: a step
whose gradients hold a NaN or Inf (after ``inv_scale``, the AMP GradScaler's 1/scale) leaves the state and the
gradients untouched and sets ``found_inf``, like AMP's.

``mode="element"``: every gradient element gets its own importance, from an exponential moving mean m and
variance v of that element (``ff.grad_ema_protect_``: two fused passes, state 2 numbers per element). At a
tensor's t-th step, alpha = max(1/t, 1 - beta) with beta = 1 - 1/window by default:

    x = inv_scale * g,  d = x - m,  m <- m + alpha d,  v <- (1 - alpha)(v + alpha d^2)
    importance = sigmoid(z / T),  z = v  (normalize="none")  or  v / max(v over the tensor)  ("max")
    g <- (1 - importance) g  where importance > threshold

so for the first `window` steps m and v are the exact running mean and population variance of the element's
gradients, then an EMA with time constant ``window``.

Distributed: under DDP the gradients are already averaged and identical on every rank, and so is every protector.
Under FSDP2 (DTensor parameters) the ops run on the local gradient shards; mode "tensor" merges the ranks' per-shard
(count, mean, M2) rows (one all_gather of a (T, 3) tensor per step) and mode "element" takes the max of the
per-tensor variance maxima over the ranks (one all-reduce of T numbers per step), so both give the single-process
importances and scaled gradients. Mode "element"'s state is sharded like the parameters (DTensors).
"""

import math

import torch

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget._dtypes import accumulate_dtype
from fastforget.defences import Defence, FusedOperands, check_covers, parameter_rows
from fastforget.fisher import trainable_parameters
from fastforget.ops.grad_ema import run_grad_ema_protect
from fastforget.ops.grad_moments import _inv_scale_tensor, run_grad_moments
from fastforget.ops.scale_grads import run_scale_grads

NORMALIZE = ("none", "max")
MODES = ("tensor", "element")


def _importance(var, normalize, temperature):
    # a one-element gradient seen once has an undefined (NaN) variance, as torch.var gives: it is never scaled
    z = var / var.nan_to_num(0.0).max() if normalize == "max" else var
    return torch.sigmoid(z / temperature)


class SeedGradientProtector:
    """The seed's GradientProtector, literally (a list of past gradients per parameter, torch.var of their stack),
    with the window as a parameter: the oracle for tests and the baseline for benchmarks."""

    def __init__(self, model_or_params, importance_threshold=0.1, window=100):
        self.names, self.params = trainable_parameters(model_or_params)
        self.threshold, self.window = importance_threshold, window
        self.gradient_history = {}

    def protect_gradients(self):
        importances = {}
        for name, param in zip(self.names, self.params):
            if param.grad is not None:
                importance = self._compute_gradient_importance(name, param.grad)
                importances[name] = importance
                if importance > self.threshold:
                    param.grad *= 1 - importance
        return importances

    def _compute_gradient_importance(self, name, current_grad):
        history = self.gradient_history.setdefault(name, [])
        history.append(current_grad.clone())
        if len(history) > self.window:
            history.pop(0)
        return torch.sigmoid(torch.var(torch.stack(history)))


class GradientProtector(Defence):
    """Streaming gradient-variance protection over a model's trainable parameters (see the module doc).

    ``protect_()`` after ``backward()`` returns one importance per parameter, aligned with ``self.names``: the
    tensor's importance (mode "tensor") or the largest of its elements' (mode "element"); NaN for parameters
    without a gradient this step, and for every parameter on a skipped (non-finite) step in mode "element".

    As a ``ff.defences.Defence``: ``protect_gradients`` is ``protect_()``; ``fused_operands`` /
    ``after_fused_step`` run it inside ProtectedAdamW's step (its "protection" term).
    """

    name, step_timer, fused_terms = "protector", "protect", ("protection",)

    def __init__(
        self, model_or_params, window=100, threshold=0.1, mode="tensor", normalize="none", temperature=1.0,
        beta=None, backend="auto",
    ):  # fmt: skip
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZE}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.threshold = check.check_scalar("threshold", threshold)
        self.temperature = check.check_scalar("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.beta = 1 - 1 / window if beta is None else check.check_scalar("beta", beta)
        if mode == "tensor" and beta is not None:
            raise ValueError("beta belongs to mode='element' (mode 'tensor' keeps an exact window)")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.names, self.params = trainable_parameters(model_or_params)
        self.group = dist_util.check_parameters(self.names, self.params)  # None unless sharded (FSDP2)
        check.check_one_device("parameters", self.params)
        for i, p in enumerate(self.params):
            check.check_dtype("parameters", i, p, check.FLOAT_DTYPES)
        self.window, self.mode, self.normalize, self.backend = window, mode, normalize, backend
        device = self.params[0].device
        count = len(self.params)
        if mode == "tensor":
            check.check_allocation(f"a GradientProtector with window {window}", count * window * 3 * 8, device)
            self.ring = torch.zeros(count, window, 3, dtype=torch.float64, device=device)  # (n, mean, M2) per step
            self.head = torch.zeros(count, dtype=torch.int64, device=device)  # next slot of each tensor's ring
        else:
            state_dtype = accumulate_dtype(self.params)
            self.mean = [  # DTensors sharded like the parameters under FSDP2
                dist_util.like(
                    torch.zeros_like(dist_util.local(p), dtype=state_dtype, memory_format=torch.contiguous_format), p
                )
                for p in self.params
            ]
            self.var = [torch.zeros_like(m) for m in self.mean]
            self.steps = torch.zeros(count, dtype=torch.int64, device=device)  # finite steps seen by each tensor
        self.found_inf = torch.zeros((), dtype=torch.bool, device=device)

    def _state(self):
        if self.mode == "tensor":
            return {"ring": self.ring, "head": self.head}
        return {"mean": self.mean, "var": self.var, "steps": self.steps}

    def state_bytes(self):
        """Bytes of state on this rank."""
        tensors = [dist_util.local(t) for value in self._state().values() for t in check.tensor_list("state", value)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def protect_(self, inv_scale=1.0):
        """Update the statistics with this step's gradients and scale them in place; returns the importances."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        device = self.found_inf.device
        importance = torch.full((len(self.params),), math.nan, dtype=torch.float64, device=device)
        if not present:
            self.found_inf = torch.zeros_like(self.found_inf)
            return importance
        # torch keeps each .grad shaped, typed and placed like its parameter (checked once, at construction), so
        # the ops' per-call argument checks are skipped on this per-step path
        grads = [dist_util.local(self.params[i].grad) for i in present]
        rows = torch.tensor(present, device=device)
        inv_scale = _inv_scale_tensor(inv_scale, device)
        step = self._tensor_step if self.mode == "tensor" else self._element_step
        importance[rows] = step(grads, present, rows, inv_scale).to(torch.float64)
        return importance

    def _tensor_step(self, grads, present, rows, inv_scale):
        importance, factors = self.tensor_factors(grads, rows, inv_scale)
        run_scale_grads(grads, factors, self.backend)
        return importance

    def tensor_factors(self, grads, rows, inv_scale, skip=None):
        """Mode "tensor" without the scaling (``ff.optim.ProtectedAdamW`` applies the factors in its fused step):
        updates the ring with the moments of ``grads`` (those of the parameters ``rows``) and returns (importance,
        factors). A non-finite step, or a set ``skip`` (0-dim bool tensor), leaves the ring untouched."""
        moments = run_grad_moments(grads, inv_scale, self.backend).to(self.ring.device, torch.float64)
        moments = dist_util.merge_moments(moments, self.group)  # of the whole tensors, from their shards
        finite = moments.isfinite().all() if skip is None else moments.isfinite().all() & ~skip
        slots = self.head[rows]
        self.ring[rows, slots] = torch.where(finite, moments, self.ring[rows, slots])
        self.head[rows] = torch.where(finite, (slots + 1) % self.window, slots)
        self.found_inf = ~finite

        window = self.ring[rows]
        n, mean_s, m2_s = window.unbind(-1)
        total = n.sum(1)
        mean = (n * mean_s).sum(1) / total
        var = (m2_s.sum(1) + (n * (mean_s - mean[:, None]).square()).sum(1)) / (total - 1)
        importance = _importance(var, self.normalize, self.temperature)
        factors = torch.where(finite & (importance > self.threshold), 1 - importance, 1.0)
        return importance, factors

    def _element_step(self, grads, present, rows, inv_scale):
        steps = self.steps[rows]
        alpha = torch.maximum(1 / (steps + 1).to(self.mean[0].dtype), torch.tensor(1 - self.beta))
        mean, var = ([dist_util.local(state[i]) for i in present] for state in (self.mean, self.var))
        importance, self.found_inf = run_grad_ema_protect(
            grads, mean, var, inv_scale, alpha, self.threshold, self.normalize, self.temperature, self.backend,
            reduce_maxima=lambda maxima: dist_util.all_reduce_max(maxima, self.group),
        )  # fmt: skip
        self.steps[rows] = steps + (~self.found_inf).long()
        return importance

    # -------------------------------------------------------------------------------------- as a defence

    def protect_gradients(self, scale=1.0):
        """``protect_()`` on gradients that are `scale` x the true ones: the statistics are those of g / scale."""
        self.protect_(inv_scale=1.0 / scale)

    def check_fusable(self, members):
        if self.mode == "element" and self.normalize != "none":
            raise ValueError(
                "a mode 'element' protector with normalize='max' needs each tensor's max variance before any "
                "element is scaled; ProtectedAdamW fuses normalize='none' only"
            )
        check_covers(self.params, members, "protector")

    def fused_operands(self, params, grad_scale=None, found_inf=None):
        """ProtectedAdamW's operands for `params` (those of ``self.params`` with a gradient): mode "tensor"
        updates the ring with their moments (``tensor_factors``; not on a found_inf step) and hands the factors;
        mode "element" hands its mean and variance, to be updated in the fused pass, and each tensor's alpha."""
        positions = parameter_rows(self, params)
        rows = torch.tensor(positions, device=self.found_inf.device)
        if self.mode == "tensor":
            inv_scale = torch.ones((), device=params[0].device) if grad_scale is None else 1 / grad_scale
            skip = None if found_inf is None else found_inf != 0
            grads = [dist_util.local(p.grad) for p in params]  # under FSDP2 the moments merge across ranks
            _, factors = self.tensor_factors(grads, rows, inv_scale, skip)
            return FusedOperands(factors=factors.to(torch.float32), threshold=self.threshold)
        alpha = torch.maximum(1 / (self.steps[rows] + 1).to(self.mean[0].dtype), torch.tensor(1 - self.beta))
        return FusedOperands(
            ema_mean=[self.mean[i] for i in positions], ema_var=[self.var[i] for i in positions], alpha=alpha,
            var_scale=torch.full_like(alpha, 1 / self.temperature), threshold=self.threshold,
        )  # fmt: skip

    def after_fused_step(self, params, found_inf=None):
        """After the fused pass: mode "element" counts the step for `params` unless found_inf is set; either mode
        records found_inf."""
        skip = torch.zeros((), dtype=torch.bool, device=self.found_inf.device) if found_inf is None else found_inf != 0
        if self.mode == "element":
            rows = torch.tensor(parameter_rows(self, params), device=self.found_inf.device)
            self.steps[rows] = self.steps[rows] + (~skip).long()
        self.found_inf = skip.to(self.found_inf.device)

    def state_dict(self):
        state = {"names": list(self.names), "mode": self.mode, "window": self.window}
        return state | self._state()

    def load_state_dict(self, state):
        """Restore a state_dict, checked as a whole first (keys, names, mode, window, every tensor's type, shape
        and invariants: ring counts and M2 >= 0, heads in [0, window), finite means, variances >= 0, step counts
        >= 0); nothing changes on error."""
        check.check_state("GradientProtector", state, ("names", "window"))
        if list(state["names"]) != self.names:
            raise ValueError("the state was saved for other parameters (names differ)")
        if state.get("mode", "tensor") != self.mode:
            raise ValueError(f"the state is of mode {state.get('mode', 'tensor')!r} but this protector {self.mode!r}")
        if state["window"] != self.window:
            raise ValueError(f"the state has window {state['window']} but this protector {self.window}")
        check.check_state("GradientProtector", state, self._state())
        restored = {}
        for key, current in self._state().items():
            value = state[key]
            if isinstance(current, list):
                if not isinstance(value, (list, tuple)) or len(value) != len(current):
                    raise ValueError(
                        f"corrupt GradientProtector state: {key} has the wrong shapes (not a list of {len(current)} "
                        "tensors)"
                    )
                for name, v, c in zip(self.names, value, current):
                    _check_state_tensor(f"{key} of {name!r}", v, c.shape, floating=True)
                # full tensors or DTensors (as DCP loads them), sharded like the current state
                restored[key] = [dist_util.copy_like(v, c, c.dtype) for v, c in zip(value, current)]
            else:
                _check_state_tensor(key, value, current.shape, floating=current.is_floating_point())
                restored[key] = value.to(current.device, current.dtype, copy=True)
        _check_invariants(restored, self.window)
        for key, value in restored.items():
            setattr(self, key, value)


def _check_state_tensor(label, value, shape, floating):
    kind = "floating point" if floating else "integer"
    if not isinstance(value, torch.Tensor) or value.is_floating_point() != floating or value.is_complex():
        raise TypeError(f"corrupt GradientProtector state: {label} is not a {kind} tensor")
    if value.shape != shape:
        raise ValueError(
            f"corrupt GradientProtector state: {label} has the wrong shape {tuple(value.shape)}, not {tuple(shape)}"
        )


def _check_invariants(state, window):
    """What the protector's own steps guarantee; a state breaking them would poison every later step."""
    problems = []
    if "ring" in state:
        n, mean, m2 = state["ring"].unbind(-1)
        if not bool(state["ring"].isfinite().all()) or bool((n < 0).any()) or bool((m2 < 0).any()):
            problems.append("ring holds a non-finite value, a negative count or a negative M2")
        head = state["head"]
        if bool((head < 0).any()) or bool((head >= window).any()):
            problems.append(f"head holds a slot outside [0, {window})")
    if "steps" in state:
        if bool((state["steps"] < 0).any()):
            problems.append("steps holds a negative count")
        for key in ("mean", "var"):
            for i, t in enumerate(state[key]):
                local = dist_util.local(t)
                if not bool(local.isfinite().all()) or key == "var" and bool((local < 0).any()):
                    problems.append(f"{key}[{i}] holds a non-finite{' or negative' if key == 'var' else ''} value")
                    break
    if problems:
        raise ValueError(f"corrupt GradientProtector state: {problems[0]}")
