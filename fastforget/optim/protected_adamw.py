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

``state_bits=8`` stores both moments as bitsandbytes' ``AdamW8bit`` does (Dettmers et al. 2022, "8-bit Optimizers
via Block-wise Quantization"): per tensor of at least ``min_8bit_size`` elements (bitsandbytes' rule and default,
4096), uint8 codes on the signed (``exp_avg``) and unsigned (``exp_avg_sq``) dynamic maps with one fp32 absmax per
block of 256 elements, dequantized and requantized inside the fused step (``ff.protected_adamw8bit_step``); smaller
tensors keep fp32 moments (one fused call of each kind per group). The state layout is bitsandbytes' (per param
``step``, ``state1``, ``state2``, and for 8-bit tensors ``qmap1``, ``qmap2``, ``absmax1``, ``absmax2``), so state
dicts load both ways with ``bnb.optim.AdamW8bit``. An ``ff.EWC(fisher_bits=8)`` hands the step its Fisher codes,
dequantized in the same pass. MoFO's filtered tensors take a threshold and masked update on their moments
dequantized one tensor at a time (correct, not fused).

Under FSDP2 (DTensor parameters sharded over a 1-D mesh, see ``fastforget.distributed``) the fused pass runs on
the local shards (``to_local()``); the per-tensor reductions cross ranks: mode "tensor" protection's gradient
moments are merged exactly (the protector's Chan et al. merge), the EWC penalty is summed. ``exp_avg`` and
``exp_avg_sq`` are DTensors sharded like their parameters (``step`` a plain scalar, as in ``torch.optim.AdamW``),
created at construction: ``torch.distributed.checkpoint``'s ``get_optimizer_state_dict`` /
``set_optimizer_state_dict`` then save and load them as they are, instead of initialising a fresh optimizer with
a zero-gradient step that would reach the attached defences. ``state_bits=8`` is not supported under FSDP2 yet
(refused at construction): its blocks would cut across the shards.
"""

import torch
import torch.distributed as dist

from fastforget import _validation as check
from fastforget import distributed as dist_util
from fastforget._dtypes import accumulate_dtype
from fastforget.defences import FUSED_TERMS, Defence, FusedOperands
from fastforget.ops.mofo import mofo_thresholds, mofo_update
from fastforget.ops.protected_adamw8bit_step import run_protected_adamw8bit_step
from fastforget.ops.protected_adamw_step import _hyperparameters, run_protected_adamw_step
from fastforget.quantize import dequantize_blockwise, dynamic_map, quantize_blockwise

STATE_BITS = (32, 8)
BLOCK = 256  # bitsandbytes' optimizer block size: one absmax per 256 elements
BNB_WRAPPED = "__bnb_optimizer_quant_state__"  # bitsandbytes' state_dict nests its quantization tensors under it
BNB_WRAPPED_KEYS = ("state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2", "unorm_vec")

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

    ``state_bits``: 32 (torch.optim.AdamW's moments and state layout) or 8 (bitsandbytes' ``AdamW8bit`` moments and
    layout for tensors of at least ``min_8bit_size`` elements, fp32 moments below; see the module doc). An
    ``ff.EWC(fisher_bits=8)`` needs ``state_bits=8``.
    """

    _step_supports_amp_scaling = True  # GradScaler hands grad_scale / found_inf to step() (torch's fused AdamW)

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *, maximize=False,
        foreach=None, capturable=False, differentiable=False, fused=None, ewc=None, protector=None, si=None,
        defences=None, backend="auto", mofo_fraction=None, mofo_min_ndim=2, state_bits=32, min_8bit_size=4096,
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
        self.state_bits = check.check_choice("state_bits", state_bits, STATE_BITS)
        self.min_8bit_size = check.check_int("min_8bit_size", min_8bit_size, minimum=0)
        self._maps = {}  # device -> the two dynamic maps, shared by every 8-bit state on it
        super().__init__(params, defaults)
        members = [(g, p) for g, group in enumerate(self.param_groups) for p in group["params"]]
        names = [
            f"param_groups[{g}][{i}]" for g, group in enumerate(self.param_groups) for i in range(len(group["params"]))
        ]
        self.process_group = dist_util.check_parameters(names, [p for _, p in members])  # FSDP2 only
        if state_bits == 8 and self.process_group is not None:
            raise ValueError("state_bits=8 is not supported with sharded (FSDP2) parameters yet; use state_bits=32")
        self.defences = _check_defences([ewc, protector, si], defences, members)
        quantized = [d for d in self.defences if getattr(d, "fisher_bits", 32) == 8]
        if quantized and state_bits != 8:
            raise ValueError(
                f"the {type(quantized[0]).__name__} stores its Fisher in 8 bits (fisher_bits=8), which the fused step "
                "reads with 8-bit moments only: use ProtectedAdamW(..., state_bits=8)"
            )
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

    def _is_8bit(self, p):
        """bitsandbytes' rule: 8-bit moments for tensors of at least min_8bit_size elements (fp64 ones keep fp64)."""
        return self.state_bits == 8 and p.numel() >= self.min_8bit_size and p.dtype != torch.float64

    def _moment_keys(self):
        return ("exp_avg", "exp_avg_sq") if self.state_bits == 32 else ("state1", "state2")

    def _qmaps(self, device):
        """The signed and unsigned dynamic maps on `device` (bitsandbytes' qmap1, qmap2), shared by every param."""
        if device not in self._maps:
            self._maps[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._maps[device]

    def _state_of(self, p):
        state = self.state[p]
        if not state:
            acc, shard = accumulate_dtype([p]), dist_util.local(p)
            state["step"] = torch.zeros((), dtype=torch.float32, device=shard.device)
            if self._is_8bit(p):
                self._set_8bit(state, p, None)
            else:
                for key in self._moment_keys():  # sharded like p under FSDP2
                    state[key] = dist_util.like(torch.zeros(shard.shape, dtype=acc, device=shard.device), p)
        return state

    def _set_8bit(self, state, p, moments):
        """state1, state2, qmap1, qmap2, absmax1, absmax2 of `p`: zeros, or `moments` (two float tensors) quantized."""
        qmap1, qmap2 = self._qmaps(p.device)
        state["qmap1"], state["qmap2"] = qmap1, qmap2
        for n, qmap in ((1, qmap1), (2, qmap2)):
            if moments is None:
                codes = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
                absmax = torch.zeros(_blocks(p.numel()), dtype=torch.float32, device=p.device)
            else:
                codes, absmax = quantize_blockwise(moments[n - 1].to(p.device, torch.float32).contiguous(), qmap)
            state[f"state{n}"], state[f"absmax{n}"] = codes, absmax

    def _float_moments(self, state):
        """(exp_avg, exp_avg_sq) of one param's state as float tensors (dequantized when 8-bit)."""
        first, second = self._moment_keys()
        if state[first].dtype != torch.uint8:
            return state[first], state[second]
        return tuple(dequantize_blockwise(state[f"state{n}"], state[f"absmax{n}"], state[f"qmap{n}"]) for n in (1, 2))

    def state_dict(self):
        """torch.optim.AdamW's state dict (``state_bits=32``), or bitsandbytes' ``AdamW8bit``'s (``state_bits=8``:
        an integer ``step``, the quantization tensors nested under its ``__bnb_optimizer_quant_state__`` key), which
        ``bnb.optim.AdamW8bit.load_state_dict`` loads."""
        state_dict = super().state_dict()
        if self.state_bits == 32:
            return state_dict
        saved = state_dict["state"]
        steps = torch.stack([entry["step"].cpu() for entry in saved.values()]).tolist() if saved else []
        packed = {}
        for (i, entry), step in zip(saved.items(), steps):
            entry = dict(entry, step=int(step))  # a new dict: the optimizer's own state is not touched
            packed[i] = {key: value for key, value in entry.items() if key not in BNB_WRAPPED_KEYS}
            packed[i][BNB_WRAPPED] = {key: value for key, value in entry.items() if key in BNB_WRAPPED_KEYS}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict):
        """Loads a state dict of this class (either ``state_bits``), of ``torch.optim.AdamW``, or of bitsandbytes'
        ``AdamW8bit`` / ``AdamW`` (``state1``/``state2``, 8 or 32 bits), converting the moments to this optimizer's
        layout (quantized or dequantized where the bit widths differ); the step moves to the param. Float moments
        keep their saved precision (fp32 for 16-bit params, where torch would cast them to the param dtype). Under
        FSDP2 the moments may be full tensors or DTensors (as DCP loads them): they are sharded like their
        parameters. The whole state dict is checked first (groups, hyperparameters, every state entry's keys,
        shapes, dtypes and values); a rejected one changes nothing."""
        entries = self._check_state_dict(state_dict)
        before = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        super().load_state_dict({**state_dict, "state": {}})  # the groups; the state is rebuilt below
        for group, kept in zip(self.param_groups, before):  # e.g. a bitsandbytes state has no maximize, MoFO keys
            for key, value in kept.items():
                group.setdefault(key, value)
        params = [p for group in self.param_groups for p in group["params"]]
        for p, entry in zip(params, entries):
            if entry is not None:
                self.state[p] = self._loaded_state(p, entry)
        for group in self.param_groups:
            self._check_group(group)

    def _loaded_state(self, p, entry):
        """One param's state in this optimizer's layout from a checked, unwrapped saved entry."""
        device = dist_util.local(p).device
        state = {"step": dist_util.local(torch.as_tensor(entry["step"], dtype=torch.float32)).to(device, copy=True)}
        quantized = "state1" in entry and entry["state1"].dtype == torch.uint8
        if quantized and self._is_8bit(p):
            for key in ("state1", "state2", "absmax1", "absmax2"):
                state[key] = entry[key].to(device, copy=True).contiguous()
            state["qmap1"], state["qmap2"] = self._qmaps(device)
            return state
        if quantized:  # into fp32 moments
            moments = [
                dequantize_blockwise(
                    entry[f"state{n}"].contiguous(), entry[f"absmax{n}"].float(), entry[f"qmap{n}"].float()
                )
                for n in (1, 2)
            ]
        else:
            moments = [entry[key] for key in (("state1", "state2") if "state1" in entry else ("exp_avg", "exp_avg_sq"))]
        if self._is_8bit(p):
            self._set_8bit(state, p, moments)
            return state
        acc = accumulate_dtype([p])
        for key, moment in zip(self._moment_keys(), moments):
            state[key] = dist_util.like(dist_util.local(dist_util.copy_like(moment, p, acc)).contiguous(), p)
        return state

    def _check_state_dict(self, state_dict):
        """Every group and entry of `state_dict` checked; returns each param's saved entry (bitsandbytes'
        quantization tensors unwrapped) or None, in this optimizer's param order."""
        check.check_state("ProtectedAdamW", state_dict, ("state", "param_groups"))
        saved_groups, saved = state_dict["param_groups"], state_dict["state"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(saved_groups)} param groups but this optimizer {len(self.param_groups)}"
            )
        entries = []
        for g, (mine, theirs) in enumerate(zip(self.param_groups, saved_groups)):
            if len(theirs.get("params", ())) != len(mine["params"]):
                raise ValueError(
                    f"param group {g} of the state has {len(theirs.get('params', ()))} params but this optimizer's "
                    f"{len(mine['params'])}"
                )
            missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in theirs]
            if missing:
                raise ValueError(f"param group {g} of the state lacks {missing}: not an AdamW state")
            group = {**{k: v for k, v in mine.items() if k != "params"}, **theirs}
            if len(group["betas"]) != 2:  # bitsandbytes' AdEMAMix keeps three
                raise ValueError(f"param group {g} of the state has betas {group['betas']}: not an AdamW state")
            try:
                self._check_group(group)
            except (TypeError, ValueError) as error:
                raise type(error)(f"param group {g} of the state: {error}") from None
            for i, p in zip(theirs["params"], mine["params"]):
                entries.append(_checked_entry(i, saved[i], p) if i in saved else None)
        return entries

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
        else; the per-tensor factors and alphas are global already): one call for the params with float moments,
        one for those with 8-bit moments; with MoFO, the filtered tensors' two passes around the select (see the
        module doc). Returns this rank's share of the penalty."""
        states = [self._state_of(p) for p in params]
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay, maximize = float(group["lr"]), group["eps"], group["weight_decay"], group["maximize"]
        maximize = bool(maximize)
        first, second = self._moment_keys()

        def fused(positions, lr, with_si):
            """The fused step over params[positions], split by the kind of their moments."""
            penalty = 0.0
            quantized = [i for i in positions if states[i][first].dtype == torch.uint8]
            wide = [i for i in positions if states[i][first].dtype != torch.uint8]
            for chosen, eightbit in ((wide, False), (quantized, True)):
                if not chosen:
                    continue
                p, s, o = [params[i] for i in chosen], [states[i] for i in chosen], operands.pick(chosen)
                fisher = o.fisher
                if o.fisher_absmax and not eightbit:  # an 8-bit Fisher beside fp32 moments (small tensors)
                    unsigned = self._qmaps(p[0].device)[1]
                    fisher = [dequantize_blockwise(c, m, unsigned) for c, m in zip(fisher, o.fisher_absmax)]
                head = [_shards(p), _shards(q.grad for q in p), _shards(x[first] for x in s)]
                head.append(_shards(x[second] for x in s))
                if eightbit:
                    head += [[x["absmax1"] for x in s], [x["absmax2"] for x in s], *self._qmaps(p[0].device)]
                head += [[x["step"] for x in s], _shards(o.anchors), _shards(fisher)]
                if eightbit:
                    head.append(o.fisher_absmax)
                run = run_protected_adamw8bit_step if eightbit else run_protected_adamw_step
                penalty = penalty + run(
                    *head, o.factors, _shards(o.ema_mean), _shards(o.ema_var), o.alpha, o.var_scale,
                    _shards(o.omega) if with_si else [], grad_scale, found_inf, lr, beta1, beta2, eps, weight_decay,
                    o.lam, o.threshold, maximize, backend=self.backend,
                )  # fmt: skip
            return penalty

        fraction = group.get("mofo_fraction")
        every = list(range(len(params)))
        filtered = [] if fraction is None else [i for i in every if params[i].dim() >= group.get("mofo_min_ndim", 2)]
        if not filtered:
            return fused(every, lr, True)
        chosen = set(filtered)
        full = [i for i in every if i not in chosen]
        penalty = fused(full, lr, True) if full else 0.0
        penalty = penalty + fused(filtered, 0.0, False)  # moments, defences and steps; theta unchanged
        omega = _shards(operands.pick(filtered).omega)
        wide = [i for i in filtered if states[i][first].dtype != torch.uint8]
        parts = [(wide, [(states[i][first], states[i][second]) for i in wide])] if wide else []
        # 8-bit moments: the threshold and the masked update on them dequantized, one tensor at a time
        parts += [([i], [self._float_moments(states[i])]) for i in filtered if states[i][first].dtype == torch.uint8]
        for positions, moments in parts:
            p = [params[i] for i in positions]
            exp_avg = _shards(m for m, _ in moments)
            ks = torch.tensor([int(q.numel() * fraction) for q in p], device=exp_avg[0].device)  # global numel
            thresholds = mofo_thresholds(exp_avg, ks, backend=self.backend, process_group=self.process_group)
            o = [omega[filtered.index(i)] for i in positions] if omega else []
            mofo_update(
                _shards(p), exp_avg, _shards(v for _, v in moments), [states[i]["step"] for i in positions],
                thresholds, _shards(q.grad for q in p) if o else [], o, grad_scale, found_inf, lr, beta1, beta2, eps,
                weight_decay, maximize, backend=self.backend,
            )  # fmt: skip
        return penalty


