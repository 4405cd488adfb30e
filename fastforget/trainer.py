"""The protected training step: the seed's ``protected_training_step`` with fused protections, made real.

One ``step(batch)``:

    zero_grad
    loss = loss(batch)                                   (under autocast when asked)
    + replay_weight * loss(replay.sample(k))             (rehearsal; k = the batch's size by default)
    backward                                             (of the scaled loss under a GradScaler)
    scaler.unscale_(optimizer)                           (AMP: every later step sees true gradients)
    ewc.apply_()                                         (fused: p.grad += 2 lam F (theta - theta*))
    protector.protect_()                                 (fused: shrink high-variance gradients)
    optimizer.step()                                     (scaler.step + scaler.update under AMP)

and ``end_task(loader)`` consolidates the EWC on the task's data and offers the task's batches to the buffer.

With an ``ff.optim.ProtectedAdamW`` as the optimizer, the EWC and protector attached to it run inside its fused
step: the trainer skips its own ``ewc.apply_()`` and ``protector.protect_()`` (its ``ewc``/``protector`` must then
be None or those very objects) and reports the optimizer's recorded penalty.

Why unscale first under AMP: the EWC gradient is in the units of the true gradient, so adding it to gradients that
are still multiplied by the loss scale S would weaken it by S. ``scaler.unscale_`` divides the gradients by S once
(and records whether any is inf/NaN); EWC and the protector then work on true gradients, and ``scaler.step`` reuses
that record: on an overflow it skips the optimizer step. EWC has no per-step state, and the protector checks the
gradients itself and leaves its state untouched on a non-finite step (its ``found_inf``), so a skipped step
changes nothing but the gradients, which the next ``zero_grad`` discards.
"""

import contextlib
import dataclasses
import math
import time

import torch

from fastforget._batch import batch_size, to_device
from fastforget.optim import ProtectedAdamW


def _as_buffer_batch(batch):
    """A DataLoader yields [x, y] lists; the replay buffer takes tuples (a list part would be a ragged part)."""
    return tuple(batch) if isinstance(batch, list) else batch


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


def _check_fused(optimizer, ewc, protector):
    """Whether `optimizer` applies EWC and protection itself (a ProtectedAdamW); then the trainer's own must be
    absent or the optimizer's, so that nothing is applied twice or left out."""
    if not isinstance(optimizer, ProtectedAdamW):
        return False
    for label, mine, theirs in (("ewc", ewc, optimizer.ewc), ("protector", protector, optimizer.protector)):
        if mine is not None and mine is not theirs:
            raise ValueError(
                f"the ProtectedAdamW optimizer applies its own {label}: pass the trainer's {label} to it "
                f"(ProtectedAdamW(..., {label}=...)) or the same object to both"
            )
    return True


