"""Per-sample gradients through torch.func (functional_call + vmap + grad), or one backward per sample: the path
for models the layer hooks cannot split, and for an explicit ``chunk_size``."""

import warnings
from collections.abc import Mapping

import torch
from torch.func import functional_call, grad, vmap

from fastforget._batch import add_example_dim, batch_size, example_dims
from fastforget.fisher.core import scalar_loss, take
from fastforget.ops.fisher_update import fisher_update_


class _BatchLoss(torch.nn.Module):
    """batch_loss(model, batch) as a module, so that torch.func.functional_call can swap the model's weights."""

    def __init__(self, model, batch_loss):
        super().__init__()
        self.model, self.batch_loss = model, batch_loss

    def forward(self, batch):
        return self.batch_loss(self.model, batch)


def _module_names(model, tensors):
    """The names `model` itself gives `tensors` (whatever the caller called them), for functional_call."""
    names = {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(tensors):
        if id(p) not in names:
            raise ValueError(f"protected parameter {i} is not a parameter of the model given to estimate the Fisher")
    return [names[id(p)] for p in tensors]


class FunctionalGradients:
    """Adds sum_s w_s g_s^2 (MAS: sum_s |g_s|) over a chunk's examples to `fisher`: vmap'd per-sample gradients,
    or one autograd backward per sample where vmap cannot run (a padded chunk: a HF model reads its attention
    mask's values in Python; chunk_size=1; a model vmap refuses, after one warning)."""

    def __init__(self, model, tensors, fisher, batch_loss, absolute, backend, loop=False):
        self.model, self.tensors, self.fisher, self.batch_loss = model, tensors, fisher, batch_loss
        self.absolute, self.backend, self.loop = absolute, backend, loop
        self.names = _module_names(model, tensors)
        protected = {id(p) for p in tensors}
        self.trainable = {f"model.{n}": p.detach() for n, p in zip(self.names, tensors)}
        self.rest = {
            f"model.{n}": t.detach()
            for n, t in (*model.named_parameters(), *model.named_buffers())
            if id(t) not in protected
        }
        self.wrapper = _BatchLoss(model, batch_loss)

    def add(self, batch, index, weights=None):
        grads = self._grads(batch, index)
        if weights is not None:  # (sqrt(w) g)^2 = w g^2
            roots = weights.sqrt()
            grads = [g * roots.view(-1, *([1] * (g.dim() - 1))) for g in grads]
        fisher_update_(self.fisher, grads, absolute=self.absolute, backend=self.backend)

    def _grads(self, batch, index):
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, torch.Tensor) and bool(mask.all()):  # all ones: the same as none (HF reads it in Python)
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        elif self.loop or isinstance(mask, torch.Tensor):  # padding: one backward per sequence
            return self._looped(batch, index)
        dims = example_dims(batch)

        def sample_loss(weights, sample):
            loss = functional_call(self.wrapper, (weights, self.rest), (add_example_dim(sample, dims),), strict=True)
            return scalar_loss(loss, index)

        try:
            grads = vmap(grad(sample_loss), in_dims=(None, dims))(self.trainable, batch)
        except RuntimeError as error:  # not ValueError: scalar_loss's own errors pass unchanged
            warnings.warn(
                f"per-sample gradients through torch.func (vmap) failed for this model ({error}); computing them "
                "with one backward per sample instead",
                stacklevel=4,
            )
            self.loop = True
            return self._looped(batch, index)
        return [grads[f"model.{n}"] for n in self.names]

    def _looped(self, batch, index):
        stacks = [[] for _ in self.tensors]
        for i in range(batch_size(batch)):
            with torch.enable_grad():
                loss = scalar_loss(self.batch_loss(self.model, take(batch, slice(i, i + 1))), index)
                grads = torch.autograd.grad(loss, self.tensors, allow_unused=True)
            for stack, p, g in zip(stacks, self.tensors, grads):
                stack.append(torch.zeros_like(p) if g is None else g)
        return [torch.stack(stack) for stack in stacks]
