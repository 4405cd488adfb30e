"""The protected training step: the seed's ``protected_training_step`` with fused protections, made real.

The trainer runs a list of defences (``ff.defences.Defence``: EWC, SI, the protector, replay, the KL anchor, your
own; see docs/defences.md); its keyword arguments build that list. One ``step(batch)``:

    zero_grad
    loss = loss(batch)                                   (under autocast when asked; the KL anchor's task_loss)
    + replay_weight * loss(replay.sample(k))             (each defence's loss term: rehearsal, k = the batch's size)
    backward                                             (of the scaled loss under a GradScaler)
    scaler.unscale_(optimizer)                           (AMP: every later step sees true gradients)
    ewc.apply_()                                         (each defence's protect_gradients(1.0), in list order:
    protector.protect_()                                  fused EWC gradient, then shrink high-variance gradients)
    optimizer.step()                                     (scaler.step + scaler.update under AMP)

and ``end_task(loader)`` runs each defence's ``end_task``: consolidates the EWC on the task's data (the model as
given, e.g. its DDP wrapper) and offers the task's batches to the buffer.

With an ``ff.optim.ProtectedAdamW`` as the optimizer, the defences attached to it (EWC, protector, SI) run inside
its fused step: the trainer skips their ``protect_gradients`` (a trainer defence that can be fused must then be the
optimizer's own) and reports the optimizer's recorded penalty.

Why unscale first under AMP: the EWC gradient is in the units of the true gradient, so adding it to gradients that
are still multiplied by the loss scale S would weaken it by S. ``scaler.unscale_`` divides the gradients by S once
(and records whether any is inf/NaN); EWC and the protector then work on true gradients, and ``scaler.step`` reuses
that record: on an overflow it skips the optimizer step. EWC has no per-step state, and the protector checks the
gradients itself and leaves its state untouched on a non-finite step (its ``found_inf``), so a skipped step
changes nothing but the gradients, which the next ``zero_grad`` discards.
"""

import contextlib
import time
import types

import torch

from fastforget._batch import batch_size, to_device
from fastforget.defences import (  # noqa: F401  (LMHeadInputs: its public home was this module)
    DefenceAttributes,
    Defences,
    LMHeadInputs,
    LossContext,
    TaskData,
    build_defences,
)
from fastforget.optim import ProtectedAdamW


def _as_buffer_batch(batch):
    """A DataLoader yields [x, y] lists; the replay buffer takes tuples (a list part would be a ragged part)."""
    return tuple(batch) if isinstance(batch, list) else batch


