"""The forgetting defences inside Hugging Face's ``transformers.Trainer``: ``ProtectionMixin`` and
``ProtectedHFTrainer`` (= ``ProtectionMixin`` + ``transformers.Trainer``; the mixin goes in front of any Trainer
subclass, e.g. TRL's ``SFTTrainer``).

Per optimizer step, in ``ff.ProtectedTrainer``'s order:

* every micro-batch: the Trainer's loss, plus ``replay_weight`` x the loss of ``replay_batch_size`` stored examples
  (default: the micro-batch's size), padded by the Trainer's own data collator, scaled for gradient accumulation
  exactly as the Trainer scales its own loss; one backward (the Trainer's);
* the micro-batch that completes the accumulation (``accelerator.sync_gradients``): ``ewc.apply_()`` adds
  ``2 lam F (theta - theta*)`` to the gradients once -- what ``lam * penalty`` as part of the loss would add, since
  the accumulated micro-batch losses sum to one step's loss -- then ``protector.protect_()``; then the Trainer
  clips (``max_grad_norm`` clips the total gradient, the EWC term included) and steps the optimizer.

``kl_to_base=lam`` makes the loss ``ff.anchored_lm_loss`` (CE + lam T^2 KL(p_base || p_theta), fused and chunked,
never materialising the logits) on the final hidden states; the base model's come from ``base_model`` (a frozen
copy) or, for a fastforget LoRA model, from the same model under ``ff.lora_disabled``, in a no-grad forward.
``loss_type`` (TRL's ``SFTConfig.loss_type`` names: "nll", "dft", and "eaft"; default: the Trainer's
``args.loss_type`` when it has one, as TRL's ``SFTConfig`` does, else "nll") weights each token's CE inside the same
fused loss: "dft" by the label's probability (DFT; with ``kl_to_base``, ASFT), "eaft" by the entropy-adaptive gate.

The Trainer's logs gain ``ewc_penalty``, ``replay_loss`` and ``kl_loss`` (means since the last log);
``protection_time_ms`` holds the last step's EWC and protection times. ``end_task(dataset=None)`` consolidates the
EWC over a dataset (default: the train dataset) through the Trainer's evaluation dataloader and collator, then
offers its examples to the replay buffer. The EWC, protector and replay states are saved in every checkpoint
(``fastforget_state.pt``) and restored by ``train(resume_from_checkpoint=...)``.

With ``optimizers=(ff.optim.ProtectedAdamW(..., ewc=ewc, protector=protector), None)`` the optimizer applies EWC and
protection inside its fused step and the mixin does not (never twice); the Trainer then clips the task gradient
only, before the step, and ``ewc_penalty`` logs the penalty of the step before.

Mixed precision: bf16 (autocast, no loss scaling) works as is. Under fp16 on a GPU the Trainer's GradScaler still
multiplies the gradients by its scale S when the protections run (accelerate unscales them when clipping): the EWC
term is added multiplied by S and the protector reads g / S, so both act on true gradients.
"""

import math
import os
import time

import torch

from fastforget._batch import to_device
from fastforget.defences import TOKEN_WEIGHTING, check_loss_type
from fastforget.dispatch import BACKENDS
from fastforget.fisher import scalar_loss
from fastforget.lora import lora_disabled, lora_modules
from fastforget.ops.anchored_lm_loss import anchored_lm_loss

try:
    import transformers
except ImportError as error:  # fastforget itself imports without it; this module needs it
    raise ImportError(
        "fastforget.transformers needs Hugging Face transformers: pip install 'transformers>=5' (or fastforget[hf])"
    ) from error

STATE_FILE = "fastforget_state.pt"


def hf_batch_loss(model, batch):
    """The loss a Hugging Face model computes from a batch with ``labels``: the mean over its counted tokens."""
    return model(**batch).loss


