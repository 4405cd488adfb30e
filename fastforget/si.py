"""Synaptic Intelligence (Zenke, Poole & Ganguli 2017, "Continual Learning Through Synaptic Intelligence").

During a task, each parameter accumulates its path integral of the task loss (eq. 3, in discrete steps):

    omega <- omega - g_task * delta_theta        (g_task: the task loss's gradient, before any penalty term;
                                                  delta_theta: the step's update of the parameter)

``ff.optim.ProtectedAdamW(..., si=si)`` does this inside its fused step (no extra pass). At the end of a task,
``consolidate()`` turns it into the task's importance (eq. 5)

    Omega_task = max(0, omega / ((theta - theta_start)^2 + xi))

and resets omega <- 0 and theta_start <- theta. The surrogate loss c * sum Omega (theta - theta*)^2 (eq. 4, with
Omega summed over tasks and theta* the parameters at the last consolidation) is exactly ``ff.EWC`` in its online
mode with lam = c and the Fisher replaced by Omega: ``consolidate(ewc)`` adds the task to an EWC with
``ewc.load_importance`` -- a consolidation without a Fisher pass and without replay data. A negative path
integral (the loss rose along the path: noise) is clipped to 0, so the penalty stays a sum of quadratics >= 0.

State: omega and theta_start, one fp32 tensor each per parameter (fp64 for fp64 parameters).
"""

import torch

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget._dtypes import accumulate_dtype
from fastforget.defences import Defence, FusedOperands, parameter_rows
from fastforget.fisher import trainable_parameters


class SynapticIntelligence(Defence):
    """Synaptic Intelligence over a model's trainable parameters (see the module doc).

    ``ewc``: an ``ff.EWC`` over the same parameters that ``end_task`` adds each task's importance to (its surrogate
    loss); None: ``end_task`` only resets the path integral. As a ``ff.defences.Defence`` it runs inside
    ``ff.optim.ProtectedAdamW``'s step only (its "path_integral" term: the update is needed).
    """

    name, task_timer, fused_terms, fused_only = "si", "si", ("path_integral",), True

    def __init__(self, model, xi=1e-3, *, ewc=None):
        self.names, self.params = trainable_parameters(model)
        self.xi = check.check_real("xi", xi, above=0.0)
        if ewc is not None and list(ewc.names) != self.names:
            raise ValueError("ewc protects other parameters than this SynapticIntelligence (names differ)")
        self.ewc = ewc
        check.check_one_device("parameters", self.params)
        for i, p in enumerate(self.params):
            check.check_dtype("parameters", i, p, check.FLOAT_DTYPES)
        self.omega = [  # sharded like the parameters under FSDP2 (DTensors), as theta_start is
            dist_util.like(torch.zeros(dist_util.local(p).shape, dtype=accumulate_dtype([p]), device=p.device), p)
            for p in self.params
        ]
        self.theta_start = [p.detach().to(accumulate_dtype([p]), copy=True) for p in self.params]

    def __repr__(self):
        return f"SynapticIntelligence(xi={self.xi}, tensors={len(self.params)})"

    def importance(self):
        """This task's importance so far, max(0, omega / ((theta - theta_start)^2 + xi)), one tensor per parameter."""
        with torch.no_grad():
            return [
                (w / ((p.to(w.dtype) - s).square() + self.xi)).clamp_min(0)
                for w, p, s in zip(self.omega, self.params, self.theta_start)
            ]

    @torch.no_grad()
    def consolidate(self, ewc=None):
        """End of a task: returns its importance (and adds it to `ewc`, an ``ff.EWC`` over the same parameters,
        anchored at the current parameters); resets omega and theta_start."""
        importance = self.importance()
        if ewc is not None:
            if list(ewc.names) != self.names:
                raise ValueError("the EWC protects other parameters than this SynapticIntelligence (names differ)")
            ewc.load_importance([p.detach() for p in self.params], importance)
        for w, p, s in zip(self.omega, self.params, self.theta_start):
            w.zero_()
            s.copy_(p)
        return importance

    def fused_operands(self, params, grad_scale=None, found_inf=None):
        """ProtectedAdamW's operands for `params`: their omega, accumulated in the fused pass."""
        return FusedOperands(omega=[self.omega[i] for i in parameter_rows(self, params)])

    def end_task(self, task):
        """``consolidate(self.ewc)``: the task's importance goes to the EWC (no data needed)."""
        self.consolidate(self.ewc)

    def state_dict(self):
        """Tensors and plain values only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "names": list(self.names),
            "xi": self.xi,
            "omega": list(self.omega),
            "theta_start": list(self.theta_start),
        }

    def load_state_dict(self, state):
        """Restore a state_dict bitwise (checked first: keys, names, shapes; nothing changes on error)."""
        check.check_state("SynapticIntelligence", state, ("names", "xi", "omega", "theta_start"))
        if list(state["names"]) != self.names:
            raise ValueError("the state was saved for other parameters (names differ)")
        for key in ("omega", "theta_start"):
            value = state[key]
            if len(value) != len(self.params):
                raise ValueError(f"corrupt SynapticIntelligence state: {key} has {len(value)} tensors")
            for name, t, p in zip(self.names, value, self.params):
                if not isinstance(t, torch.Tensor) or t.shape != p.shape or not t.is_floating_point():
                    raise ValueError(f"corrupt SynapticIntelligence state: {key} of {name!r} is not shaped like it")
                if not bool(t.isfinite().all()):
                    raise ValueError(f"corrupt SynapticIntelligence state: {key} of {name!r} is not finite")
        xi = check.check_real("xi", state["xi"], above=0.0)
        # full tensors or DTensors (as DCP loads them): on each tensor's device, sharded like it
        self.omega = [dist_util.copy_like(t, w, w.dtype) for t, w in zip(state["omega"], self.omega)]
        self.theta_start = [dist_util.copy_like(t, s, s.dtype) for t, s in zip(state["theta_start"], self.theta_start)]
        self.xi = xi