class _Timer:
    """Wall time per named section in milliseconds; synchronises CUDA around a section so that the time is the
    section's own work, not work queued before it or still running after it. A section with no name, or whose
    ``keep`` is set False inside it, is not recorded."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.ms = {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        section = types.SimpleNamespace(keep=name is not None)
        yield section
        if self.cuda:
            torch.cuda.synchronize()
        if section.keep:
            self.ms[name] = (time.perf_counter() - start) * 1e3


class ProtectedTrainer(DefenceAttributes):
    """Training steps with optional rehearsal, EWC and gradient protection (see the module doc).

    model, optimizer: what to train; the protections cover whatever the EWC and protector were built over (a
        module's trainable parameters: for a LoRA-wrapped model, the adapters).
    loss_fn(outputs, targets): a mean-reduced loss; batches are ``(inputs, targets)``. The same loss estimates the
        EWC's Fisher in ``end_task``.
    batch_loss(model, batch) -> loss: for other batch structures (a Hugging Face dict of token ids, ...);
        replaces ``loss_fn(model(inputs), targets)`` in ``step``, and estimates the EWC's Fisher in ``end_task``.
    ewc, replay, protector: an ``ff.EWC``, ``ff.ReplayBuffer``, ``ff.GradientProtector`` or None. Each carries
        its own backend (``backend="reference"`` runs it on the pure-torch path).
    replay_weight: the weight of the rehearsal loss; replay_batch_size: examples replayed per step (default: as
        many as the batch has, at most what the buffer holds).
    scaler: a ``torch.amp.GradScaler`` (mixed precision); autocast_dtype: run the forward passes under
        ``torch.autocast`` with this dtype on the parameters' device type.
    kl_to_base, base_model: a KL anchor to the base model (``ff.anchored_lm_loss``'s ``kl_weight``): with a
        ``batch_loss`` that returns ``LMHeadInputs``, every loss becomes mean CE + kl_to_base T^2 KL(p_base || p),
        the base's hidden states coming from ``batch_loss(base_model, batch)`` in a no-grad forward (a frozen
        copy of the model before the new task; a base head that is the model's own head is shared, bias too).
    si: an ``ff.SynapticIntelligence`` (it runs in a ``ProtectedAdamW`` optimizer's step; ``end_task`` consolidates
        it into its EWC).
    defences: more ``ff.defences.Defence`` objects, run after those the keywords build (``self.defences``).
    """

    def __init__(
        self, model, optimizer, loss_fn=None, *, ewc=None, replay=None, protector=None, replay_weight=1.0,
        replay_batch_size=None, scaler=None, autocast_dtype=None, batch_loss=None, kl_to_base=None, base_model=None,
        si=None, defences=None,
    ):  # fmt: skip
        if loss_fn is None and batch_loss is None:
            raise ValueError("pass loss_fn(outputs, targets) or batch_loss(model, batch)")
        self.defences = Defences(
            build_defences(
                defences,
                ewc=ewc,
                replay=replay,
                protector=protector,
                si=si,
                replay_weight=replay_weight,
                replay_batch_size=replay_batch_size,
                kl_to_base=kl_to_base,
                base_model=base_model,
            )  # fmt: skip
        )
        for d in self.defences:
            d.check_model(model)
        anchor = self.defences.task_loss
        if anchor is not None and batch_loss is None:
            raise ValueError(f"{anchor.name} needs batch_loss(model, batch) returning LMHeadInputs")
        self._applied = self.defences.applied_by(optimizer)  # those not run in a ProtectedAdamW's fused step
        self.fused = isinstance(optimizer, ProtectedAdamW)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scaler, self.autocast_dtype = scaler, autocast_dtype
        self.batch_loss = batch_loss if batch_loss is not None else self._pair_loss
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.device = trainable[0].device
        self.steps = 0  # optimizer steps taken (skipped AMP steps not counted)

    def _pair_loss(self, model, batch):
        inputs, targets = batch
        return self.loss_fn(model(inputs), targets)

    def _loss(self, batch):
        """batch_loss's loss; for LMHeadInputs, ff.anchored_lm_loss on them (the task-loss defence's, with the KL
        anchor: with the base model's distribution too)."""
        out = self.batch_loss(self.model, batch)
        anchor = self.defences.task_loss
        if anchor is not None:
            ctx = LossContext(
                self.model, batch, unwrapped=self.model, outputs=out, outputs_of=lambda m: self.batch_loss(m, batch)
            )
            return anchor.task_loss(ctx).value
        if not isinstance(out, LMHeadInputs):
            return out
        from fastforget.ops.anchored_lm_loss import anchored_lm_loss  # on use: only LMHeadInputs batches need it

        return anchored_lm_loss(out.hidden, out.weight, out.labels, bias=out.bias, shift=out.shift)

    def _stored_loss(self, stored):
        """The loss of a batch from the replay buffer (on the trainer's device, under its autocast)."""
        stored = to_device(stored, self.device)
        with self._forward_context():
            return self._loss(stored)

    def _forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch):
        """One protected training step on `batch`; returns its statistics.

        ``{"loss", "replay_loss" (None without a replay sample), "penalty" (0.0 without an EWC), "skipped" (an AMP
        step skipped for inf/NaN gradients), "time_ms": {"replay", "ewc", "protect" (present for the protections
        in use), "step" (the whole step)}}``, and the value of any other defence's loss term under its name. Losses
        are Python floats (one host synchronisation per step).
        """
        timer = _Timer(self.device)
        with timer("step"):
            self.optimizer.zero_grad()
            batch = to_device(batch, self.device)
            with self._forward_context():
                loss = self._loss(batch)
            total, terms = loss, {}
            adding = self.defences.with_hook("loss")
            if adding:
                ctx = LossContext(self.model, batch, batch_size(batch), self._stored_loss, unwrapped=self.model)
            for d in adding:
                # rehearsal: a separate forward pass on stored examples (the seed's form); its backward is part
                # of the one backward below, so "replay" times the sampling and the forward pass
                with timer(d.step_timer) as section:
                    term = d.loss(ctx)
                    section.keep &= term is not None
                if term is not None:
                    total = total + term.weight * term.value
                    terms[term.name] = term.value
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                total.backward()
            penalties = []
            for d in self.defences.with_hook("protect_gradients", self._applied):
                with timer(d.step_timer):
                    penalty = d.protect_gradients(1.0)  # the gradients are unscaled already
                    if penalty is not None:
                        penalties.append(float(penalty))
            skipped = self._optimizer_step()
            if self.fused and any("quadratic" in d.fused_terms for d in self.optimizer.defences):
                penalties.append(float(self.optimizer.penalty))  # of this step, from the fused pass (EWC's)
        self.steps += not skipped
        replay_loss = terms.pop("replay_loss", None)
        return {
            "loss": float(loss.detach()),
            "replay_loss": None if replay_loss is None else float(replay_loss.detach()),
            **{name: float(value.detach()) for name, value in terms.items()},
            "penalty": float(sum(penalties)),
            "skipped": skipped,
            "time_ms": timer.ms,
        }

    def _optimizer_step(self):
        """optimizer.step (through the scaler under AMP); True when AMP skipped it."""
        if self.scaler is None:
            self.optimizer.step()
            return False
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips the step when unscale_ found an inf/NaN gradient
        self.scaler.update()
        return self.scaler.get_scale() < scale  # update() lowers the scale exactly when the step was skipped

    def protection_state_dict(self):
        """{name: state} of the defences with state (as ``ProtectionMixin.protection_state_dict``)."""
        return self.defences.state_dict()

    def load_protection_state_dict(self, state):
        """Restore a ``protection_state_dict()``: every part or none (validated as a whole)."""
        self.defences.load_state_dict(state)

    def end_task(self, loader, *, estimator="empirical", max_batches=None, progress=False):
        """After a task, each defence's ``end_task`` in order: the EWC consolidates at the current parameters over
        `loader` (Fisher by `estimator`, see ``ff.EWC.consolidate``), the replay buffer is offered every batch of
        `loader` and its policy decides what stays. `loader` is iterated once for each (a DataLoader or a list, not
        a generator). Returns ``{"time_ms": {"consolidate", "fill"}}`` for the parts in use."""
        timer = _Timer(self.device)
        task = TaskData(
            self.model, loader, lambda: (_as_buffer_batch(batch) for batch in loader), loss_fn=self.loss_fn,
            batch_loss=None if self.loss_fn else self.batch_loss, estimator=estimator, max_batches=max_batches,
            progress=progress,
        )  # fmt: skip
        for d in self.defences.with_hook("end_task"):
            with timer(d.task_timer):
                d.end_task(task)
        return {"time_ms": timer.ms}
