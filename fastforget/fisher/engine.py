"""The per-sample-gradient engine every per-sample estimator runs on: sum_s w_s g_s^2 (MAS: sum_s |g_s|) over a
batch's examples, through layer hooks on one ordinary backward where the model allows it (``layers``), else through
torch.func or one backward per sample (``functional``)."""

import logging
from collections.abc import Mapping

import torch

from fastforget._batch import batch_size
from fastforget.fisher.core import model_output, output_norms, scalar_loss, take, token_losses, with_labels
from fastforget.fisher.functional import FunctionalGradients
from fastforget.fisher.layers import LayerHooks, Unsupported

logger = logging.getLogger("fastforget.fisher")

CHUNK_ELEMENTS = 1 << 28  # torch.func: per-sample gradient elements of the whole model held at once (1 GiB fp32)
LOSS_RTOL = 2e-2  # batch_loss on one example against the per-example loss from the batch's output


class SampleLosses:
    """Each example's loss, the one its gradient g_s is of: ``batch_loss`` on the batch of that example alone
    (``loss_fn`` on its slice of (inputs, targets); MAS: ``output_norm``). ``forward`` runs the model once on the
    whole batch and ``per_example`` takes all the examples' losses from that output, for the batch's labels or
    others (the true Fisher's); ``forward`` raises ``Unsupported`` where the losses cannot be taken apart."""

    def __init__(self, batch_loss, loss_fn=None, mas=False):
        self.batch_loss, self.loss_fn, self.mas = batch_loss, loss_fn, mas

    def forward(self, model, batch, index):
        if self.mas or self.loss_fn is not None:
            return model_output(model, batch, pairs=not self.mas)
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            raise Unsupported("batch_loss on batches that are not dicts with labels")
        with torch.no_grad():  # batch_loss must be the model's own loss: checked on the first example
            first = scalar_loss(self.batch_loss(model, take(batch, slice(0, 1))), index)
        output = model_output(model, batch, pairs=False)
        losses = token_losses(output[:1].detach(), labels[:1])
        if losses is None or not torch.allclose(losses[0], first.float(), rtol=LOSS_RTOL, atol=1e-6):
            raise Unsupported("batch_loss is not the model's own (token-mean cross-entropy) loss")
        return output

    def per_example(self, output, batch, index, labels=None):
        if self.mas:
            return output_norms(output, batch)
        if self.loss_fn is not None:
            targets = batch[1] if labels is None else labels
            return torch.stack(
                [scalar_loss(self.loss_fn(output[i : i + 1], targets[i : i + 1]), index) for i in range(len(targets))]
            )
        return token_losses(output, batch["labels"] if labels is None else labels)


class PerSampleGradients:
    """Adds sum_s w_s g_s^2 (or sum_s |g_s|) over a batch's examples to `fisher`.

    Layer hooks by default; with an explicit ``chunk_size`` (or where the hooks do not apply: the first batch they
    refuse switches to it for good) torch.func in chunks of ``chunk_size`` examples, ``chunk_size=1`` a loop.
    ``relabel(logits, batch)``, if given, yields (labels, per-example weights): the batch is added once per labelling
    (the true Fisher's), from one forward of the batch with the hooks."""

    def __init__(self, model, tensors, fisher, losses, absolute, backend, chunk_size=None):
        self.model, self.losses = model, losses
        self.hooks = None
        if chunk_size is None:
            try:
                self.hooks = LayerHooks(model, tensors, fisher, absolute, backend)
            except Unsupported as why:
                logger.info("per-sample Fisher through torch.func: %s", why)
            chunk_size = max(1, min(32, CHUNK_ELEMENTS // sum(p.numel() for p in tensors)))
        self.chunk_size = chunk_size
        self.functional = FunctionalGradients(
            model, tensors, fisher, losses.batch_loss, absolute, backend, loop=chunk_size == 1
        )

    def add(self, batch, index, relabel=None, pairs=False):
        if self.hooks is not None:
            try:
                self.hooks.add(lambda b: self._objectives(b, index, relabel), batch, batch_size(batch))
                return
            except Unsupported as why:  # raised before anything was added
                logger.info("per-sample Fisher through torch.func from batch %s on: %s", index, why)
                self.hooks = None
        if relabel is None:
            return self._add_functional(batch, index, None)
        with torch.no_grad():
            logits = model_output(self.model, batch, pairs)
        for labels, weights in relabel(logits, batch):
            self._add_functional(with_labels(batch, labels, pairs), index, weights)

    def _objectives(self, batch, index, relabel):
        """The per-example loss vectors to backpropagate, one per labelling, from one forward."""
        output = self.losses.forward(self.model, batch, index)
        if relabel is None:
            yield self.losses.per_example(output, batch, index)
            return
        for labels, weights in relabel(output.detach(), batch):  # (sqrt(w) g)^2 = w g^2
            yield self.losses.per_example(output, batch, index, labels) * weights.sqrt()

    def _add_functional(self, batch, index, weights):
        for start in range(0, batch_size(batch), self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            self.functional.add(take(batch, rows), index, None if weights is None else weights[rows])
