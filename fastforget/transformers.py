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
copy) or, for a fastforget LoRA model or a PEFT model, from the same model with its adapters off
(``ff.lora_disabled``, ``PeftModel.disable_adapter()``), in a no-grad forward.
``loss_type`` (TRL's ``SFTConfig.loss_type`` names: "nll", "dft", and "eaft"; default: the Trainer's
``args.loss_type`` when it has one, as TRL's ``SFTConfig`` does, else "nll") weights each token's CE inside the same
fused loss: "dft" by the label's probability (DFT; with ``kl_to_base``, ASFT), "eaft" by the entropy-adaptive gate.

The Trainer's logs gain ``task_loss`` (the task's loss alone), ``replay_loss``, ``kl_loss`` (the KL term alone, one
more no-grad LM-head pass computes the CE apart) and ``ewc_penalty``: means per optimizer step since the last log,
over the ranks, each micro-batch counted as the Trainer counts it under gradient accumulation (``loss`` stays the
Trainer's: everything differentiated);
``protection_time_ms`` holds the last step's EWC and protection times. ``end_task(dataset=None)`` consolidates the
EWC over a dataset (default: the train dataset; any format the Trainer takes, prepared by its own processing, e.g.
SFTTrainer's raw text or messages) through the Trainer's evaluation dataloader and collator, on the
model as the Trainer wrapped it (under DDP: the Fisher of the union of the ranks' parts, the same on every rank), then
offers its examples to the replay buffer. The EWC, protector and replay states are saved beside the weights by
``save_model`` and in every checkpoint (``fastforget_state.pt``, see ``fastforget.checkpoint``: written atomically
before the Trainer completes the checkpoint), restored by ``train(resume_from_checkpoint=...)`` (``True``: the newest
complete checkpoint) or ``load_protection(folder)``.

With ``optimizers=(ff.optim.ProtectedAdamW(..., ewc=ewc, protector=protector), None)`` the optimizer applies EWC and
protection inside its fused step and the mixin does not (never twice); the Trainer then clips the task gradient
only, before the step, and ``ewc_penalty`` logs the penalty of the step before.

Mixed precision: bf16 (autocast, no loss scaling) works as is. Under fp16 on a GPU the Trainer's GradScaler still
multiplies the gradients by its scale S when the protections run (accelerate unscales them when clipping): the EWC
term is added multiplied by S and the protector reads g / S, so both act on true gradients.
"""

import collections
import os
import sys
import time

import torch

from fastforget import _validation as check
from fastforget._batch import to_device
from fastforget.arguments import ProtectionArguments
from fastforget.callbacks import ForgettingCallback  # noqa: F401  (fastforget.transformers.ForgettingCallback)
from fastforget.checkpoint import STATE_FILE, last_complete_checkpoint, load_state, save_state  # noqa: F401
from fastforget.defences import (
    DefenceAttributes,
    Defences,
    LMHeadInputs,
    LossContext,
    TaskData,
    build_defences,
    foreign_parameter,
)
from fastforget.fisher import scalar_loss

try:
    import transformers
except ImportError as error:  # fastforget itself imports without it; this module needs it
    raise ImportError(
        "fastforget.transformers needs Hugging Face transformers: pip install 'transformers>=5' (or fastforget[hf])"
    ) from error


def hf_batch_loss(model, batch):
    """The loss a Hugging Face model computes from a batch with ``labels``: the mean over its counted tokens."""
    return model(**batch).loss


_DEFAULTS = {
    "replay_weight": 1.0, "ewc_estimator": "empirical", "kl_backend": "auto", "loss_type": "nll"
}  # the others: None  # fmt: skip


def _loss_type(loss_type, args, kwargs):
    """The loss type: given, else the Trainer arguments' ``loss_type`` (TRL's ``SFTConfig``), else "nll"."""
    if loss_type is not None:
        return loss_type
    training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
    return getattr(training_args, "loss_type", None) or "nll"


def _defence_keywords(keywords):
    """The keywords of build_defences among ProtectionMixin's (or ProtectionArguments.build's)."""
    return {key: value for key, value in keywords.items() if key not in ("ewc_estimator", "ewc_max_batches")}


class ProtectionMixin(DefenceAttributes):
    """EWC, replay and gradient protection for a ``transformers.Trainer`` subclass (see the module doc).

    ``ewc``, ``replay``, ``protector``: an ``ff.EWC``, ``ff.ReplayBuffer``, ``ff.GradientProtector`` or None.
    ``ewc_estimator``, ``ewc_max_batches``: how ``end_task`` estimates the Fisher (``ff.EWC.consolidate``).
    ``kl_to_base``, ``base_model``, ``kl_backend``: the anchored loss (see the module doc) and its backend.
    ``si``: an ``ff.SynapticIntelligence`` (it runs in a ``ProtectedAdamW`` optimizer's step).
    ``defences``: more ``ff.defences.Defence`` objects, run after those the keywords build (``self.defences``).
    ``protection_args``: a ``fastforget.arguments.ProtectionArguments`` (e.g. parsed by ``HfArgumentParser``) that
    builds the EWC, replay, protector and KL anchor, and sets their keywords, over the model the Trainer trains
    (after its own preparation, e.g. SFTTrainer's ``peft_config`` wrapping); those keywords are then not given.
    ``loss_type``: "nll", "dft" or "eaft" (see the module doc); None takes ``args.loss_type`` if there is one.
    """

    def __init__(
        self, *args, ewc=None, replay=None, protector=None, replay_weight=1.0, replay_batch_size=None,
        ewc_estimator="empirical", ewc_max_batches=None, kl_to_base=None, base_model=None, kl_backend="auto",
        si=None, defences=None, protection_args=None, loss_type=None, **kwargs,
    ):  # fmt: skip
        keywords = {
            "ewc": ewc, "replay": replay, "protector": protector, "replay_weight": replay_weight,
            "replay_batch_size": replay_batch_size, "ewc_estimator": ewc_estimator, "ewc_max_batches": ewc_max_batches,
            "kl_to_base": kl_to_base, "kl_backend": kl_backend, "loss_type": _loss_type(loss_type, args, kwargs),
        }  # fmt: skip
        if protection_args is not None:
            if not isinstance(protection_args, ProtectionArguments):
                raise TypeError(
                    "protection_args must be a fastforget.arguments.ProtectionArguments, not "
                    f"{type(protection_args).__name__}"
                )
            given = [key for key, value in keywords.items() if value is not None and value != _DEFAULTS.get(key)]
            if given:
                raise ValueError(
                    f"{given[0]}= was passed beside protection_args=, which sets it: set it in the ProtectionArguments"
                )
        else:  # checked before the Trainer is built
            built = Defences(build_defences(defences, si=si, base_model=base_model, **_defence_keywords(keywords)))
        check.optional(check.check_int, "ewc_max_batches", keywords["ewc_max_batches"], minimum=1)
        super().__init__(*args, **kwargs)
        if protection_args is not None:  # over the model the Trainer trains (e.g. SFTTrainer's PeftModel)
            keywords = {**protection_args.build(self.model), "loss_type": keywords["loss_type"]}
            built = Defences(build_defences(defences, si=si, base_model=base_model, **_defence_keywords(keywords)))
        for d in built:
            d.check_model(self.model)
        self.defences, self.ewc_estimator = built, keywords["ewc_estimator"]
        self.ewc_max_batches = keywords["ewc_max_batches"]
        self.protection_time_ms = {}
        # name -> each micro-batch's (or step's) share of its optimizer step's value, since the last log
        self._protection_logs = collections.defaultdict(list)
        self._steps_since_log = 0

    # -------------------------------------------------------------------------------------------- training

    @property
    def _accumulation_steps(self):
        """The Trainer's micro-batches per optimizer step (set by train(); its arguments' value before it runs, e.g.
        for a compute_loss called by hand)."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def _scaled_for_accumulation(self, num_items_in_batch):
        """Whether the Trainer takes this micro-batch's loss as already normalised over the accumulated batch (it
        then does not divide it by the accumulation steps): its own rule in training_step."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _step_share(self, value, num_items_in_batch):
        """A micro-batch's loss as its share of the optimizer step's: the Trainer divides a per-batch mean by the
        accumulation steps, a loss it normalises over the accumulated batch (num_items_in_batch) it takes as is."""
        if self._scaled_for_accumulation(num_items_in_batch):
            return value.detach()
        return value.detach() / self._accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        anchor = self.defences.task_loss
        if anchor is not None and model.training:
            result = self._defence_task_loss(anchor, model, inputs, return_outputs, num_items_in_batch)
        else:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if model.training:
                task = result[0] if return_outputs else result
                self._protection_logs["task_loss"].append(self._step_share(task, num_items_in_batch))
        adding = self.defences.with_hook("loss") if model.training else []
        if not adding:
            return result
        loss, outputs = result if return_outputs else (result, None)
        ctx = LossContext(
            model, inputs, len(next(iter(inputs.values()))), lambda stored: self._stored_loss(model, stored),
            unwrapped=self.accelerator.unwrap_model(model),
        )  # fmt: skip
        for d in adding:
            term = d.loss(ctx)
            if term is None:
                continue
            # the term, a mean, must end up divided by the accumulation steps once, as the Trainer's own loss
            self._protection_logs[term.name].append(term.value.detach() / self._accumulation_steps)
            steps = self._accumulation_steps if self._scaled_for_accumulation(num_items_in_batch) else 1
            loss = loss + term.weight / steps * term.value
        return (loss, outputs) if return_outputs else loss

    def _defence_task_loss(self, anchor, model, inputs, return_outputs, num_items_in_batch):
        """The task loss of the defence that computes it (the KL anchor: CE + kl_to_base T^2 KL(p_base || p_theta)
        by ff.anchored_lm_loss on the final hidden states, no logits materialised but one position's), handed the
        model's LMHeadInputs and a way to get another model's (base_model, or this LoRA model under
        lora_disabled). Normalised like the Trainer's own loss: a mean over the micro-batch's counted tokens, or
        their sum over num_items_in_batch when the Trainer normalises over the accumulated batch."""
        if "labels" not in inputs:
            raise ValueError(f"{anchor.name} needs batches with 'labels'")
        labels = inputs["labels"]
        forward = {k: v for k, v in inputs.items() if k != "labels"}

        def outputs_of(m):
            head = self.accelerator.unwrap_model(m).get_output_embeddings()
            return LMHeadInputs(_final_hidden(m, forward), head.weight, labels, bias=head.bias, shift=True)

        ctx = LossContext(
            model, inputs, unwrapped=self.accelerator.unwrap_model(model), outputs=outputs_of(model),
            outputs_of=outputs_of, split=True,
        )  # fmt: skip
        term = anchor.task_loss(ctx)

        def normalised(loss):
            if num_items_in_batch is None or not self._scaled_for_accumulation(num_items_in_batch):
                return loss
            counted = (labels[..., 1:] != -100).sum()
            ranks = 1  # num_items_in_batch counts every rank's tokens when averaged across devices: as the Trainer
            if self.args.average_tokens_across_devices:
                ranks = self.accelerator.num_processes // self.get_tp_size()
            return loss * counted / num_items_in_batch * ranks

        loss = normalised(term.value)
        for name, part in (term.parts or {term.name: term.value}).items():
            self._protection_logs[name].append(self._step_share(normalised(part), num_items_in_batch))
        return (loss, None) if return_outputs else loss

    def _stored_loss(self, model, stored):
        """The loss of examples from the replay buffer, padded by the Trainer's data collator."""
        if not isinstance(stored, dict):
            raise TypeError(
                f"the replay buffer holds {type(stored).__name__} batches; ProtectionMixin replays examples stored "
                "as dicts of per-example token sequences (what end_task offers), padded by the data collator"
            )
        k = len(next(iter(stored.values())))
        # as the dataset gives them to the collator in training: lists of token ids
        examples = [{key: part[i].tolist() for key, part in stored.items()} for i in range(k)]
        batch = to_device(self.data_collator(examples), self.args.device)
        return scalar_loss(hf_batch_loss(model, batch), "replayed")

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of the step: its gradients are complete
            self._protect_gradients()
        return loss

    def _protect_gradients(self):
        self.protection_time_ms = {}
        self._steps_since_log += 1
        applied = self.defences.applied_by(self.optimizer)  # a ProtectedAdamW applies its own, after clipping
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        for d in getattr(optimizer, "defences", ()):
            if "quadratic" in d.fused_terms:
                self._protection_logs[f"{d.name}_penalty"].append(optimizer.penalty.detach().clone())  # last step's
        # fp16 on a GPU: the gradients are still multiplied by the GradScaler's scale S here (accelerate unscales
        # them when clipping), so the EWC term goes in multiplied by S too, and the protector reads g / S
        scaler = getattr(self.accelerator, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        for d in self.defences.with_hook("protect_gradients", applied):
            start = time.perf_counter()
            penalty = d.protect_gradients(scale)
            if penalty is not None:
                self._protection_logs[f"{d.name}_penalty"].append(penalty)
            if d.step_timer is not None:
                self.protection_time_ms[d.step_timer] = (time.perf_counter() - start) * 1e3

    def log(self, logs, start_time=None):
        """A training log (one with the Trainer's ``loss``) gains each term's mean per optimizer step since the
        last one, over every rank (as the Trainer's own loss): task_loss, replay_loss, kl_loss (the KL term alone),
        ewc_penalty, and other defences' terms."""
        if "loss" in logs:
            steps = max(1, self._steps_since_log)
            logged = self._protection_logs.items()
            sums = {key: float(torch.stack([x.float() for x in v]).sum()) for key, v in logged if v}
            for key, value in _mean_over_ranks(sums).items():
                logs[key] = value / steps
            self._protection_logs.clear()
            self._steps_since_log = 0
        return super().log(logs, start_time)

    # ---------------------------------------------------------------------------------------- between tasks

    def end_task(self, dataset=None):
        """Each defence's ``end_task`` over `dataset` (default: the train dataset), with the model as the Trainer
        wraps it (under DDP the Fisher reduces over the process group): the EWC consolidates at the current
        parameters, batched by the Trainer's evaluation dataloader and data collator, then every example of it is
        offered to the replay buffer as the model inputs the Trainer would feed (no text columns).

        `dataset` is anything the Trainer takes as a train dataset, prepared by its own processing: with TRL's
        SFTTrainer raw text, conversational ("messages"), prompt-completion or tokenised examples (its
        ``_prepare_dataset``: chat template, EOS, tokenising, labels, truncation); with a plain Trainer tokenised
        examples (the columns its model's forward takes). Consolidation shows progress bars on the main process
        unless ``disable_tqdm`` is set."""
        dataset = self.train_dataset if dataset is None else self.task_dataset(dataset)
        if dataset is None or len(dataset) == 0:
            raise ValueError("end_task needs a non-empty dataset (the Trainer has no train_dataset)")
        inputs = self._model_input_columns(_columns(dataset))
        shown = not self.args.disable_tqdm and self.is_world_process_zero()

        def loader():
            batches = self.get_eval_dataloader(dataset)
            total = len(batches) if self.ewc_max_batches is None else min(len(batches), self.ewc_max_batches)
            return _progress(batches, "end_task: Fisher", total, shown)

        def buffer_batches():
            starts = range(0, len(dataset), 256)
            for first in _progress(starts, "end_task: replay buffer", len(starts), shown):
                rows = [dataset[i] for i in range(first, min(first + 256, len(dataset)))]
                yield _example_parts([{key: row[key] for key in inputs} for row in rows])

        task = TaskData(
            self._wrapped_model(), loader, buffer_batches, batch_loss=hf_batch_loss, estimator=self.ewc_estimator,
            max_batches=self.ewc_max_batches,
        )  # fmt: skip
        timings = {}
        for d in self.defences.with_hook("end_task"):
            start = time.perf_counter()
            d.end_task(task)
            if d.task_timer is not None:
                timings[d.task_timer] = (time.perf_counter() - start) * 1e3
        return {"time_ms": timings}

    def task_dataset(self, dataset):
        """`dataset` as the Trainer prepares a train dataset: TRL's SFTTrainer through its own ``_prepare_dataset``
        (a list of examples made a ``datasets.Dataset`` first); a plain Trainer takes it as it is. An unknown
        format raises ValueError before anything runs. What ``end_task`` does to its dataset; for the next task:
        ``trainer.train_dataset = trainer.task_dataset(raw_dataset)``."""
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"end_task needs a dataset with len() and indexing, not {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ValueError("end_task needs a non-empty dataset")
        first = dataset[0]
        if not isinstance(first, dict):
            raise TypeError(f"end_task needs a dataset of dicts (one per example), not of {type(first).__name__}")
        if not _is_sft_trainer(self) or getattr(self, "_skip_prepare_dataset", False):
            self._model_input_columns(list(first))  # raises on a format this Trainer does not feed its model
            return dataset
        text = self.args.dataset_text_field
        formats = {
            "raw text": (text,), "conversational": ("messages",), "conversational (ShareGPT)": ("conversations",),
            "prompt-completion": ("prompt", "completion"), "tokenised": ("input_ids",),
        }  # fmt: skip
        if getattr(self, "_formatting_func", None) is None and not any(
            all(key in first for key in keys) for keys in formats.values()
        ):
            known = "; ".join(f"{name}: {', '.join(map(repr, keys))}" for name, keys in formats.items())
            raise ValueError(
                f"end_task: the dataset's columns {list(first)} are none of the formats SFTTrainer prepares ({known})"
            )
        if isinstance(dataset, list):
            import datasets

            dataset = datasets.Dataset.from_list(dataset)
        packing = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
        return self._prepare_dataset(
            dataset, self.processing_class, self.args, packing, getattr(self, "_formatting_func", None), "end_task"
        )

    def _model_input_columns(self, columns):
        """Those of `columns` that the Trainer feeds its model (its signature columns; all of them with
        ``remove_unused_columns=False``), text columns never: what the replay buffer stores. None raises."""
        self._set_signature_columns_if_needed()
        inputs = [c for c in columns if not self.args.remove_unused_columns or c in self._signature_columns]
        if not inputs:
            raise ValueError(
                f"end_task: the dataset's columns {columns} hold none of the model's inputs "
                f"({', '.join(self._signature_columns)}); {type(self).__name__} trains on tokenised examples: "
                "tokenise the dataset first, or train with TRL's SFTTrainer, which prepares raw text, "
                "conversational and prompt-completion datasets itself"
            )
        return inputs

    def _wrapped_model(self):
        """In distributed training, the model as the Trainer trains it (DDP / FSDP wrapper): the Fisher is reduced
        over its process group, each rank estimating on its part of the (sharded) evaluation dataloader. Under DDP
        before the first train() the model is not wrapped yet: it is prepared here as train() would (train() then
        keeps it). In one process: the bare model (not a DataParallel or torch.compile wrapper)."""
        if self.args.parallel_mode != transformers.training_args.ParallelMode.DISTRIBUTED:
            return self.accelerator.unwrap_model(self.model)
        if self.model_wrapped is self.model and not self.is_fsdp_enabled:
            self.model_wrapped = self.accelerator.prepare_model(self.model)
        return self.model_wrapped

    # ---------------------------------------------------------------------------------------------- checkpoints

    def protection_state_dict(self):
        """{name: state} of the defences with state (``fastforget_state.pt`` in every checkpoint)."""
        return self.defences.state_dict()

    def load_protection_state_dict(self, state):
        """Restore a ``protection_state_dict()``: every part or none (validated as a whole)."""
        self.defences.load_state_dict(state)

    def save_protection(self, folder):
        """Write the defences' state into `folder` (every rank calls it; see ``fastforget.checkpoint``): the
        shared state by the saving rank (``args.should_save``), or through DCP by every rank when it is sharded
        (FSDP2), and with several processes each rank's replay buffer to its own file."""
        save_state(
            self.protection_state_dict(), folder, rank=self.args.process_index, world_size=self.args.world_size,
            writer=self.args.should_save,
        )  # fmt: skip

    def load_protection(self, folder):
        """Restore the defences' state from `folder`: a Trainer checkpoint or a ``save_model`` folder. A missing
        or torn state file raises ValueError naming the folder; the state is validated as a whole before anything
        changes (``load_protection_state_dict``)."""
        state = load_state(
            os.fspath(folder), self.protection_state_dict(), rank=self.args.process_index,
            world_size=self.args.world_size,
        )  # fmt: skip
        self.load_protection_state_dict(state)

    def save_model(self, output_dir=None, _internal_call=False):
        """The Trainer's save_model, with the defences' state (``fastforget_state.pt``) beside the weights.

        This is also where checkpoints get it: transformers' ``Trainer._save_checkpoint`` (5.x) calls
        ``save_model(checkpoint folder)`` first, then saves the optimizer, scheduler and RNG states, then writes
        ``trainer_state.json``, and only then rotates old checkpoints away (``save_total_limit``). The state is
        therefore complete on disk (written atomically) before the checkpoint can count as complete and before
        the previous one may be deleted; overriding ``_save_checkpoint`` itself could only write after rotation.
        It is written before the weights, so that a ``push_to_hub`` at the end of a user's call carries it."""
        # save_state returns on every rank once all ranks' files are on disk: a checkpoint's state is complete
        # before rank 0 writes trainer_state.json
        self.save_protection(self.args.output_dir if output_dir is None else output_dir)
        return super().save_model(output_dir, _internal_call)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """The Trainer's train; resuming also restores the defences' state. ``resume_from_checkpoint=True`` picks
        the newest *complete* checkpoint of ``output_dir`` (its ``trainer_state.json`` and fastforget state both
        whole), skipping newer ones that a kill left unfinished, with a warning naming them."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint, skipped = last_complete_checkpoint(
                self.args.output_dir, world_size=self.args.world_size,
                per_rank=self.replay is not None and self.args.world_size > 1,
            )  # fmt: skip
            for folder, reasons in skipped:
                transformers.utils.logging.get_logger(__name__).warning(
                    f"not resuming from {folder}, which is incomplete ({'; '.join(reasons)})"
                )
            if checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in output_dir {self.args.output_dir}")
        if isinstance(checkpoint, (str, os.PathLike)):
            self.load_protection(checkpoint)
        if not any(isinstance(c, _DefencesHoldTheTrainedParameters) for c in self.callback_handler.callbacks):
            self.add_callback(_DefencesHoldTheTrainedParameters(self))
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)


class _DefencesHoldTheTrainedParameters(transformers.TrainerCallback):
    """At the start of training, once the Trainer has prepared (wrapped, sharded) the model: the EWC and the
    protector must hold the parameters it trains. Accelerate's FSDP2 preparation replaces a module's parameters
    by sharded ones; defences built before it would then read and write tensors nobody trains, silently."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        for defence in self.trainer.defences:
            if foreign_parameter(defence, self.trainer.model) is not None:
                raise ValueError(
                    f"the {defence.name} holds parameters that the trained model does not have (the Trainer replaced "
                    "them when it prepared the model, as accelerate's FSDP2 does, or it was built over another model): "
                    "build it over the model the Trainer trains (under FSDP2: fully_shard the model first)"
                )


def _mean_over_ranks(values):
    """{key: mean over the ranks that logged it} when the Trainer runs on several processes (one all_gather_object,
    so that a rank may lack a key, e.g. with an empty replay buffer, without the collectives getting out of step);
    `values` itself in one process. The Trainer calls log() on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return values
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    keys = dict.fromkeys(key for rank in gathered for key in rank)
    return {key: sum(r[key] for r in gathered if key in r) / sum(key in r for r in gathered) for key in keys}


def _final_hidden(model, forward):
    """The model's final hidden states (after its last norm: what the LM head reads), computing the logits of one
    position only where the model allows it."""
    try:
        output = model(**forward, output_hidden_states=True, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        output = model(**forward, output_hidden_states=True)
    return output.hidden_states[-1]


def _example_parts(examples):
    """Dataset examples (dicts of token sequences) as one buffer batch: a dict of per-example tensors (ragged).
    A column of text (str) is left out: the buffer holds tensors, and the collator pads token ids."""
    keys = list(examples[0])
    for i, example in enumerate(examples):
        if list(example) != keys:
            raise ValueError(f"example {i} has keys {list(example)}; expected {keys} like the first")
    keys = [key for key in keys if not _is_text(examples[0][key])]
    if not keys:
        raise ValueError("end_task: the examples hold only text; the replay buffer stores token ids")
    return {key: [torch.as_tensor(example[key]) for example in examples] for key in keys}


def _is_text(value):
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], str))


def _columns(dataset):
    names = getattr(dataset, "column_names", None)  # a datasets.Dataset
    return list(names) if names is not None else list(dataset[0])


def _is_sft_trainer(trainer):
    """Whether `trainer` is TRL's SFTTrainer (or a subclass); TRL is imported only if the user imported it."""
    trl = sys.modules.get("trl")
    return trl is not None and isinstance(trainer, trl.SFTTrainer)


def _progress(iterable, label, total, shown):
    """`iterable` under a tqdm bar (transformers' own dependency) when `shown`; re-iterable as `iterable` is."""
    if not shown:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=label, total=total, leave=False)


class ProtectedHFTrainer(ProtectionMixin, transformers.Trainer):
    """``transformers.Trainer`` with EWC, replay and gradient protection (``ProtectionMixin``)."""
