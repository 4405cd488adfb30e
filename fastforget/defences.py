"""The defences protocol: one interface for everything that defends a model against forgetting.

A defence (``ff.EWC``, ``ff.GradientProtector``, ``ff.SynapticIntelligence``, a replay buffer through ``Replay``,
the KL anchor ``KLAnchor``, or one of your own) subclasses ``Defence`` and overrides the hooks it needs; every hook
defaults to doing nothing. Three consumers call them, in this order:

* per micro-batch (``ff.ProtectedTrainer.step``, ``ProtectionMixin.compute_loss``): ``task_loss(ctx)`` -- at most
  one defence computes the task loss itself (the KL anchor: cross-entropy + KL in one fused pass) -- then
  ``loss(ctx)`` of every defence, whose terms are added: ``loss + weight * term`` (divided by the gradient
  accumulation steps as the Trainer divides its own loss);
* once per optimizer step, after the gradients are complete: ``protect_gradients(scale)`` of every defence, in
  list order, on gradients that are ``scale`` times the true ones (a GradScaler's scale that was not unscaled yet;
  1.0 otherwise);
* inside ``ff.optim.ProtectedAdamW.step`` instead, for the defences the optimizer holds:
  ``fused_operands(params, grad_scale, found_inf)`` once per step over every parameter with a gradient, the fused
  pass, then ``after_fused_step(params, found_inf)``;
* at the end of a task: ``end_task(task)`` with the task's data and the model as the consumer wraps it (a
  ``DistributedDataParallel`` wrapper, so that anything estimated from data reduces over its process group);
* checkpoints: ``state_dict()`` (None for a defence without state) and ``load_state_dict(state)``, which validates
  everything before it changes anything.

``build_defences`` turns the consumers' keyword arguments (``ewc=``, ``replay=``, ``protector=``, ``si=``,
``kl_to_base=``) into the list, validated in one place; ``Defences`` is the checked list the consumers hold.
See docs/defences.md for a worked example of a new defence.
"""

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import torch

from fastforget import _validation as check

FUSED_TERMS = {  # the parts of ProtectedAdamW's fused step, and the FusedOperands fields each one fills
    "quadratic": ("anchors", "fisher", "fisher_absmax", "lam", "penalty_offset"),  # g += 2 lam F (theta - anchor)
    "protection": ("factors", "ema_mean", "ema_var", "alpha", "var_scale", "threshold"),  # GradientProtector's
    "path_integral": ("omega",),  # omega -= g_task * delta_theta, Synaptic Intelligence's
}


@dataclasses.dataclass
class LMHeadInputs:
    """What a ``batch_loss`` may return instead of a loss: a language model's final hidden states, its LM head and
    the labels. The trainer then computes ``ff.anchored_lm_loss`` on them (with ``kl_to_base``: the KL to the base
    model's distribution too) without materialising the logits."""

    hidden: torch.Tensor  # (B, T, H) or (N, H)
    weight: torch.Tensor  # the LM head (V, H)
    labels: torch.Tensor  # hidden's leading dims; -100 is not counted
    bias: torch.Tensor | None = None
    shift: bool = True  # the causal-LM shift: position t predicts labels[..., t + 1]


@dataclasses.dataclass
class LossTerm:
    """A loss a defence contributes: ``value`` (a differentiable 0-dim tensor, logged under ``name``) enters the
    step's loss as ``weight * value`` (``loss``) or as the task loss itself (``task_loss``, weight 1)."""

    name: str
    value: torch.Tensor
    weight: float = 1.0
    parts: dict | None = None  # a task loss's components for the logs ({"task_loss": ..., "kl_loss": ...}), detached


@dataclasses.dataclass
class LossContext:
    """What a consumer hands ``task_loss`` / ``loss`` for one micro-batch.

    model: the model being trained, as the consumer calls it (possibly wrapped); unwrapped: the module itself.
    batch: the micro-batch; batch_size: its number of examples.
    loss_of(stored): the consumer's loss of a batch as a ``ff.ReplayBuffer`` returns it from ``sample``.
    outputs: for ``task_loss``, the model's outputs on ``batch`` (``LMHeadInputs`` for language models); and
    outputs_of(model): the same outputs for another model (the caller runs it under no_grad where it wants).
    split: the consumer logs a task loss's components (``LossTerm.parts``).
    """

    model: torch.nn.Module
    batch: Any
    batch_size: int | None = None
    loss_of: Callable[[Any], torch.Tensor] | None = None
    unwrapped: torch.nn.Module | None = None
    outputs: Any = None
    outputs_of: Callable[[torch.nn.Module], Any] | None = None
    split: bool = False


