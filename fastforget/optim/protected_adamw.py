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

MoFO (Chen et al., TMLR 2025): a param group with ``mofo_fraction`` set updates, in each of its tensors with at
least ``mofo_min_ndim`` dimensions (default 2: weight matrices; biases and norm weights update fully, as the
authors' ``AdamW_MoFO``), only the elements whose |exp_avg| is among the tensor's top ``int(numel * fraction)``;
the moments, the decay and the defences apply to every element (see ``fastforget.ops.mofo``). Such tensors take
two passes: the fused step with lr 0 (moments, defences, steps), the exact threshold by a radix select, then the
masked update with SI's path integral.

The attached parts are ``ff.defences.Defence`` objects: each step asks every one for its operands
(``fused_operands``, over all params with a gradient), runs the fused pass per param group on them, then calls
``after_fused_step``; ``defences=[...]`` attaches more (e.g. your own, see docs/defences.md).

Under FSDP2 (DTensor parameters sharded over a 1-D mesh, see ``fastforget.distributed``) the fused pass runs on
the local shards (``to_local()``); the per-tensor reductions cross ranks: mode "tensor" protection's gradient
moments are merged exactly (the protector's Chan et al. merge), the EWC penalty is summed. ``exp_avg`` and
``exp_avg_sq`` are DTensors sharded like their parameters (``step`` a plain scalar, as in ``torch.optim.AdamW``),
created at construction: ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` then save and load them as they are, instead of initialising a fresh optimizer with
a zero-gradient step that would reach the attached defences.
"""

import torch
import torch.distributed as dist

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget._dtypes import accumulate_dtype
from fastforget.defences import FUSED_TERMS, Defence, FusedOperands
from fastforget.ops.mofo import mofo_thresholds, mofo_update
from fastforget.ops.protected_adamw_step import _hyperparameters, run_protected_adamw_step

_REJECTED = {
    "amsgrad": "amsgrad is not supported (the fused step keeps no max of exp_avg_sq)",
    "capturable": "capturable is not supported (bias corrections are computed on the host on the CPU backend)",
    "differentiable": "differentiable is not supported (the fused step is not differentiable)",
}


class ProtectedAdamW(torch.optim.Optimizer):
    """AdamW with optional ``ewc`` (``ff.EWC``), ``protector`` (``ff.GradientProtector``, mode "tensor" or
    "element" with normalize "none") and ``si`` (``ff.SynapticIntelligence``), applied in its fused step.

    ``defences``: more ``ff.defences.Defence`` objects (after those three), each handing the step its operands
    through ``fused_operands`` (see ``ff.defences.FusedOperands``); one defence per fused term ("quadratic",
    "protection", "path_integral"). A defence without fused operands (empty ``fused_terms``: replay, the KL
    anchor) is refused: it belongs to the trainer. ``self.defences`` lists them all.

    Parameters are plain tensors, or all DTensors sharded over one 1-D mesh (FSDP2's ``fully_shard``; the
    attached parts over the same sharded parameters).

    Every optimizer parameter must be covered by each attached part (checked here). ``foreach`` and ``fused``
    are accepted for compatibility and ignored: the step is always the fused multi-tensor op. ``amsgrad``,
    ``capturable`` and ``differentiable`` raise ``ValueError``. ``backend``: the op's backend (see ff.dispatch).

    ``mofo_fraction`` (per group; None: off): MoFO's fraction in (0, 1] (the paper recommends 0.05-0.2) of each
    filtered tensor's elements that take the Adam update, by |exp_avg|; ``mofo_min_ndim`` (per group, default 2):
    the tensors with at least that many dimensions are filtered (1: every tensor but scalars; 0: every tensor).
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale / found_inf to step() (torch's fused AdamW)

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False,
        foreach=None, capturable=False, differentiable=False, fused=None, ewc=None, protector=None, si=None,
        defences=None, backend="auto", mofo_fraction=None, mofo_min_ndim=2,
    ):  # fmt: skip
        if isinstance(lr, torch.Tensor):
            raise TypeError("lr must be a Python float (a tensor lr belongs to capturable, which is not supported)")
        _hyperparameters(lr, betas, eps, weight_decay, 0.0, 0.0)
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            decoupled_weight_decay=True, mofo_fraction=mofo_fraction, mofo_min_ndim=mofo_min_ndim,
        )  # fmt: skip
        self._check_group(defaults)
        super().__init__(params, defaults)
        members = [(g, p) for g, group in enumerate(self.param_groups) for p in group["params"]]
        names = [
            f"param_groups[{g}][{i}]" for g, group in enumerate(self.param_groups) for i in range(len(group["params"]))
        ]
        self.process_group = dist_util.check_parameters(names, [p for _, p in members])  # FSDP2 only
        self.defences = _check_defences([ewc, protector, si], defences, members)
        self.backend = backend
        device = dist_util.local(members[0][1]).device if members else None
        self.penalty = torch.zeros((), device=device)
        if self.process_group is not None:  # see the module doc: DCP must find the state, not make it with a step
            for _, p in members:
                self._state_of(p)

    @staticmethod
    def _check_group(group):
        for key, why in _REJECTED.items():
            if group.get(key):
                raise ValueError(f"ProtectedAdamW: {why}")
        if isinstance(group["lr"], torch.Tensor):
            raise TypeError("lr must be a Python float (a tensor lr belongs to capturable, which is not supported)")
        # every step re-checks: a scheduler, a loaded state or a hand edit may have set lr = nan, betas = (1, .)
        _hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], 0.0, 0.0)
        if group.get("mofo_fraction") is not None:
            check.check_probability("mofo_fraction", group["mofo_fraction"], zero=False)
            check.check_int("mofo_min_ndim", group.get("mofo_min_ndim", 2), minimum=0)
            if not group["eps"] > 0:  # the lr-0 first pass computes 0 * m / (sqrt(v) + eps): NaN at m = v = eps = 0
                raise ValueError(f"mofo_fraction needs eps > 0, got eps={group['eps']}")

    @property
    def ewc(self):
        return self._named("ewc")

    @property
    def protector(self):
        return self._named("protector")

    @property
    def si(self):
        return self._named("si")

    def _named(self, name):
        return next((d for d in getattr(self, "defences", ()) if d.name == name), None)

    def add_param_group(self, param_group):
        if getattr(self, "defences", None) or getattr(self, "process_group", None) is not None:
            raise ValueError(
                "with ewc/protector/si attached or sharded (FSDP2) parameters, pass every param group to __init__"
                " (checked there)"
            )
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    # ----------------------------------------------------------------------------------------------- state

    def _state_of(self, p):
        state = self.state[p]
        if not state:
            acc, shard = accumulate_dtype([p]), dist_util.local(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=shard.device)
            for key in ("exp_avg", "exp_avg_sq"):  # sharded like p under FSDP2
                state[key] = dist_util.like(torch.zeros(shard.shape, dtype=acc, device=shard.device), p)
        return state

    def load_state_dict(self, state_dict):
        """Loads a state dict of this class or of ``torch.optim.AdamW``; the moments keep their saved precision
        (fp32 for 16-bit params, where torch would cast them to the param dtype), the step moves to the param.
        Under FSDP2 the moments may be full tensors or DTensors (as DCP loads them): they are sharded like their
        parameters. The whole state dict is checked first (groups, hyperparameters, every state entry's keys, shapes
        and values); a rejected one changes nothing."""
        self._check_state_dict(state_dict)
        mofo = [{k: group[k] for k in _MOFO_KEYS} for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, before in zip(self.param_groups, mofo):  # a torch.optim.AdamW state dict has no MoFO keys
            for key, value in before.items():
                group.setdefault(key, value)
        saved = state_dict["state"]
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for i, p in zip(ids, params):
            if i in saved:
                state = self.state[p]
                acc = accumulate_dtype([p])
                device = dist_util.local(p).device
                for key in ("exp_avg", "exp_avg_sq"):
                    moment = dist_util.local(dist_util.copy_like(saved[i][key], p, acc))
                    state[key] = dist_util.like(moment.contiguous(), p)
                step = dist_util.local(torch.as_tensor(saved[i]["step"], dtype=torch.float32))
                state["step"] = step.to(device, copy=True)
        for group in self.param_groups:
            self._check_group(group)

    def _check_state_dict(self, state_dict):
        check.check_state("ProtectedAdamW", state_dict, ("state", "param_groups"))
        saved_groups, saved = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(saved_groups)} param groups but this optimizer {len(self.param_groups)}"
            )
        for g, (mine, theirs) in enumerate(zip(self.param_groups, saved_groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(
                    f"param group {g} of the state has {len(theirs.get('params', ()))} params but this optimizer's "
                    f"{len(mine['params'])}"
                )
            group = {**{k: mine[k] for k in _MOFO_KEYS}, **theirs}
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in group]
            if missing:
                raise ValueError(f"param group {g} of the state lacks {missing}: not an AdamW state")
            try:
                self._check_group(group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param group {g} of the state: {error}") from None
            for i, p in zip(theirs["params"], mine["params"]):
                if i not in saved:
                    continue
                entry = saved[i]
                if not isinstance(entry, dict) or not {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
                    keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                    raise ValueError(f"state of param {i} has {keys}, not AdamW's step, exp_avg and exp_avg_sq")
                for key in ("exp_avg", "exp_avg_sq"):
                    t = entry[key]
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                        raise TypeError(f"{key} of param {i} in the state is not a floating point tensor")
                    if t.shape != p.shape:
                        raise ValueError(
                            f"{key} of param {i} in the state has shape {tuple(t.shape)} but the param "
                            f"{tuple(p.shape)}: the state is another model's"
                        )
                    local = dist_util.local(t)
                    if not bool(local.isfinite().all()) or key == "exp_avg_sq" and bool((local < 0).any()):
                        raise ValueError(
                            f"{key} of param {i} in the state is not finite{' and >= 0' * (key == 'exp_avg_sq')}"
                        )
                step = torch.as_tensor(entry["step"])
                if step.numel() != 1 or not bool(step.isfinite().all()) or float(step) < 0:
                    raise ValueError(f"step of param {i} in the state must be one finite number >= 0")

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
        device = dist_util.local(present[0]).device
        if found_inf is not None:
            found_inf = found_inf.to(device, torch.float32).reshape(())
        if grad_scale is not None:
            grad_scale = grad_scale.to(device, torch.float32).reshape(())
        operands = FusedOperands.combine(
            (d, d.fused_operands(present, grad_scale, found_inf)) for d in self.defences
        )  # fmt: skip
        position = {id(p): i for i, p in enumerate(present)}
        penalty = torch.zeros((), device=device)
        for group, params in groups:
            if params:
                picked = operands.pick([position[id(p)] for p in params])
                penalty = penalty + self._group_step(group, params, picked, grad_scale, found_inf)
        for d in self.defences:
            d.after_fused_step(present, found_inf)
        if self.process_group is not None and operands.anchors:  # each rank's penalty is over its shards
            dist.all_reduce(penalty, group=self.process_group)
        if operands.penalty_offset is not None:
            penalty = penalty + operands.penalty_offset
        self.penalty = penalty
        return loss

    def _group_step(self, group, params, operands, grad_scale, found_inf):
        """The fused pass over one group, on the local shards under FSDP2 (the elementwise work needs nothing
        else; the per-tensor factors and alphas are global already); with MoFO, the filtered tensors' two passes
        around the select (see the module doc). Returns this rank's share of the penalty."""
        states = [self._state_of(p) for p in params]

        def shards(tensors):
            return [dist_util.local(t) for t in tensors]

        beta1, beta2 = group["betas"]
        lr, eps, weight_decay, maximize = float(group["lr"]), group["eps"], group["weight_decay"], group["maximize"]
        maximize = bool(maximize)

        def fused(positions, lr, with_si):
            p, s, o = [params[i] for i in positions], [states[i] for i in positions], operands.pick(positions)
            return run_protected_adamw_step(
                shards(p), shards(q.grad for q in p), shards(x["exp_avg"] for x in s),
                shards(x["exp_avg_sq"] for x in s), [x["step"] for x in s], shards(o.anchors), shards(o.fisher),
                o.factors, shards(o.ema_mean), shards(o.ema_var), o.alpha, o.var_scale,
                shards(o.omega) if with_si else [], grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay, o.lam,
                o.threshold, maximize, backend=self.backend,
            )  # fmt: skip

        fraction = group.get("mofo_fraction")
        every = list(range(len(params)))
        filtered = [] if fraction is None else [i for i in every if params[i].dim() >= group.get("mofo_min_ndim", 2)]
        if not filtered:
            return fused(every, lr, True)
        chosen = set(filtered)
        full = [i for i in every if i not in chosen]
        penalty = fused(full, lr, True) if full else 0.0
        penalty = penalty + fused(filtered, 0.0, False)  # moments, defences and steps; theta unchanged
        p, s = [params[i] for i in filtered], [states[i] for i in filtered]
        exp_avg = shards(x["exp_avg"] for x in s)
        ks = torch.tensor([int(q.numel() * fraction) for q in p], device=exp_avg[0].device)  # global numel
        thresholds = mofo_thresholds(exp_avg, ks, backend=self.backend, process_group=self.process_group)
        omega = shards(operands.pick(filtered).omega)
        mofo_update(
            shards(p), exp_avg, shards(x["exp_avg_sq"] for x in s), [x["step"] for x in s], thresholds,
            shards(q.grad for q in p) if omega else [], omega, grad_scale, found_inf, lr, beta1, beta2, eps,
            weight_decay, maximize, backend=self.backend,
        )  # fmt: skip
        return penalty


_MOFO_KEYS = ("mofo_fraction", "mofo_min_ndim")


def _check_defences(parts, defences, members):
    """The attached defences (the ewc/protector/si arguments, then `defences`), each checked to run in the fused
    step over the optimizer's (group, param) `members`, one per fused term."""
    attached = [d for d in parts if d is not None] + ([] if defences is None else list(defences))
    filled = {}
    for i, d in enumerate(attached):
        if not isinstance(d, Defence):
            raise TypeError(f"defence {i} is a {type(d).__name__}, not a ff.defences.Defence")
        d.check_fusable(members)
        for term in d.fused_terms:
            if term not in FUSED_TERMS:
                raise ValueError(f"{type(d).__name__} declares fused term {term!r}; the step has {tuple(FUSED_TERMS)}")
            if term in filled:
                raise ValueError(
                    f"{type(filled[term]).__name__} and {type(d).__name__} both fill the fused step's {term!r} term;"
                    " it takes one defence per term"
                )
            filled[term] = d
    return attached
