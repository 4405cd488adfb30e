"""What every Fisher estimator shares: the parameters it covers, batches and their losses, progress, eval mode."""

import contextlib
import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fastforget._batch import map_examples, to_device
from fastforget._validation import check_distinct

IGNORE_INDEX = -100  # labels that count for no loss (Hugging Face's convention)


def trainable_parameters(model_or_named):
    """(names, params): a module's parameters that require grad, or an explicit list of (name, param)."""
    if isinstance(model_or_named, torch.nn.Module):
        named = [(n, p) for n, p in model_or_named.named_parameters() if p.requires_grad]
    else:
        named = list(model_or_named)
        for i, item in enumerate(named):
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], torch.Tensor)):
                raise TypeError(f"parameter list element {i} is not a (name, tensor) pair")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    if not named:
        raise ValueError("there are no trainable parameters to protect")
    tensors = [p for _, p in named]
    check_distinct("parameters", tensors)
    return names, tensors


@contextlib.contextmanager
def eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Progress:
    """A one-line progress report on stderr: 'fisher [empirical]: batch 12/200, 384 samples'."""

    def __init__(self, label, total, enabled):
        self.label, self.total, self.enabled = label, total, enabled

    def update(self, batches, samples):
        if self.enabled:
            of = f"/{self.total}" if self.total is not None else ""
            sys.stderr.write(f"\r{self.label}: batch {batches}{of}, {samples} samples")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def loader_length(loader, max_batches):
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def batches(loader, max_batches, device, pairs):
    """(index, batch on `device`) for the loader's first `max_batches` batches."""
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        if pairs and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"batch {index} is not an (inputs, targets) pair; for other batch structures (e.g. a dict of "
                "token ids) pass batch_loss(model, batch) instead of loss_fn"
            )
        yield index, to_device(tuple(batch) if pairs else batch, device)


def take(batch, rows):
    """The examples `rows` (a slice or a bool mask) of a batch."""
    return map_examples(batch, lambda t: t[rows])


def with_labels(batch, labels, pairs):
    """The batch with its labels (targets of a pair, or a dict's 'labels') replaced by `labels`."""
    return (batch[0], labels) if pairs else {**batch, "labels": labels}


def batch_loss_of(loss_fn, batch_loss):
    """(batch_loss(model, batch), whether batches are (inputs, targets) pairs) from exactly one of the two."""
    if (loss_fn is None) == (batch_loss is None):
        raise ValueError(
            "pass exactly one of loss_fn(outputs, targets), for (inputs, targets) batches, and batch_loss(model, "
            "batch), for any other batch structure (e.g. lambda model, batch: model(**batch).loss)"
        )
    if batch_loss is not None:
        if not callable(batch_loss):
            raise TypeError(f"batch_loss must be callable, not {type(batch_loss).__name__}")
        return batch_loss, False
    return (lambda model, batch: loss_fn(model(batch[0]), batch[1])), True


def scalar_loss(loss, index):
    """`loss`, checked to be what a mean-reduced loss is: a 0-dim floating-point tensor."""
    if loss is None:
        raise ValueError(
            f"batch {index}: the loss is None (a Hugging Face model computes no loss without 'labels' in the batch)"
        )
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"batch {index}: the loss must be a 0-dim floating-point tensor (a mean), got {got}")
    return loss


def model_output(model, batch, pairs):
    """The model's output on a batch without its labels (no loss computed): a HF model's logits."""
    if pairs:
        return model(batch[0])
    if isinstance(batch, Mapping):
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
        return output.logits if hasattr(output, "logits") else output
    return model(batch[0] if isinstance(batch, (tuple, list)) else batch)


def output_norm(model, batch):
    """MAS's per-sample function: the squared L2 norm of the model's output, averaged over the output's positions
    (over the unmasked ones of a dict batch with an attention_mask) and the batch's examples."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    squares = model_output(model, batch, pairs=False).float().square()
    if squares.dim() <= 2:  # (batch, outputs)
        return squares.sum() / len(squares)
    per_position = squares.sum(-1).flatten(1)  # (batch, positions)
    if mask is None:
        return per_position.mean()
    mask = mask.flatten(1).to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum()


def output_norms(output, batch):
    """``output_norm`` of each example on its own, from the model's output on the whole batch: shape (batch,)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    squares = output.float().square()
    if squares.dim() <= 2:
        return squares.reshape(len(squares), -1).sum(1)
    per_position = squares.sum(-1).flatten(1)
    if mask is None:
        return per_position.mean(1)
    mask = mask.flatten(1).to(per_position.dtype)
    return (per_position * mask).sum(1) / mask.sum(1)


def token_losses(logits, labels):
    """Per-example losses from a batch's logits, as a Hugging Face model computes its loss on a batch of one: for
    (batch, seq, vocab) logits the mean cross-entropy over the counted tokens (labels != -100) after the one-token
    shift, for (batch, classes) logits the cross-entropy."""
    if logits.dim() == 2 and labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        return None
    labels = labels[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses.sum(1) / (labels != IGNORE_INDEX).sum(1)


def counted_examples(batch):
    """The examples of a dict batch with token labels (dim >= 2) that have a counted label after the causal shift,
    as a bool mask; None where every example counts."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        return None
    return (labels[:, 1:] != IGNORE_INDEX).flatten(1).any(1)