class TaskData:
    """What a consumer hands ``end_task``: the task's data and the model as the consumer wraps it.

    model: the model as wrapped (``DistributedDataParallel``, FSDP2...): reduce anything estimated from data over
    its process group. loader: the task's batches, re-iterable, as ``loss_fn`` / ``batch_loss`` take them (a
    consumer may pass a function that makes it: it is made on first use). buffer_batches(): the task's data as
    batches for ``ff.ReplayBuffer.add``. estimator, max_batches, progress: how to estimate a Fisher
    (``ff.EWC.consolidate``).
    """

    def __init__(
        self, model, loader, buffer_batches, *, loss_fn=None, batch_loss=None, estimator="empirical",
        max_batches=None, progress=False,
    ):  # fmt: skip
        self.model, self._loader, self.buffer_batches = model, loader, buffer_batches
        self.loss_fn, self.batch_loss = loss_fn, batch_loss
        self.estimator, self.max_batches, self.progress = estimator, max_batches, progress

    @property
    def loader(self):
        if callable(self._loader) and not hasattr(self._loader, "__iter__"):
            self._loader = self._loader()
        return self._loader


@dataclasses.dataclass
class FusedOperands:
    """What a defence hands ``ff.optim.ProtectedAdamW``'s fused step (``ff.protected_adamw_step``), the lists and
    per-tensor tensors aligned with the ``params`` it was asked about. A defence fills the fields of the terms it
    declares in ``fused_terms`` (see ``FUSED_TERMS``); the step combines the defences' terms, one defence per term.

    quadratic: anchors, fisher (per param), lam: g += 2 lam F (theta - anchor), penalty lam sum F (theta - anchor)^2
        plus penalty_offset (a constant, e.g. the separate-mode EWC's lam C; None: nothing added). An 8-bit Fisher
        (``ff.EWC(fisher_bits=8)``): fisher holds uint8 codes on the unsigned dynamic map and fisher_absmax their
        fp32 block absmax (one per 256 elements, per param), which only ``ProtectedAdamW(state_bits=8)`` consumes;
        empty: the Fisher is float.
    protection: factors (one per param, mode "tensor") or ema_mean, ema_var (per param), alpha, var_scale (one per
        param) and threshold (mode "element"), as in ``ff.protected_adamw_step``.
    path_integral: omega (per param): omega -= g_task * (theta_new - theta_old).
    """

    anchors: list = dataclasses.field(default_factory=list)
    fisher: list = dataclasses.field(default_factory=list)
    fisher_absmax: list = dataclasses.field(default_factory=list)
    lam: float = 0.0
    penalty_offset: float | None = None
    factors: torch.Tensor | None = None
    ema_mean: list = dataclasses.field(default_factory=list)
    ema_var: list = dataclasses.field(default_factory=list)
    alpha: torch.Tensor | None = None
    var_scale: torch.Tensor | None = None
    threshold: float = 0.0
    omega: list = dataclasses.field(default_factory=list)

    @staticmethod
    def combine(parts):
        """One FusedOperands from (defence, operands) pairs, each defence contributing its declared terms."""
        merged = FusedOperands()
        for defence, operands in parts:
            for term in defence.fused_terms:
                for field in FUSED_TERMS[term]:
                    setattr(merged, field, getattr(operands, field))
        return merged

    def pick(self, positions):
        """The operands of the params at `positions` (indices into the params they were made for)."""
        picked = FusedOperands(lam=self.lam, threshold=self.threshold)
        for field in ("anchors", "fisher", "fisher_absmax", "ema_mean", "ema_var", "omega"):
            values = getattr(self, field)
            setattr(picked, field, [values[i] for i in positions] if values else [])
        for field in ("factors", "alpha", "var_scale"):
            values = getattr(self, field)
            if values is not None:
                setattr(picked, field, values[torch.tensor(positions, device=values.device)])
        return picked


