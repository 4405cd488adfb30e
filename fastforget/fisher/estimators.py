"""The estimators, one small class each: what a batch contributes (``accumulate``) and what the sum is divided by.
The per-sample ones (``empirical``, ``true``, ``mas``) turn a batch into weighted units for the one
per-sample-gradient engine (``engine.PerSampleGradients``); ``batch`` squares each batch's mean gradient."""

from collections.abc import Mapping

import torch

from fastforget import distributed as dist_util
from fastforget._batch import batch_size
from fastforget.fisher.core import IGNORE_INDEX, counted_examples, scalar_loss, take
from fastforget.fisher.engine import PerSampleGradients
from fastforget.ops.fisher_update import fisher_update_


class PerSampleEstimator:
    """F = 1/N sum_i (weighted) g_i^2 over the N examples with a counted label."""

    name = None
    absolute = False  # accumulate |g| instead of g^2
    labelled = True  # examples without a counted label are no samples
    relabel = None  # or relabel(logits, batch) yielding (labels, weights w): the engine adds sum_s w_s g_s^2 for each

    def __init__(
        self, model, tensors, fisher, losses, *, pairs, chunk_size, exact_classes, samples, generator, backend
    ):
        self.model, self.pairs = model, pairs
        self.exact_classes, self.samples, self.generator = exact_classes, samples, generator
        self.engine = PerSampleGradients(model, tensors, fisher, losses, self.absolute, backend, chunk_size)

    def accumulate(self, index, batch):
        """Adds the batch's samples; returns how many."""
        counted = counted_examples(batch) if self.labelled else None
        if counted is not None and not counted.all():
            batch = take(batch, counted)
        size = batch_size(batch)
        if size:
            self.engine.add(batch, index, self.relabel, self.pairs)
        return size


class Empirical(PerSampleEstimator):
    """g at the data's own labels."""

    name = "empirical"


class MAS(PerSampleEstimator):
    """Memory Aware Synapses: |d ||f(x)||^2 / d theta|, label-free."""

    name = "mas"
    absolute, labelled = True, False


class TrueFisher(PerSampleEstimator):
    """E_{y ~ p_theta(.|x)} g(x, y)^2: exact over a classifier's classes, else labels drawn from the model."""

    name = "true"

    def relabel(self, logits, batch):
        labels = batch[1] if self.pairs else batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            raise ValueError("the true Fisher needs a batch with labels (targets, or a 'labels' entry) to replace")
        share = torch.full((len(labels),), 1 / self.samples, device=labels.device)
        if logits.dim() == 2:  # a classifier
            probs = torch.softmax(logits.float(), dim=-1)
            classes = probs.shape[-1]
            if classes <= self.exact_classes:  # E_y g^2 = sum_c p(c|x) g(x, c)^2, exactly
                for c in range(classes):
                    yield torch.full_like(labels, c), probs[:, c]
                return
            for _ in range(self.samples):  # labels drawn from the model
                drawn = torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(labels.dtype)
                yield drawn, share
            return
        if logits.dim() != 3 or self.pairs or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"the true Fisher needs (batch, classes) logits, or (batch, seq, vocab) logits with a dict batch "
                f"whose 'labels' are (batch, seq); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        # a language model: the label at t is predicted by the logits at t - 1 (HF's shift)
        probs = torch.softmax(logits[:, :-1].float(), dim=-1)
        counted = labels[:, 1:] != IGNORE_INDEX
        for _ in range(self.samples):
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=self.generator).view(counted.shape)
            sampled = torch.full_like(labels, IGNORE_INDEX)
            sampled[:, 1:] = torch.where(counted, drawn.to(labels.dtype), IGNORE_INDEX)
            yield sampled, share


class BatchFisher:
    """F = 1/B sum_b g_b^2 with g_b the batch's gradient from loss.backward() (so DDP and FSDP2 reduce it over the
    ranks). Every parameter's .grad is stashed first and restored afterwards."""

    name = "batch"

    def __init__(self, model, tensors, fisher, losses, *, backend, **_):
        self.model, self.tensors, self.fisher, self.batch_loss = model, tensors, fisher, losses.batch_loss
        self.backend = backend
        self.module_params = list(model.parameters())

    def accumulate(self, index, batch):
        stashed = [p.grad for p in self.module_params]
        try:
            for p in self.module_params:
                p.grad = None
            with torch.enable_grad():
                scalar_loss(self.batch_loss(self.model, batch), index).backward()
            grads = [
                torch.zeros_like(f) if p.grad is None else dist_util.local(p.grad)
                for p, f in zip(self.tensors, self.fisher)
            ]
            fisher_update_(self.fisher, grads, backend=self.backend)
        finally:
            for p, g in zip(self.module_params, stashed):
                p.grad = g
        return 1


ESTIMATOR_CLASSES = {cls.name: cls for cls in (Empirical, BatchFisher, TrueFisher, MAS)}
ESTIMATORS = tuple(ESTIMATOR_CLASSES)