def _shards(tensors):
    return [dist_util.local(t) for t in tensors]


def _blocks(numel):
    return -(-numel // BLOCK)


def _checked_entry(i, entry, p):
    """Saved param state `i` for param `p`, checked: torch's AdamW (step, exp_avg, exp_avg_sq) or bitsandbytes'
    (step, state1, state2: float32, or uint8 codes with qmap1/qmap2 and absmax1/absmax2, possibly nested under its
    wrapper key). Returns it unwrapped (a new dict)."""
    if not isinstance(entry, dict):
        raise ValueError(f"state of param {i} is a {type(entry).__name__}, not a dict")
    wrapped = entry.get(BNB_WRAPPED, {})
    if not isinstance(wrapped, dict):
        raise ValueError(f"state of param {i}: {BNB_WRAPPED} is a {type(wrapped).__name__}, not a dict")
    entry = {k: v for k, v in {**entry, **wrapped}.items() if k != BNB_WRAPPED}
    if {"step", "state1", "state2"} <= set(entry):
        keys = ("state1", "state2")
    elif {"step", "exp_avg", "exp_avg_sq"} <= set(entry):
        keys = ("exp_avg", "exp_avg_sq")
    else:
        raise ValueError(
            f"state of param {i} has {sorted(entry)}, not AdamW's step, exp_avg and exp_avg_sq (torch) or step, "
            "state1 and state2 (bitsandbytes)"
        )
    quantized = (
        keys[0] == "state1" and isinstance(entry["state1"], torch.Tensor) and entry["state1"].dtype == torch.uint8
    )
    for key in keys:
        t = entry[key]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() and key in ("exp_avg", "exp_avg_sq"):
            raise TypeError(f"{key} of param {i} in the state is not a floating point tensor")
        wide = (torch.float32, accumulate_dtype([p]))  # bitsandbytes' 32-bit states: fp32 (fp64 for fp64 params)
        if (t.dtype == torch.uint8) != quantized or not quantized and keys[0] == "state1" and t.dtype not in wide:
            raise ValueError(
                f"{key} of param {i} in the state is {t.dtype} (state1 {entry['state1'].dtype}): a bitsandbytes state "
                "of 8 bits (uint8 codes) or 32 bits (float32) is expected"
            )
        if t.shape != p.shape:
            raise ValueError(
                f"{key} of param {i} in the state has shape {tuple(t.shape)} but the param {tuple(p.shape)}: the "
                "state is another model's"
            )
        if not quantized:
            local = dist_util.local(t)
            if not bool(local.isfinite().all()) or key == keys[1] and bool((local < 0).any()):
                raise ValueError(f"{key} of param {i} in the state is not finite{' and >= 0' * (key == keys[1])}")
    if quantized:
        blocks = _blocks(p.numel())
        for n, signed in ((1, True), (2, False)):
            qmap, absmax = entry.get(f"qmap{n}"), entry.get(f"absmax{n}")
            if not isinstance(qmap, torch.Tensor) or qmap.shape != (256,) or not torch.equal(
                qmap.detach().float().cpu(), dynamic_map(signed=signed)
            ):  # fmt: skip
                raise ValueError(
                    f"qmap{n} of param {i} in the state is not bitsandbytes' {'un' * (not signed)}signed dynamic map, "
                    "the only one the 8-bit step reads"
                )
            if not isinstance(absmax, torch.Tensor) or absmax.dtype != torch.float32 or absmax.shape != (blocks,):
                found = f"{absmax.dtype} {tuple(absmax.shape)}" if isinstance(absmax, torch.Tensor) else repr(absmax)
                raise ValueError(
                    f"absmax{n} of param {i} in the state must be float32 of shape ({blocks},) (one per block of "
                    f"{BLOCK} elements of the param's {p.numel()}), found {found}: the state is another model's"
                )
            if not bool(absmax.isfinite().all()) or bool((absmax < 0).any()):
                raise ValueError(f"absmax{n} of param {i} in the state is not finite and >= 0")
    step = torch.as_tensor(entry["step"])
    if step.numel() != 1 or not bool(step.isfinite().all()) or float(step) < 0:
        raise ValueError(f"step of param {i} in the state must be one finite number >= 0")
    return entry


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
