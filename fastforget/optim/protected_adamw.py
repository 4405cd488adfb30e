"""``ProtectedAdamW``: torch.optim.AdamW whose step also applies EWC, gradient protection and Synaptic
Intelligence's path integral, in one fused pass over memory per param group (``ff.protected_adamw_step``).

With nothing attached it is AdamW (decoupled weight decay, bias correction; ``torch.optim.AdamW``'s
hyperparameters, param groups and state layout ``step``, ``exp_avg``, ``exp_avg_sq``, so state dicts load both
ways). Attached, per element, in ``ProtectedTrainer``'s order:

    g' = protect(g + 2 lam F (theta - theta*))   then AdamW on g';   SI: omega -= g * delta_theta

The step's EWC penalty (with the separate mode's constant) is kept in ``self.penalty`` (a 0-dim tensor, read
without a host synchronisation). Under a ``torch.amp.GradScaler`` the scaler's ``grad_scale``/``found_inf`` reach
the fused step (like torch's fused AdamW): a step with an inf/NaN gradient leaves parameters, moments, protector
and SI state bitwise unchanged, with no host synchronisation. ``p.grad`` is never modified.
"""

import torch

from fastforget._dtypes import accumulate_dtype
from fastforget.ops.protected_adamw_step import _hyperparameters, run_protected_adamw_step

_REJECTED = {
    "amsgrad": "amsgrad is not supported (the fused step keeps no max of exp_avg_sq)",
    "capturable": "capturable is not supported (bias corrections are computed on the host on the CPU backend)",
    "differentiable": "differentiable is not supported (the fused step is not differentiable)",
}


def _index(owner, label, params):
    """Position of each optimizer param in `owner.params`; raises naming a param that `owner` does not cover."""
    where = {id(p): i for i, p in enumerate(owner.params)}
    for group, p in params:
        if id(p) not in where:
            raise ValueError(
                f"param group {group} holds a parameter of shape {tuple(p.shape)} that the {label} does not cover;"
                f" build the {label} over the same parameters as the optimizer"
            )
    return where


