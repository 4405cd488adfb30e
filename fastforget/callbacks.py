"""``ForgettingCallback``: watch forgetting while a ``transformers.Trainer`` (or TRL's ``SFTTrainer``) trains.

Every ``interval`` optimizer steps (default: the Trainer's ``eval_steps``, else its ``logging_steps``) and at the
last step, the callback measures the held-out cross-entropy of the model on each "old" dataset and logs

    forgetting/<name>/ce      sum of the token losses / number of counted tokens (nats per token)
    forgetting/<name>/delta   ce - ce before training (measured at on_train_begin): > 0 is forgetting

through the Trainer's log (``transformers.Trainer.log``), so the console, ``trainer.state.log_history`` and every
``report_to`` integration (TensorBoard, W&B, ...) get them. This is the forgetting metric of PEFT's
method-comparison benchmark (huggingface/peft#2925: the mean per-token cross-entropy on a small general-text sample,
after minus before training; next-token targets, as huggingface/peft#3419 fixed them), measured during training
instead of once at the end.

The measurement is cheap and leaves training untouched: no grad, every module in eval mode (each module's own
mode restored afterwards), at most ``max_batches`` batches per dataset, the RNG states (torch, CUDA, Python,
NumPy) restored, so a run with the callback is bitwise the run without. The model runs under the Trainer's own
autocast, as in its evaluation. Under DDP the batches are dealt to the ranks (batch i to rank i mod world size),
each rank sums its token losses and counts, and the two sums are all-reduced: every rank logs the same value,
equal to the one-process value (the batches are the same, only the order of an fp64 sum differs).

Each ``train()`` measures its own "before", except a run resumed from a checkpoint, which keeps the one of the run
it continues (read back from the checkpoint's log history). At the end of training, on the main process,
``forgetting.png`` (learning vs forgetting: the train loss and each delta against the step) is written to
``args.output_dir`` where matplotlib is installed.
"""

import contextlib
import math
import os
import random
from collections.abc import Mapping

import torch
import torch.distributed as dist

from fastforget import _validation as check
from fastforget._batch import to_device

try:
    import transformers
except ImportError as error:  # fastforget itself imports without it; this module needs it
    raise ImportError(
        "fastforget.callbacks needs Hugging Face transformers: pip install 'transformers>=5' (or fastforget[hf])"
    ) from error

PLOT_FILE = "forgetting.png"
IGNORE_INDEX = -100  # the label of tokens no loss is counted on (Hugging Face's and torch's convention)


