"""Gradient protection: shrink the gradients of parameters whose recent gradients vary a lot.

The seed's rule, for each parameter with a gradient (one whose ``.grad`` is None is skipped and its history does
not advance): append the gradient to its history (the last ``window`` steps), compute

    importance = sigmoid(z),   z = var(all elements of all gradients in the window) (unbiased, N - 1)

and, if importance > threshold, ``grad *= 1 - importance``. With ``normalize="none"`` (the seed), z >= 0 so
importance >= 0.5: every protected gradient is at least halved. ``normalize="max"`` divides each tensor's variance
by the largest (defined) variance among this step's tensors (as UPGD scales its utilities by their maximum), so
z = var / max var in [0, 1]; ``temperature`` T divides z in both: importance = sigmoid(z / T).

``GradientProtector`` computes exactly the seed's variance with O(window) numbers per tensor instead of the
window's gradients: per step, one fused pass (``ff.grad_moments``) gives each gradient's (count, mean, M2), a ring
keeps the last ``window`` triples per tensor, and the window's variance is their exact pooled combination

    N = sum n_s,  mean = sum n_s mean_s / N,  M2 = sum M2_s + sum n_s (mean_s - mean)^2,  var = M2 / (N - 1)

(in fp64); one fused in-place pass (``ff.scale_grads_``) applies the factors. No host synchronisation: a step
whose gradients hold a NaN or Inf (after ``inv_scale``, the AMP GradScaler's 1/scale) leaves the state and the
gradients untouched and sets ``found_inf``, like AMP's.
"""

import math

import torch

from fastforget import _validation as check
from fastforget.fisher import trainable_parameters
from fastforget.ops.grad_moments import _inv_scale_tensor, run_grad_moments
from fastforget.ops.scale_grads import run_scale_grads

NORMALIZE = ("none", "max")


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


class GradientProtector:
    """Streaming, exact gradient-variance protection over a model's trainable parameters (see the module doc).

    ``protect_()`` after ``backward()`` returns the importance of each parameter (NaN for those without a gradient
    this step), aligned with ``self.names``.
    """

    def __init__(
        self, model_or_params, window=100, threshold=0.1, mode="tensor", normalize="none", temperature=1.0,
        backend="auto",
    ):  # fmt: skip
        if mode != "tensor":
            raise ValueError(f"mode {mode!r} is not available; the supported mode is 'tensor'")
        if normalize not in NORMALIZE:
            raise ValueError(f"unknown normalize {normalize!r}; expected one of {NORMALIZE}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        self.threshold = check.check_scalar("threshold", threshold)
        self.temperature = check.check_scalar("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.names, self.params = trainable_parameters(model_or_params)
        check.check_one_device("parameters", self.params)
        for i, p in enumerate(self.params):
            check.check_dtype("parameters", i, p, check.FLOAT_DTYPES)
        self.window, self.mode, self.normalize, self.backend = window, mode, normalize, backend
        device = self.params[0].device
        count = len(self.params)
        self.ring = torch.zeros(count, window, 3, dtype=torch.float64, device=device)  # (n, mean, M2) per step
        self.head = torch.zeros(count, dtype=torch.int64, device=device)  # next slot of each tensor's ring
        self.found_inf = torch.zeros((), dtype=torch.bool, device=device)

    def state_bytes(self):
        return sum(t.numel() * t.element_size() for t in (self.ring, self.head))

    @torch.no_grad()
    def protect_(self, inv_scale=1.0):
        """Update the statistics with this step's gradients and scale them in place; returns the importances."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        importance = torch.full((len(self.params),), math.nan, dtype=torch.float64, device=self.ring.device)
        if not present:
            self.found_inf = torch.zeros_like(self.found_inf)
            return importance
        # torch keeps each .grad shaped, typed and placed like its parameter (checked once, at construction), so
        # the ops' per-call argument checks are skipped on this per-step path
        grads = [self.params[i].grad for i in present]
        inv_scale = _inv_scale_tensor(inv_scale, self.ring.device)
        moments = run_grad_moments(grads, inv_scale, self.backend).to(self.ring.device, torch.float64)
        finite = moments.isfinite().all()
        rows = torch.tensor(present, device=self.ring.device)
        slots = self.head[rows]
        self.ring[rows, slots] = torch.where(finite, moments, self.ring[rows, slots])
        self.head[rows] = torch.where(finite, (slots + 1) % self.window, slots)
        self.found_inf = ~finite

        window = self.ring[rows]
        n, mean_s, m2_s = window.unbind(-1)
        total = n.sum(1)
        mean = (n * mean_s).sum(1) / total
        var = (m2_s.sum(1) + (n * (mean_s - mean[:, None]).square()).sum(1)) / (total - 1)
        step_importance = _importance(var, self.normalize, self.temperature)
        factors = torch.where(finite & (step_importance > self.threshold), 1 - step_importance, 1.0)
        run_scale_grads(grads, factors, self.backend)
        importance[rows] = step_importance
        return importance

    def state_dict(self):
        return {"names": list(self.names), "window": self.window, "ring": self.ring, "head": self.head}

    def load_state_dict(self, state):
        """Restore a state_dict (checked first: names, window, shapes; nothing changes on error)."""
        if list(state["names"]) != self.names:
            raise ValueError("the state was saved for other parameters (names differ)")
        if state["window"] != self.window:
            raise ValueError(f"the state has window {state['window']} but this protector {self.window}")
        ring, head = state["ring"], state["head"]
        if tuple(ring.shape) != tuple(self.ring.shape) or tuple(head.shape) != tuple(self.head.shape):
            raise ValueError("corrupt GradientProtector state: ring or head has the wrong shape")
        self.ring = ring.to(self.ring.device, torch.float64, copy=True)
        self.head = head.to(self.head.device, torch.int64, copy=True)