class ProtectedAdamW(torch.optim.Optimizer):
    """AdamW with optional ``ewc`` (``ff.EWC``), ``protector`` (``ff.GradientProtector``, mode "tensor" or
    "element" with normalize "none") and ``si`` (``ff.SynapticIntelligence``), applied in its fused step.

    Every optimizer parameter must be covered by each attached part (checked here). ``foreach`` and ``fused``
    are accepted for compatibility and ignored: the step is always the fused multi-tensor op. ``amsgrad``,
    ``capturable`` and ``differentiable`` raise ``ValueError``. ``backend``: the op's backend (see ff.dispatch).
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale / found_inf to step() (torch's fused AdamW)

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False,
        foreach=None, capturable=False, differentiable=False, fused=None, ewc=None, protector=None, si=None,
        backend="auto",
    ):  # fmt: skip
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float (a tensor lr belongs to capturable, which is not supported)")
        _hyperparameters(lr, betas, eps, weight_decay, 0.0, 0.0)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True,
        )  # fmt: skip
        self._check_group(defaults)
        super().__init__(params, defaults)
        if protector is not None and protector.mode == "element" and protector.normalize != "none":
            raise ValueError(
                "a mode 'element' protector with normalize='max' needs each tensor's max variance before any "
                "element is scaled; ProtectedAdamW fuses normalize='none' only"
            )
        members = [(g, p) for g, group in enumerate(self.param_groups) for p in group["params"]]
        for g, p in members:
            if type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor":
                raise ValueError(f"param group {g} holds a DTensor (FSDP2); ProtectedAdamW runs on plain tensors")
        self.ewc, self.protector, self.si, self.backend = ewc, protector, si, backend
        self._ewc_index = _index(ewc, "EWC", members) if ewc is not None else None
        self._protector_index = _index(protector, "protector", members) if protector is not None else None
        self._si_index = _index(si, "SynapticIntelligence", members) if si is not None else None
        device = members[0][1].device if members else None
        self.penalty = torch.zeros((), device=device)

    @staticmethod
    def _check_group(group):
        for key, why in _REJECTED.items():
            if group.get(key):
                raise ValueError(f"ProtectedAdamW: {why}")
        if isinstance(group["lr"], torch.Tensor):
            raise TypeError("lr must be a Python float (a tensor lr belongs to capturable, which is not supported)")

    def add_param_group(self, param_group):
        if any(getattr(self, part, None) is not None for part in ("ewc", "protector", "si")):
            raise ValueError("with ewc/protector/si attached, pass every param group to __init__ (checked there)")
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # ----------------------------------------------------------------------------------------------- state

    def _state_of(self, p):
        state = self.state[p]
        if not state:
            acc = accumulate_dtype([p])
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros(p.shape, dtype=acc, device=p.device)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=acc, device=p.device)
        return state

    def load_state_dict(self, state_dict):
        """Loads a state dict of this class or of ``torch.optim.AdamW``; the moments keep their saved precision
        (fp32 for 16-bit params, where torch would cast them to the param dtype), the step moves to the param."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                state = self.state[p]
                acc = accumulate_dtype([p])
                for key in ("exp_avg", "exp_avg_sq"):
                    state[key] = saved[i][key].to(p.device, acc, copy=True).contiguous()
                state["step"] = torch.as_tensor(saved[i]["step"], dtype=torch.float32).to(p.device, copy=True)
        for group in self.param_groups:
            self._check_group(group)

    # ------------------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        """One fused step per param group; returns the closure's loss (the EWC penalty is in ``self.penalty``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        groups = []
        for group in self.param_groups:
            self._check_group(group)
            params = [p for p in group["params"] if p.grad is not None]
            for i, p in enumerate(params):
                if p.grad.is_sparse:
                    raise ValueError(f"ProtectedAdamW does not support sparse gradients (param {i} of a group)")
            groups.append((group, params))
        present = [p for _, params in groups for p in params]
        if not present:
            return loss
        device = present[0].device
        if found_inf is not None:
            found_inf = found_inf.to(device, torch.float32).reshape(())
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, torch.float32).reshape(())
        protection = self._protection(present, grad_scale, found_inf)
        penalty = torch.zeros((), device=device)
        for group, params in groups:
            if params:
                penalty = penalty + self._group_step(group, params, protection, grad_scale, found_inf)
        self._after_protection(present, found_inf)
        if self.ewc is not None and self.ewc.tasks:
            penalty = penalty + self.ewc._offset()
        self.penalty = penalty
        return loss

    def _protection(self, present, grad_scale, found_inf):
        """Per present param (by id): its factor (mode "tensor", from one grad_moments pass) or its (alpha,
        var_scale) (mode "element"); None without a protector."""
        pr = self.protector
        if pr is None:
            return None
        row_tensor = torch.tensor([self._protector_index[id(p)] for p in present], device=pr.found_inf.device)
        if pr.mode == "tensor":
            inv_scale = torch.ones((), device=present[0].device) if grad_scale is None else 1 / grad_scale
            skip = None if found_inf is None else found_inf != 0
            _, factors = pr.tensor_factors([p.grad for p in present], row_tensor, inv_scale, skip)
            self._rows = row_tensor
            return {id(p): k for k, p in enumerate(present)}, factors.to(torch.float32)
        steps = pr.steps[row_tensor]
        alpha = torch.maximum(1 / (steps + 1).to(pr.mean[0].dtype), torch.tensor(1 - pr.beta))
        self._rows = row_tensor
        return {id(p): k for k, p in enumerate(present)}, alpha

    def _after_protection(self, present, found_inf):
        pr = self.protector
        if pr is None:
            return
        skip = torch.zeros((), dtype=torch.bool, device=pr.found_inf.device) if found_inf is None else found_inf != 0
        if pr.mode == "element":
            pr.steps[self._rows] = pr.steps[self._rows] + (~skip).long()
        pr.found_inf = skip.to(pr.found_inf.device)

    def _group_step(self, group, params, protection, grad_scale, found_inf):
        states = [self._state_of(p) for p in params]
        ewc, pr, si = self.ewc, self.protector, self.si
        anchors, fisher, lam = [], [], 0.0
        if ewc is not None and ewc.tasks:
            rows = [self._ewc_index[id(p)] for p in params]
            anchors, fisher, lam = [ewc.anchors[i] for i in rows], [ewc.fisher[i] for i in rows], ewc.lam
        factors = alpha = var_scale = None
        ema_mean, ema_var = [], []
        threshold = 0.0
        if pr is not None:
            where, values = protection
            picked = values[torch.tensor([where[id(p)] for p in params], device=values.device)]
            threshold = pr.threshold
            if pr.mode == "tensor":
                factors = picked
            else:
                rows = [self._protector_index[id(p)] for p in params]
                ema_mean, ema_var = [pr.mean[i] for i in rows], [pr.var[i] for i in rows]
                alpha, var_scale = picked, torch.full_like(picked, 1 / pr.temperature)
        omega = [si.omega[self._si_index[id(p)]] for p in params] if si is not None else []
        beta1, beta2 = group["betas"]
        return run_protected_adamw_step(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], anchors, fisher, factors, ema_mean, ema_var, alpha, var_scale, omega,
            grad_scale, found_inf, float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], lam,
            threshold, bool(group["maximize"]), backend=self.backend,
        )  # fmt: skip