class ProtectionMixin:
    """EWC, replay and gradient protection for a ``transformers.Trainer`` subclass (see the module doc).

    ``ewc``, ``replay``, ``protector``: an ``ff.EWC``, ``ff.ReplayBuffer``, ``ff.GradientProtector`` or None.
    ``ewc_estimator``, ``ewc_max_batches``: how ``end_task`` estimates the Fisher (``ff.EWC.consolidate``).
    ``kl_to_base``, ``base_model``, ``kl_backend``: the anchored loss (see the module doc) and its backend.
    ``loss_type``: "nll", "dft" or "eaft" (see the module doc); None takes ``args.loss_type`` if there is one.
    """

    def __init__(
        self, *args, ewc=None, replay=None, protector=None, replay_weight=1.0, replay_batch_size=None,
        ewc_estimator="empirical", ewc_max_batches=None, kl_to_base=None, base_model=None, kl_backend="auto",
        loss_type=None, **kwargs,
    ):  # fmt: skip
        if kl_to_base is not None and (
            isinstance(kl_to_base, bool) or not isinstance(kl_to_base, (int, float)) or not 0 <= kl_to_base < math.inf
        ):
            raise ValueError(f"kl_to_base must be a finite number >= 0, got {kl_to_base!r}")
        if kl_backend not in ("auto", *BACKENDS):
            raise ValueError(f"kl_backend must be 'auto' or one of {BACKENDS}, got {kl_backend!r}")
        if loss_type is not None:
            check_loss_type(loss_type)
        if replay_weight < 0:
            raise ValueError(f"replay_weight must be >= 0, got {replay_weight}")
        if replay_batch_size is not None and replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be >= 1, got {replay_batch_size}")
        super().__init__(*args, **kwargs)
        self.ewc, self.replay, self.protector = ewc, replay, protector
        self.replay_weight, self.replay_batch_size = replay_weight, replay_batch_size
        self.ewc_estimator, self.ewc_max_batches = ewc_estimator, ewc_max_batches
        self.kl_to_base, self.base_model, self.kl_backend = kl_to_base, base_model, kl_backend
        self.token_weighting = TOKEN_WEIGHTING[check_loss_type(loss_type or getattr(self.args, "loss_type", "nll"))]
        if kl_to_base is not None and base_model is None and not lora_modules(self.model):
            raise ValueError(
                "kl_to_base needs the base model's distribution: pass base_model= (a frozen copy), or train a "
                "fastforget LoRA model, whose base outputs come from the same model under ff.lora_disabled"
            )
        self.protection_time_ms = {}
        self._protection_logs = {"ewc_penalty": [], "replay_loss": [], "kl_loss": []}

    # -------------------------------------------------------------------------------------------- training

    def _scaled_for_accumulation(self, num_items_in_batch):
        """Whether the Trainer takes this micro-batch's loss as already normalised over the accumulated batch (it
        then does not divide it by the accumulation steps): its own rule in training_step."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (self.kl_to_base is not None or self.token_weighting is not None) and model.training:
            result = self._anchored_loss(model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if self.replay is None or not len(self.replay) or not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        replay_loss = self._replay_loss(model, len(next(iter(inputs.values()))))
        self._protection_logs["replay_loss"].append(replay_loss.detach())
        # the replay loss, a mean, must end up divided by the accumulation steps once, as the Trainer's own
        steps = self.current_gradient_accumulation_steps if self._scaled_for_accumulation(num_items_in_batch) else 1
        loss = loss + self.replay_weight / steps * replay_loss
        return (loss, outputs) if return_outputs else loss

    def _anchored_loss(self, model, inputs, return_outputs, num_items_in_batch):
        """CE + kl_to_base T^2 KL(p_base || p_theta) by ff.anchored_lm_loss on the final hidden states (no logits
        materialised but one position's), the base's from base_model, or from this LoRA model under lora_disabled,
        in a no-grad forward. Normalised like the Trainer's own loss: a mean over the micro-batch's counted tokens,
        or their sum over num_items_in_batch when the Trainer normalises over the accumulated batch."""
        if "labels" not in inputs:
            raise ValueError("kl_to_base needs batches with 'labels'")
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        hidden = _final_hidden(model, forward)
        unwrapped = self.accelerator.unwrap_model(model)
        head = unwrapped.get_output_embeddings()
        ref_hidden, ref_head = None, head
        with torch.no_grad():
            if self.base_model is not None and self.kl_to_base:
                ref_hidden, ref_head = _final_hidden(self.base_model, forward), self.base_model.get_output_embeddings()
            elif self.kl_to_base:
                with lora_disabled(unwrapped):
                    ref_hidden, ref_head = _final_hidden(model, forward), unwrapped.get_output_embeddings()
        loss = anchored_lm_loss(
            hidden, head.weight, labels, bias=head.bias, ref_hidden=ref_hidden,
            ref_weight=None if ref_head.weight is head.weight else ref_head.weight, kl_weight=self.kl_to_base or 0.0,
            shift=True, backend=self.kl_backend, token_weighting=self.token_weighting,
        )  # fmt: skip
        if num_items_in_batch is not None and self._scaled_for_accumulation(num_items_in_batch):
            counted = (labels[..., 1:] != -100).sum()
            loss = loss * counted / num_items_in_batch
        if self.kl_to_base is not None:
            self._protection_logs["kl_loss"].append(loss.detach())
        return (loss, None) if return_outputs else loss

    def _replay_loss(self, model, batch_size):
        k = min(self.replay_batch_size or batch_size, len(self.replay))
        stored = self.replay.sample(k)
        if not isinstance(stored, dict):
            raise TypeError(
                f"the replay buffer holds {type(stored).__name__} batches; ProtectionMixin replays examples stored "
                "as dicts of per-example token sequences (what end_task offers), padded by the data collator"
            )
        examples = [{key: part[i] for key, part in stored.items()} for i in range(k)]
        batch = to_device(self.data_collator(examples), self.args.device)
        return scalar_loss(hf_batch_loss(model, batch), "replayed")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of the step: its gradients are complete
            self._protect_gradients()
        return loss

    def _fused_optimizer(self):
        """The ProtectedAdamW that applies this trainer's EWC and protector itself, or None (then the trainer
        applies them). Its EWC and protector must be the trainer's (or absent from the trainer)."""
        from fastforget.optim import ProtectedAdamW

        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        if not isinstance(optimizer, ProtectedAdamW):
            return None
        for label, mine, theirs in (
            ("ewc", self.ewc, optimizer.ewc),
            ("protector", self.protector, optimizer.protector),
        ):
            if mine is not None and mine is not theirs:
                raise ValueError(
                    f"the ProtectedAdamW optimizer applies its own {label}: pass the trainer's {label} to it "
                    f"(ProtectedAdamW(..., {label}=...)) or the same object to both"
                )
        return optimizer

    def _protect_gradients(self):
        self.protection_time_ms = {}
        fused = self._fused_optimizer()
        if fused is not None:  # EWC and protection run inside its step (after the Trainer's clipping)
            if fused.ewc is not None:
                self._protection_logs["ewc_penalty"].append(fused.penalty.detach().clone())  # the previous step's
            return
        # fp16 on a GPU: the gradients are still multiplied by the GradScaler's scale S here (accelerate unscales
        # them when clipping), so the EWC term goes in multiplied by S too, and the protector reads g / S
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        if self.ewc is not None:
            start = time.perf_counter()
            lam = self.ewc.lam
            self.ewc.lam = lam * scale
            try:
                penalty = self.ewc.apply_().detach() / scale
            finally:
                self.ewc.lam = lam
            self._protection_logs["ewc_penalty"].append(penalty)
            self.protection_time_ms["ewc"] = (time.perf_counter() - start) * 1e3
        if self.protector is not None:
            start = time.perf_counter()
            self.protector.protect_(inv_scale=1.0 / scale)
            self.protection_time_ms["protect"] = (time.perf_counter() - start) * 1e3

    def log(self, logs, start_time=None):
        for key, values in self._protection_logs.items():
            if values:
                logs[key] = float(torch.stack(values).float().mean())
                values.clear()
        return super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------- between tasks

    def end_task(self, dataset=None):
        """Consolidate the EWC at the current parameters over `dataset` (default: the train dataset), batched by the
        Trainer's evaluation dataloader and data collator, then offer every example of it to the replay buffer."""
        dataset = self.train_dataset if dataset is None else dataset
        if dataset is None or len(dataset) == 0:
            raise ValueError("end_task needs a non-empty dataset (the Trainer has no train_dataset)")
        timings = {}
        if self.ewc is not None:
            start = time.perf_counter()
            loader = self.get_eval_dataloader(dataset)
            model = self.accelerator.unwrap_model(self.model)
            self.ewc.consolidate(
                loader, batch_loss=hf_batch_loss, estimator=self.ewc_estimator, max_batches=self.ewc_max_batches,
                model=model, progress=False,
            )  # fmt: skip
            timings["consolidate"] = (time.perf_counter() - start) * 1e3
        if self.replay is not None:
            start = time.perf_counter()
            for first in range(0, len(dataset), 256):
                self.replay.add(_example_parts([dataset[i] for i in range(first, min(first + 256, len(dataset)))]))
            timings["fill"] = (time.perf_counter() - start) * 1e3
        return {"time_ms": timings}

    # ---------------------------------------------------------------------------------------------- checkpoints

    def protection_state_dict(self):
        return {
            name: part.state_dict()
            for name, part in (("ewc", self.ewc), ("protector", self.protector), ("replay", self.replay))
            if part is not None
        }

    def load_protection_state_dict(self, state):
        for name, part in (("ewc", self.ewc), ("protector", self.protector), ("replay", self.replay)):
            if (part is None) != (name not in state):
                raise ValueError(f"the checkpoint's protection state {'lacks' if part else 'has'} a {name!r} part")
            if part is not None:
                part.load_state_dict(state[name])

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            torch.save(self.protection_state_dict(), os.path.join(folder, STATE_FILE))

    def train(self, resume_from_checkpoint=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, os.PathLike)):
            path = os.path.join(checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise ValueError(f"{checkpoint} has no {STATE_FILE}: it was not saved by a ProtectionMixin trainer")
            self.load_protection_state_dict(torch.load(path, weights_only=True))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def _final_hidden(model, forward):
    """The model's final hidden states (after its last norm: what the LM head reads), computing the logits of one
    position only where the model allows it."""
    try:
        output = model(**forward, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        output = model(**forward, output_hidden_states=True)
    return output.hidden_states[-1]


def _example_parts(examples):
    """Dataset examples (dicts of token sequences) as one buffer batch: a dict of per-example tensors (ragged)."""
    keys = list(examples[0])
    for i, example in enumerate(examples):
        if list(example) != keys:
            raise ValueError(f"example {i} has keys {list(example)}; expected {keys} like the first")
    return {key: [torch.as_tensor(example[key]) for example in examples] for key in keys}


class ProtectedHFTrainer(ProtectionMixin, transformers.Trainer):
    """``transformers.Trainer`` with EWC, replay and gradient protection (``ProtectionMixin``)."""