class _Timer:
    """Wall time per named section in milliseconds; synchronises CUDA around a section so that the time is the
    section's own work, not work queued before it or still running after it."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.ms = {}

    @contextlib.contextmanager
    def __call__(self, name):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.ms[name] = (time.perf_counter() - start) * 1e3


class ProtectedTrainer:
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
    """

    def __init__(
        self, model, optimizer, loss_fn=None, *, ewc=None, replay=None, protector=None, replay_weight=1.0,
        replay_batch_size=None, scaler=None, autocast_dtype=None, batch_loss=None, kl_to_base=None, base_model=None,
    ):  # fmt: skip
        if loss_fn is None and batch_loss is None:
            raise ValueError("pass loss_fn(outputs, targets) or batch_loss(model, batch)")
        if replay_weight < 0:
            raise ValueError(f"replay_weight must be >= 0, got {replay_weight}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        if kl_to_base is not None:
            if isinstance(kl_to_base, bool) or not isinstance(kl_to_base, (int, float)) or not kl_to_base >= 0:
                raise ValueError(f"kl_to_base must be a number >= 0, got {kl_to_base!r}")
            if not math.isfinite(kl_to_base):
                raise ValueError(f"kl_to_base must be finite, got {kl_to_base}")
            if batch_loss is None or base_model is None:
                raise ValueError("kl_to_base needs batch_loss(model, batch) returning LMHeadInputs and a base_model")
        self.fused = _check_fused(optimizer, ewc, protector)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.ewc, self.replay, self.protector = ewc, replay, protector
        self.replay_weight, self.replay_batch_size = replay_weight, replay_batch_size
        self.scaler, self.autocast_dtype = scaler, autocast_dtype
        self.batch_loss = batch_loss if batch_loss is not None else self._pair_loss
        self.kl_to_base, self.base_model = kl_to_base, base_model
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self.device = trainable[0].device
        self.steps = 0  # optimizer steps taken (skipped AMP steps not counted)

    def _pair_loss(self, model, batch):
        inputs, targets = batch
        return self.loss_fn(model(inputs), targets)

    def _loss(self, batch):
        """batch_loss's loss; for LMHeadInputs, ff.anchored_lm_loss on them (and the base model's, with kl_to_base)."""
        out = self.batch_loss(self.model, batch)
        if not isinstance(out, LMHeadInputs):
            if self.kl_to_base is not None:
                raise TypeError(f"kl_to_base needs batch_loss to return LMHeadInputs, not {type(out).__name__}")
            return out
        from fastforget.ops.anchored_lm_loss import anchored_lm_loss  # on use: only LMHeadInputs batches need it

        ref_hidden = ref_weight = None
        if self.kl_to_base:
            with torch.no_grad():
                base = self.batch_loss(self.base_model, batch)
            ref_hidden = base.hidden
            ref_weight = None if base.weight is out.weight else base.weight
        return anchored_lm_loss(
            out.hidden, out.weight, out.labels, bias=out.bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
            kl_weight=self.kl_to_base or 0.0, shift=out.shift,
        )  # fmt: skip

    def _forward_context(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, batch):
        """One protected training step on `batch`; returns its statistics.

        ``{"loss", "replay_loss" (None without a replay sample), "penalty" (0.0 without an EWC), "skipped" (an AMP
        step skipped for inf/NaN gradients), "time_ms": {"replay", "ewc", "protect" (present for the protections
        in use), "step" (the whole step)}}``. Losses are Python floats (one host synchronisation per step).
        """
        timer = _Timer(self.device)
        with timer("step"):
            self.optimizer.zero_grad()
            batch = to_device(batch, self.device)
            with self._forward_context():
                loss = self._loss(batch)
            total, replay_loss = loss, None
            if self.replay is not None and len(self.replay):
                # rehearsal: a separate forward pass on stored examples (the seed's form); its backward is part
                # of the one backward below, so "replay" times the sampling and the forward pass
                with timer("replay"):
                    k = min(self.replay_batch_size or batch_size(batch), len(self.replay))
                    replayed = to_device(self.replay.sample(k), self.device)
                    with self._forward_context():
                        replay_loss = self._loss(replayed)
                total = loss + self.replay_weight * replay_loss
            if self.scaler is not None:
                self.scaler.scale(total).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                total.backward()
            penalty = 0.0
            if self.ewc is not None and not self.fused:
                with timer("ewc"):
                    penalty = float(self.ewc.apply_())
            if self.protector is not None and not self.fused:
                with timer("protect"):
                    self.protector.protect_()
            skipped = self._optimizer_step()
            if self.fused and self.optimizer.ewc is not None:
                penalty = float(self.optimizer.penalty)  # of this step, from the fused pass
        self.steps += not skipped
        return {
            "loss": float(loss.detach()),
            "replay_loss": None if replay_loss is None else float(replay_loss.detach()),
            "penalty": penalty,
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

    def end_task(self, loader, *, estimator="empirical", max_batches=None, progress=False):
        """After a task: consolidate the EWC at the current parameters over `loader` (Fisher by `estimator`,
        see ``ff.EWC.consolidate``), then offer every batch of `loader` to the replay buffer, whose policy decides
        what stays. `loader` is iterated once for each of the two (a DataLoader or a list, not a generator).
        Returns ``{"time_ms": {"consolidate", "fill"}}`` for the parts in use."""
        timer = _Timer(self.device)
        if self.ewc is not None:
            with timer("consolidate"):
                self.ewc.consolidate(
                    loader, self.loss_fn, batch_loss=None if self.loss_fn else self.batch_loss, estimator=estimator,
                    max_batches=max_batches, progress=progress, model=self.model,
                )  # fmt: skip
        if self.replay is not None:
            with timer("fill"):
                for batch in loader:
                    self.replay.add(_as_buffer_batch(batch))
        return {"time_ms": timer.ms}