class Defence:
    """The protocol (see the module doc): subclass it and override what your defence does; the rest is a no-op.

    Class attributes: ``name`` keys the defence's state in a checkpoint and its logs (``<name>_penalty``);
    ``step_timer`` / ``task_timer`` name its per-step and end-of-task times in the consumers' ``time_ms`` (None: not
    timed); ``fused_terms`` the parts of ProtectedAdamW's fused step it fills (``FUSED_TERMS``; empty: it cannot be
    fused, and ProtectedAdamW refuses it); ``fused_only``: it works only inside ProtectedAdamW's step (a trainer
    with another optimizer refuses it).
    """

    name = "defence"
    step_timer: str | None = None
    task_timer: str | None = None
    fused_terms: tuple = ()
    fused_only = False

    def check_model(self, model: torch.nn.Module) -> None:
        """Called once by a trainer with the model it trains; raise if this defence cannot work on it. By default: a
        defence over parameters (``self.params``) must cover parameters of this model, or its work would go into
        another model's gradients."""
        name = foreign_parameter(self, model)
        if name is not None:
            raise ValueError(
                f"the {type(self).__name__} covers {name!r}, which is not a parameter of the model being trained: "
                "build it over this model"
            )

    def task_loss(self, ctx: LossContext) -> LossTerm | None:
        """The micro-batch's task loss computed by this defence instead of the consumer (at most one defence does),
        or None."""
        return None

    def loss(self, ctx: LossContext) -> LossTerm | None:
        """A term added to the micro-batch's loss (``weight * value``), or None."""
        return None

    def protect_gradients(self, scale: float) -> torch.Tensor | None:
        """Once per optimizer step, on complete gradients that are ``scale`` x the true ones: change ``p.grad`` in
        place (in those units); return the penalty this adds (true units, 0-dim tensor) or None."""
        return None

    def check_fusable(self, members: list) -> None:
        """ProtectedAdamW's construction: `members` are its (param group index, param) pairs; raise if this
        defence cannot run in its fused step over them."""
        if not self.fused_terms:
            raise ValueError(
                f"{type(self).__name__} hands no operands to the fused step (its fused_terms are empty); "
                "ProtectedAdamW cannot apply it: pass it to the trainer (defences=[...]) instead"
            )
        check_covers(getattr(self, "params", ()), members, type(self).__name__)

    def fused_operands(self, params: list, grad_scale, found_inf) -> FusedOperands:
        """Once per ProtectedAdamW step, before the fused pass: the operands for `params` (every optimizer param
        with a gradient, all groups); grad_scale/found_inf: the GradScaler's (0-dim tensors) or None. A step with
        a nonzero found_inf writes nothing, so any state this changes must stay unchanged on it too."""
        return FusedOperands()

    def after_fused_step(self, params: list, found_inf) -> None:
        """After the fused pass over every group (e.g. advance step counters unless found_inf is set)."""

    def end_task(self, task: TaskData) -> None:
        """At the end of a task, with its data and the model as wrapped."""

    def state_dict(self) -> dict | None:
        """Tensors and plain values (loadable with ``torch.load(weights_only=True)``); None: no state."""
        return None

    def load_state_dict(self, state) -> None:
        """Restore a ``state_dict()``; validate all of it first, change nothing on error, and replace (not write
        into) the tensors an earlier ``state_dict()`` handed out."""
        if state is not None:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint has some for {self.name!r}")


def overrides(defence, hook: str) -> bool:
    """Whether `defence` does something in `hook` (overrides the protocol's no-op): consumers time only those."""
    return getattr(type(defence), hook) is not getattr(Defence, hook)


def foreign_parameter(defence, model):
    """The name of the first of ``defence.params`` (if it has any) that is not a parameter of `model`, or None."""
    params = getattr(defence, "params", None) or []
    owned = {id(p) for p in model.parameters()} if params else set()
    names = getattr(defence, "names", None) or [f"params[{i}]" for i in range(len(params))]
    return next((name for name, p in zip(names, params) if id(p) not in owned), None)


def check_covers(params, members, label):
    """Every (group index, param) of `members` is one of `params`; raises naming the first that is not."""
    covered = {id(p) for p in params}
    for group, p in members:
        if id(p) not in covered:
            raise ValueError(
                f"param group {group} holds a parameter of shape {tuple(p.shape)} that the {label} does not cover;"
                f" build the {label} over the same parameters as the optimizer"
            )