class ForgettingCallback(transformers.TrainerCallback):
    """Log the cross-entropy on old datasets during training (see the module doc).

    Args:
        trainer: the ``transformers.Trainer`` (any subclass) it reports through; add the callback to it with
            ``trainer.add_callback(callback)`` (the pattern of TRL's ``LogCompletionsCallback``).
        datasets: ``{name: dataset}``. A dataset is a sequence (list, ``torch.utils.data.Dataset``,
            ``datasets.Dataset``) of tokenised examples -- mappings with a 1-D ``input_ids`` (and optionally
            ``attention_mask``, ``labels``; string columns such as ``text`` are dropped), batched
            ``batch_size`` at a time by the data collator -- or of ready batches: mappings whose ``input_ids`` is a
            2-D tensor, used as they are.
        interval: measure every this many optimizer steps; None: the Trainer's ``eval_steps`` if it evaluates by
            steps, else its ``logging_steps``.
        max_batches: at most this many batches per dataset (over all ranks); None: the whole dataset.
        batch_size: examples per batch; None: ``args.per_device_eval_batch_size``.
        data_collator: None: the Trainer's.
        baseline: ``{name: ce}`` the deltas are taken against (e.g. measured once before a sequence of ``train()``
            calls, or on the base model); None: measured at each ``on_train_begin``.
        plot: write ``forgetting.png`` at the end of training (where matplotlib is installed).

    Tokens counted: where the batch's ``labels`` (shifted by one, as causal LMs shift them) are not -100; without
    ``labels``, every next token the attention mask covers.
    """

    def __init__(self, trainer, datasets, *, interval=None, max_batches=16, batch_size=None, data_collator=None,
                 baseline=None, plot=True):  # fmt: skip
        if not isinstance(trainer, transformers.Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, not {type(trainer).__name__}")
        self.interval = check.optional(check.check_int, "interval", interval, minimum=1)
        self.max_batches = check.optional(check.check_int, "max_batches", max_batches, minimum=1)
        self.batch_size = check.optional(check.check_int, "batch_size", batch_size, minimum=1)
        self.plot = check.check_bool("plot", plot)
        if data_collator is not None and not callable(data_collator):
            raise TypeError(f"data_collator must be callable, not {type(data_collator).__name__}")
        self.trainer, self.data_collator = trainer, data_collator
        self.datasets = _check_datasets(datasets)
        self.fixed_baseline = None if baseline is None else _check_baseline(baseline, self.datasets)
        self.baseline = {}  # name -> the ce the deltas are taken against
        self.history = []  # (step, {name: ce}) of this run
        self.plot_path = None

    # ------------------------------------------------------------------------------------------- the events

    def on_train_begin(self, args, state, control, **kwargs):
        self._every = self._resolve_interval(state)
        self.history, self.plot_path = [], None
        if self.fixed_baseline is not None:
            self.baseline = dict(self.fixed_baseline)
            return
        resumed = _baseline_from(state.log_history, self.datasets) if state.global_step > 0 else None
        if resumed is not None:  # resuming from a checkpoint: keep the baseline of the run it continues
            self.baseline = resumed
            return
        self.baseline = self.measure()
        self._log(state, self.baseline)

    def on_step_end(self, args, state, control, **kwargs):
        last = control.should_training_stop or (state.max_steps and state.global_step >= state.max_steps)
        if state.global_step % self._every == 0 or last:
            self._log(state, self.measure())

    def on_train_end(self, args, state, control, **kwargs):
        if not self.history or self.history[-1][0] != state.global_step:
            self._log(state, self.measure())
        if self.plot and state.is_world_process_zero:
            self.plot_path = write_plot(state.log_history, list(self.datasets), args.output_dir)

    # ------------------------------------------------------------------------------------------ measurement

    def measure(self):
        """``{name: ce}`` now: the token-weighted cross-entropy on each dataset, reduced over the ranks."""
        trainer = self.trainer
        model = trainer.model
        modes = [(module, module.training) for module in model.modules()]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        rank = dist.get_rank() if world > 1 else 0
        sums = torch.zeros(len(self.datasets), 2, dtype=torch.float64, device=trainer.args.device)
        try:
            model.eval()
            with _rng_preserved(), torch.no_grad(), trainer.compute_loss_context_manager():
                for row, (dataset, kind) in enumerate(self.datasets.values()):
                    for batch in self._batches(dataset, kind, rank, world):
                        loss, count = token_loss_sum(model, to_device(batch, trainer.args.device))
                        sums[row, 0] += loss
                        sums[row, 1] += count
        finally:
            for module, training in modes:
                module.training = training
        if world > 1:
            dist.all_reduce(sums)
        values = {}
        for (name, _), (loss, count) in zip(self.datasets.items(), sums.tolist()):
            if count == 0:
                raise ValueError(f"dataset {name!r} has no counted token (every label is -100 or masked)")
            values[name] = loss / count
        return values

    def _batches(self, dataset, kind, rank, world):
        """This rank's batches of the dataset's first max_batches (batch i is rank i mod world's): ready batches as
        they are, examples collated."""
        limit = len(dataset) if kind == "batches" else math.ceil(len(dataset) / self._batch_size())
        if self.max_batches is not None:
            limit = min(limit, self.max_batches)
        if kind == "batches":
            for i in range(rank, limit, world):
                yield dataset[i]
            return
        collate = self.data_collator or self.trainer.data_collator
        size = self._batch_size()
        for i in range(rank, limit, world):
            examples = [dataset[j] for j in range(i * size, min((i + 1) * size, len(dataset)))]
            yield collate([{k: v for k, v in e.items() if not isinstance(v, str)} for e in examples])

    def _batch_size(self):
        return self.batch_size or self.trainer.args.per_device_eval_batch_size

    def _resolve_interval(self, state):
        if self.interval is not None:
            return self.interval
        args = self.trainer.args
        evaluates_by_steps = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == "steps"
        every = state.eval_steps if evaluates_by_steps and state.eval_steps else state.logging_steps
        if not every or every < 1:
            raise ValueError(
                f"ForgettingCallback has no interval: pass interval= or set the Trainer's eval_steps/logging_steps "
                f"(found eval_steps={state.eval_steps}, logging_steps={state.logging_steps})"
            )
        return int(every)

    def _log(self, state, values):
        self.history.append((state.global_step, values))
        logs = {}
        for name, ce in values.items():
            logs[f"forgetting/{name}/ce"] = ce
            logs[f"forgetting/{name}/delta"] = ce - self.baseline[name]
        # transformers.Trainer.log itself, not the trainer's override: subclasses drain their own metrics into
        # whatever they log (ProtectionMixin's ewc_penalty, SFTTrainer's mean_token_accuracy), which belong in the
        # Trainer's regular entry. And it clears control.should_log, which the Trainer's own log of this step needs.
        control = self.trainer.control
        pending = control.should_log
        transformers.Trainer.log(self.trainer, logs)
        self.trainer.control.should_log = control.should_log = pending


def token_loss_sum(model, batch):
    """(sum of the next-token cross-entropies, number of counted tokens) of one batch, in fp32 on the logits.

    Targets are the batch's ``labels`` shifted left by one (position t predicts token t + 1, as Hugging Face causal
    LMs shift them), else ``input_ids`` with the positions the attention mask leaves out set to -100."""
    batch = dict(batch)
    labels = batch.pop("labels", None)
    if labels is None:
        labels = batch["input_ids"]
        if "attention_mask" in batch:
            labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    logits = model(**batch).logits
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss.double(), (targets != IGNORE_INDEX).sum()


def write_plot(log_history, names, folder):
    """Learning vs forgetting: the train loss (left axis) and each dataset's delta (right axis) against the step,
    saved as ``folder/forgetting.png``; the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, learning = plt.subplots(figsize=(7, 4))
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if train:
        learning.plot(*zip(*train), color="black", marker=".", label="train loss")
    learning.set_xlabel("optimizer step")
    learning.set_ylabel("train loss (nats/token)")
    forgetting = learning.twinx()
    for name in names:
        key = f"forgetting/{name}/delta"
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        forgetting.plot(*zip(*points), marker="o", label=f"{name}: CE - CE before")
    forgetting.axhline(0.0, color="grey", linewidth=0.5)
    forgetting.set_ylabel("forgetting: CE change on old data (nats/token)")
    handles = [h for axis in (learning, forgetting) for h in axis.get_legend_handles_labels()[0]]
    forgetting.legend(handles, [h.get_label() for h in handles], loc="best")
    learning.set_title("learning vs forgetting")
    fig.tight_layout()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, PLOT_FILE)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- helpers


def _check_datasets(datasets):
    """{name: (dataset, "examples" | "batches")}, every dataset non-empty and of a known format."""
    if not isinstance(datasets, Mapping) or not datasets:
        raise TypeError(f"datasets must be a non-empty dict of name -> dataset, not {type(datasets).__name__}")
    checked = {}
    for name, dataset in datasets.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"datasets' keys must be non-empty strings (the log names), got {name!r}")
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(
                f"dataset {name!r} is a {type(dataset).__name__}; expected a sequence of tokenised examples or of "
                "batches (a list, torch Dataset or datasets.Dataset)"
            )
        if len(dataset) == 0:
            raise ValueError(f"dataset {name!r} has no rows")
        checked[name] = (dataset, _format(name, dataset[0]))
    return checked


def _check_baseline(baseline, datasets):
    if not isinstance(baseline, Mapping) or set(baseline) != set(datasets):
        found = sorted(baseline) if isinstance(baseline, Mapping) else type(baseline).__name__
        raise ValueError(f"baseline must map every dataset name ({sorted(datasets)}) to its CE; got {found}")
    return {name: check.check_real(f"baseline[{name!r}]", baseline[name]) for name in datasets}


def _format(name, first):
    """'examples' (a 1-D input_ids per row) or 'batches' (a 2-D input_ids tensor per row), from the first row."""
    if not isinstance(first, Mapping) or "input_ids" not in first:
        found = sorted(first) if isinstance(first, Mapping) else type(first).__name__
        raise TypeError(
            f"dataset {name!r}: row 0 is {found}; expected a mapping with 'input_ids' (tokenise raw text first, e.g. "
            "dataset.map(lambda row: tokenizer(row['text'])))"
        )
    ids = first["input_ids"]
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        return "batches"
    if (isinstance(ids, torch.Tensor) and ids.dim() == 1) or (
        isinstance(ids, (list, tuple)) and all(isinstance(t, int) for t in ids)
    ):
        return "examples"
    shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
    raise TypeError(
        f"dataset {name!r}: row 0's input_ids is {shape}; expected a 1-D token sequence (an example) or a 2-D "
        "tensor (a ready batch)"
    )


def _baseline_from(log_history, names):
    """The before-training CE of each dataset as the latest logged entry has it (ce - delta), or None."""
    for entry in reversed(log_history):
        if all(f"forgetting/{name}/delta" in entry for name in names):
            return {name: entry[f"forgetting/{name}/ce"] - entry[f"forgetting/{name}/delta"] for name in names}
    return None


@contextlib.contextmanager
def _rng_preserved():
    """Every random state a Trainer run draws from (torch CPU and CUDA, Python, NumPy), restored on exit."""
    states = [random.getstate()]
    try:
        import numpy

        states.append(numpy.random.get_state())
    except ImportError:
        numpy = None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(states[0])
            if numpy is not None:
                numpy.random.set_state(states[1])