def parameter_rows(defence, params) -> list:
    """The position of each of `params` in ``defence.params`` (the index is built once per defence)."""
    index = defence.__dict__.get("_parameter_rows")
    if index is None:
        index = defence.__dict__["_parameter_rows"] = {id(p): i for i, p in enumerate(defence.params)}
    return [index[id(p)] for p in params]


# ------------------------------------------------------------------------------------------ the adapters


class Replay(Defence):
    """Rehearsal from a ``ff.ReplayBuffer``: each micro-batch adds ``weight`` x the loss of ``batch_size`` stored
    examples (default: the micro-batch's size, at most what the buffer holds); ``end_task`` offers the task's data
    to the buffer, whose policy decides what stays."""

    name, step_timer, task_timer = "replay", "replay", "fill"

    def __init__(self, buffer, weight=1.0, batch_size=None):
        self.buffer = buffer
        self.weight = check.check_real("replay_weight", weight, minimum=0.0)
        self.batch_size = check.optional(check.check_int, "replay_batch_size", batch_size, minimum=1)

    def __repr__(self):
        return f"Replay({self.buffer!r}, weight={self.weight}, batch_size={self.batch_size})"

    def loss(self, ctx):
        if not len(self.buffer):
            return None
        k = min(self.batch_size or ctx.batch_size, len(self.buffer))
        return LossTerm("replay_loss", ctx.loss_of(self.buffer.sample(k)), self.weight)

    def end_task(self, task):
        for batch in task.buffer_batches():
            self.buffer.add(batch)

    def state_dict(self):
        return self.buffer.state_dict()

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state)


class KLAnchor(Defence):
    """The KL anchor to the base model: the task loss becomes ``ff.anchored_lm_loss`` on the final hidden states,
    mean CE + weight T^2 KL(p_base || p_theta), fused and chunked (no logits materialised). The base's hidden
    states come from ``base_model`` (a frozen copy of the model before the task) or, for a fastforget LoRA model or
    a PEFT model (``peft.get_peft_model``), from the same model with its adapters off (``ff.lora_disabled``, PEFT's
    ``disable_adapter()``: the same weights, no copy), in a no-grad forward. Needs the consumer's ``LMHeadInputs``.
    Asked for its parts (``ctx.split``), it computes the cross-entropy alone in one more no-grad, chunked pass over
    the LM head: ``task_loss`` (CE) and ``kl_loss`` (the KL term, weight T^2 KL).
    ``loss_type`` takes TRL's ``SFTConfig.loss_type`` names: "nll" (the CE), "dft" (the CE weighted by the label's
    probability; with a weight > 0 this is ASFT), and "eaft" (the entropy-adaptive gate): ``anchored_lm_loss``'s
    ``token_weighting``. With weight 0 no base model is needed (DFT or EAFT alone)."""

    name = "kl_to_base"

    def __init__(self, weight, base_model=None, backend="auto", loss_type="nll"):
        try:
            self.weight = check.check_real("kl_to_base", weight, minimum=0.0)
        except ValueError:
            raise ValueError(f"kl_to_base must be a finite number >= 0, got {weight!r}") from None
        self.backend, self.base_model = check.check_backend("kl_backend", backend), base_model
        self.loss_type = check_loss_type(loss_type)

    def __repr__(self):
        return (
            f"KLAnchor(weight={self.weight}, base_model={type(self.base_model).__name__}, backend={self.backend!r}, "
            f"loss_type={self.loss_type!r})"
        )

    def check_model(self, model):
        from fastforget.lora import lora_modules

        if self.weight and self.base_model is None and not lora_modules(model) and not is_peft_model(model):
            raise ValueError(
                "kl_to_base needs the base model's distribution: pass base_model= (a frozen copy), or train a "
                "fastforget LoRA model or a PEFT model, whose base outputs come from the same model with its "
                "adapters off (ff.lora_disabled, PeftModel.disable_adapter())"
            )

    def task_loss(self, ctx):
        from fastforget.lora import lora_disabled
        from fastforget.ops.anchored_lm_loss import anchored_lm_loss

        out = ctx.outputs
        if not isinstance(out, LMHeadInputs):
            raise TypeError(f"kl_to_base needs batch_loss to return LMHeadInputs, not {type(out).__name__}")
        ref_hidden = ref_weight = None
        if self.weight:
            with torch.no_grad():
                if self.base_model is not None:
                    base = ctx.outputs_of(self.base_model)
                else:
                    peft = is_peft_model(ctx.unwrapped)
                    with ctx.unwrapped.disable_adapter() if peft else lora_disabled(ctx.unwrapped):
                        base = ctx.outputs_of(ctx.model)
            ref_hidden = base.hidden
            ref_weight = None if base.weight is out.weight else base.weight
        value = anchored_lm_loss(
            out.hidden, out.weight, out.labels, bias=out.bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
            kl_weight=self.weight, shift=out.shift, backend=self.backend,
            token_weighting=TOKEN_WEIGHTING[self.loss_type],
        )  # fmt: skip
        parts = None
        if ctx.split and not self.weight:  # DFT / EAFT alone: the whole loss is the task loss
            parts = {"task_loss": value.detach()}
        elif ctx.split:
            with torch.no_grad():
                ce = anchored_lm_loss(
                    out.hidden, out.weight, out.labels, bias=out.bias, shift=out.shift, backend=self.backend,
                    token_weighting=TOKEN_WEIGHTING[self.loss_type],
                )  # fmt: skip
            parts = {"task_loss": ce, "kl_loss": value.detach() - ce}
        return LossTerm("kl_loss", value, parts=parts)


def is_peft_model(model) -> bool:
    """Whether `model` is a ``peft.PeftModel`` (PEFT is imported only if the user imported it)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


# TRL's SFTConfig.loss_type names ("chunked_nll": its deprecated alias of "nll"), plus "eaft", as token weightings
TOKEN_WEIGHTING = {"nll": None, "chunked_nll": None, "dft": "dft", "eaft": "eaft"}


def check_loss_type(loss_type):
    """One of TRL's SFTConfig.loss_type names or "eaft" (ValueError naming them otherwise)."""
    return check.check_choice("loss_type", loss_type, tuple(TOKEN_WEIGHTING))


# -------------------------------------------------------------------------------------- the consumers' list


class DefenceAttributes:
    """The consumers' attributes of old, read from their ``defences`` (a ``Defences``): ``ewc``, ``protector``,
    ``si`` (the defence so named, or None), ``replay`` (the ``ff.ReplayBuffer``), ``replay_weight``,
    ``replay_batch_size``, ``kl_to_base`` and ``base_model``."""

    @property
    def ewc(self):
        return self.defences.named("ewc")

    @property
    def protector(self):
        return self.defences.named("protector")

    @property
    def si(self):
        return self.defences.named("si")

    @property
    def replay(self):
        replay = self.defences.named("replay")
        return None if replay is None else replay.buffer

    @property
    def replay_weight(self):
        replay = self.defences.named("replay")
        return 1.0 if replay is None else replay.weight

    @property
    def replay_batch_size(self):
        replay = self.defences.named("replay")
        return None if replay is None else replay.batch_size

    @property
    def kl_to_base(self):
        anchor = self.defences.named("kl_to_base")
        return None if anchor is None else anchor.weight

    @property
    def base_model(self):
        anchor = self.defences.named("kl_to_base")
        return None if anchor is None else anchor.base_model

    @property
    def token_weighting(self):
        anchor = self.defences.named("kl_to_base")
        return None if anchor is None else TOKEN_WEIGHTING[anchor.loss_type]


def build_defences(
    defences=None, *, ewc=None, replay=None, protector=None, si=None, replay_weight=1.0, replay_batch_size=None,
    kl_to_base=None, base_model=None, kl_backend="auto", loss_type="nll",
):  # fmt: skip
    """The consumers' keyword arguments as one list, in the order the defences run: the EWC, SI, the protector, the
    replay buffer (as ``Replay``), the KL anchor (as ``KLAnchor``; also for a loss_type other than "nll", the fused
    DFT / EAFT loss), then `defences` (a list of ``Defence``). Everything is checked before anything is built."""
    extra = [] if defences is None else list(defences)
    weight = check.check_real("replay_weight", replay_weight, minimum=0.0)
    batch = check.optional(check.check_int, "replay_batch_size", replay_batch_size, minimum=1)
    fused_loss = kl_to_base is not None or TOKEN_WEIGHTING[check_loss_type(loss_type)] is not None
    anchor = KLAnchor(kl_to_base or 0.0, base_model, kl_backend, loss_type) if fused_loss else None
    if anchor is None:  # the anchor checked it
        check.check_backend("kl_backend", kl_backend)
    built = [ewc, si, protector, None if replay is None else Replay(replay, weight, batch), anchor]
    return [d for d in built if d is not None] + extra


class Defences:
    """The checked list of defences a consumer holds (see ``build_defences``): each a ``Defence``, names unique, at
    most one computing the task loss; ``state_dict`` / ``load_state_dict`` over all of them, validated as a whole."""

    def __init__(self, defences):
        defences = list(defences)
        names = {}
        for i, d in enumerate(defences):
            if not isinstance(d, Defence):
                raise TypeError(f"defences[{i}] is a {type(d).__name__}, not a ff.defences.Defence")
            if d.name in names:
                raise ValueError(
                    f"defences[{names[d.name]}] and defences[{i}] are both named {d.name!r}; a name keys the state"
                )
            names[d.name] = i
        computing = [d.name for d in defences if overrides(d, "task_loss")]
        if len(computing) > 1:
            raise ValueError(f"at most one defence may compute the task loss; {computing} all do")
        self.items = defences

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)

    def __contains__(self, defence):
        return any(d is defence for d in self.items)

    def named(self, name):
        """The defence called `name`, or None."""
        return next((d for d in self.items if d.name == name), None)

    def with_hook(self, hook, defences=None):
        """Those of `defences` (default: all) that do something in `hook`, in order."""
        return [d for d in (self.items if defences is None else defences) if overrides(d, hook)]

    @property
    def task_loss(self):
        """The defence that computes the task loss, or None."""
        return next((d for d in self.items if overrides(d, "task_loss")), None)

    def applied_by(self, optimizer):
        """The defences the consumer applies itself: all of them, except those a ``ProtectedAdamW`` `optimizer`
        (or accelerate's wrapper of one) applies in its fused step. A defence that can be fused but that such an
        optimizer does not hold, or one that only runs fused without one, raises: nothing is applied twice or left
        out."""
        from fastforget.optim import ProtectedAdamW

        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
        fusing = isinstance(optimizer, ProtectedAdamW)
        fused = optimizer.defences if fusing else ()
        for d in self.items:
            if fusing and d.fused_terms and not any(d is f for f in fused):
                raise ValueError(
                    f"the ProtectedAdamW optimizer applies its own {d.name}: pass the trainer's {d.name} to it "
                    f"(ProtectedAdamW(..., {d.name}=...)) or the same object to both"
                )
            if d.fused_only and not fusing:
                raise ValueError(
                    f"{type(d).__name__} runs inside ff.optim.ProtectedAdamW's step only: build the optimizer as "
                    f"ProtectedAdamW(..., {d.name}=...) and pass the same object to the trainer"
                )
        return [d for d in self.items if not any(d is f for f in fused)]

    def state_dict(self):
        """{name: state} of the defences with state."""
        states = {d.name: d.state_dict() for d in self.items}
        return {name: state for name, state in states.items() if state is not None}

    def load_state_dict(self, state):
        """Restore every part, or none: the parts present must be those of the defences with state; a part that
        fails to load rolls the parts loaded before it back."""
        if not isinstance(state, dict):
            raise TypeError(f"the protection state must be a dict of parts, not {type(state).__name__}")
        current = {d.name: d.state_dict() for d in self.items}
        for name, part in current.items():
            if (part is None) != (name not in state):
                found = "has" if part is None else "lacks"
                raise ValueError(f"the checkpoint's protection state {found} a {name!r} part")
        unknown = sorted(set(state) - set(current))
        if unknown:
            raise ValueError(f"the checkpoint's protection state has parts {unknown} that no defence here keeps")
        loaded = []
        try:
            for d in self.items:
                if current[d.name] is not None:
                    d.load_state_dict(state[d.name])
                    loaded.append(d)
        except Exception:
            for d in loaded:  # their earlier state_dict()s hold the tensors the load replaced
                d.load_state_dict(current[d.name])
            raise
