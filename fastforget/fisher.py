"""Diagonal Fisher information estimators for EWC.

For N samples (x_i, y_i), a model p_theta(y | x) and the user's mean-reduced loss l(output, target) (for
classification, cross-entropy = -log p_theta(y | x)), with g(x, y) = d l(model(x), y) / d theta:

* ``empirical``: F = 1/N sum_i g(x_i, y_i)^2 -- per-sample gradients at the TRUE labels. What Kirkpatrick et al.
  call the Fisher in most public code; a biased estimate of the true Fisher (it uses the data's labels).
* ``batch``: F = 1/B sum_b (1/|b| sum_{i in b} g(x_i, y_i))^2 -- the square of each mini-batch's MEAN gradient,
  averaged over batches (Avalanche's EWC). Cheap (one backward per batch) but it squares after averaging, so it
  underestimates the empirical Fisher by about a factor |b| where per-sample gradients disagree.
* ``true``: F = 1/N sum_i E_{y ~ p_theta(.|x_i)} g(x_i, y)^2 -- labels from the model's own predictive distribution
  (the Fisher information proper). With at most ``exact_classes`` classes the expectation is computed exactly,
  sum_c p_theta(c | x_i) g(x_i, c)^2; otherwise one label per sample is drawn from p_theta(. | x_i). Assumes the
  model outputs class logits in its last dimension.

* ``mas`` (Memory Aware Synapses, Aljundi et al. 2018): Omega = 1/N sum_i |d ||f(x_i)||^2 / d theta| -- label-free:
  f is the model's output (a HF model's logits), its squared L2 norm averaged over the output's positions (the
  unmasked ones of a dict batch with an ``attention_mask``); per-sample gradients as ``empirical``, their absolute
  values accumulated by ``fisher_update_(..., absolute=True)``. ``loss_fn`` / ``batch_loss`` are not used: batches
  are inputs, ``(inputs, ...)`` tuples or dicts of model arguments (``labels`` dropped).

Batches: ``(inputs, targets)`` pairs with ``loss_fn(outputs, targets)``, or any structure -- a Hugging Face dict
``{"input_ids", "attention_mask", "labels"}``, a tokenizer's ``BatchEncoding`` -- with ``batch_loss(model, batch) ->
scalar loss`` (e.g. ``lambda m, b: m(**b).loss``). A per-sample batch is the batch sliced along dim 0: one sequence
is one sample, and its loss is what ``batch_loss`` computes on it -- for a HF causal LM the mean over the
sequence's counted tokens (labels != -100, after the model's shift), so every sequence weighs the same in F
whatever its length, and F is the Fisher of the per-token mean loss (not of the sum: that would scale F by
about the squared token count). A sequence with no counted token has no loss and is not a sample.

For language models (``(batch, seq, vocab)`` logits; dict batches with ``labels``), ``true`` draws ``samples``
labels per position from p_theta(. | x_<t) at every position the labels count (a label at t is predicted by the
logits at t - 1, as HF shifts them) and averages g^2 over the draws; a classifier with at most ``exact_classes``
classes keeps the exact expectation.

Per-sample gradients use ``torch.func`` (functional_call + vmap + grad) in chunks of ``chunk_size`` samples, so
memory is bounded by chunk_size x the trainable parameters (by default as many samples, at most 32, as fit in
``CHUNK_ELEMENTS`` = 2^28 gradient elements: 1 GiB in fp32; a GPT-2-small chunk is 2 samples). Each chunk's stack
of squared gradients is accumulated by one call of the fused ``ff.fisher_update_``. ``chunk_size=1`` computes them
in a loop instead, one backward per sample, for models that torch.func cannot vmap (the error says so). A Hugging
Face model reads its ``attention_mask``'s values in Python, which vmap cannot: a chunk whose mask is all ones goes
through vmap without it (the same model output), a padded chunk through the loop. The model runs in eval mode
during estimation (its mode is restored afterwards).

Distributed (pass the wrapped model): the ``batch`` estimator runs ``loss.backward()`` (the parameters' ``.grad``
are stashed and restored), so DDP all-reduces (averages) each batch's gradient over the ranks and FSDP2
reduce-scatters it: F = 1/B sum_b (mean over ranks of the ranks' b-th batch mean gradients)^2, the single-process
``batch`` Fisher over the union of the ranks' b-th batches when those have equal sizes. Under DDP the per-sample
estimators compute each rank's per-sample gradients on its own samples (the unwrapped module, no DDP hooks) and
then sum the squares and the sample counts over the ranks: exactly the single-process Fisher over the union of the
ranks' samples, for any per-rank sample counts, identical on every rank. Under FSDP2 only ``batch`` is supported
(per-sample gradients would need the full parameters on each rank); its results are DTensors sharded like the
parameters.
"""

import contextlib
import sys
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel

from fastforget import distributed as dist_util
from fastforget._batch import add_example_dim, batch_size, example_dims, map_examples, to_device
from fastforget._validation import check_distinct
from fastforget.ops.fisher_update import fisher_update_

ESTIMATORS = ("empirical", "batch", "true", "mas")
CHUNK_ELEMENTS = 1 << 28
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
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Progress:
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


def _batches(loader, max_batches, device, pairs):
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        if pairs and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"batch {index} is not an (inputs, targets) pair; for other batch structures (e.g. a dict of "
                "token ids) pass batch_loss(model, batch) instead of loss_fn"
            )
        yield index, to_device(tuple(batch) if pairs else batch, device)


def output_norm(model, batch):
    """MAS's per-sample function: the squared L2 norm of the model's output, averaged over the output's positions
    (over the unmasked ones of a dict batch with an attention_mask) and the batch's examples."""
    mask = None
    if isinstance(batch, Mapping):
        output = model(**{k: v for k, v in batch.items() if k != "labels"})
        output, mask = (output.logits if hasattr(output, "logits") else output), batch.get("attention_mask")
    else:
        output = model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    squares = output.float().square()
    if squares.dim() <= 2:  # (batch, outputs)
        return squares.sum() / len(squares)
    per_position = squares.sum(-1).flatten(1)  # (batch, positions)
    if mask is None:
        return per_position.mean()
    mask = mask.flatten(1).to(per_position.dtype)
    return (per_position * mask).sum() / mask.sum()


def counted_examples(batch):
    """The examples of a dict batch with token labels (dim >= 2) that have a counted label after the causal shift,
    as a bool mask; None where every example counts."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if not isinstance(labels, torch.Tensor) or labels.dim() < 2:
        return None
    return (labels[:, 1:] != IGNORE_INDEX).flatten(1).any(1)


def _length(loader, max_batches):
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def estimate_fisher(
    model,
    loader,
    loss_fn=None,
    *,
    batch_loss=None,
    estimator="empirical",
    params=None,
    max_batches=None,
    chunk_size=None,
    exact_classes=10,
    samples=1,
    generator=None,
    progress=False,
    backend="auto",
):
    """The diagonal Fisher of `model`'s trainable parameters (or `params`: a list of (name, param) of `model`),
    as fp32 tensors shaped like them, estimated over `loader`'s batches: (inputs, targets) pairs with `loss_fn`,
    or any batch structure with `batch_loss(model, batch)`. `samples`: labels drawn per position by the ``true``
    Fisher of a language model. See the module doc."""
    if estimator == "mas":  # label-free: the output's norm is the per-sample function
        batch_loss, pairs = output_norm, False
    else:
        batch_loss, pairs = batch_loss_of(loss_fn, batch_loss)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    names, tensors = trainable_parameters(model if params is None else params)
    if chunk_size is None:
        chunk_size = max(1, min(32, CHUNK_ELEMENTS // sum(p.numel() for p in tensors)))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    sharded = dist_util.check_parameters(names, tensors) is not None
    if sharded and estimator != "batch":
        raise ValueError(
            f"the {estimator!r} Fisher needs per-sample gradients of the full parameters; with sharded (FSDP2) "
            "parameters use estimator='batch', or compute it elsewhere and pass it to EWC.load_importance"
        )
    shards = [dist_util.local(p) for p in tensors]
    device = shards[0].device
    fisher = [torch.zeros(s.shape, dtype=torch.float32, device=device) for s in shards]
    report = _Progress(f"fisher [{estimator}]", _length(loader, max_batches), progress)
    if estimator == "batch":
        accumulate = _batch_accumulator(model, tensors, fisher, batch_loss, backend)
    else:
        accumulate = _sample_accumulator(
            model,
            tensors,
            fisher,
            batch_loss,
            pairs,
            estimator,
            chunk_size,
            exact_classes,
            samples,
            generator,
            backend,
        )
    batches = count = 0
    with _eval_mode(model):
        for index, batch in _batches(loader, max_batches, device, pairs):
            count += accumulate(index, batch)
            batches += 1
            report.update(batches, count)
    report.close()
    if isinstance(model, DistributedDataParallel) and estimator != "batch":
        count = _sum_over_ranks(fisher, count, model.process_group)
    if batches == 0:
        raise ValueError("the loader yielded no batches: nothing to estimate the Fisher from")
    if count == 0:
        raise ValueError("no sample of the loader had a counted label (labels are all -100): no Fisher to estimate")
    torch._foreach_mul_(fisher, 1.0 / (batches if estimator == "batch" else count))
    return [dist_util.like(f, p) for f, p in zip(fisher, tensors)]


def _sum_over_ranks(fisher, samples, group):
    """Sum the unnormalised Fisher tensors (in place, one all-reduce of them all) and the sample counts over the
    ranks; returns the total count."""
    flat = torch.cat([f.reshape(-1) for f in fisher])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(fisher, [part.view_as(f) for part, f in zip(flat.split([f.numel() for f in fisher]), fisher)])
    count = torch.tensor(samples, device=flat.device)
    dist.all_reduce(count, group=group)
    return int(count)


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


def _batch_accumulator(model, tensors, fisher, batch_loss, backend):
    """F += g_b^2 with g_b the batch's gradient from loss.backward() (so DDP and FSDP2 reduce it over the ranks).

    Every parameter's .grad is stashed first and restored afterwards. Returns the batch's example count."""
    module_params = list(model.parameters())

    def accumulate(index, batch):
        stashed = [p.grad for p in module_params]
        try:
            for p in module_params:
                p.grad = None
            with torch.enable_grad():
                scalar_loss(batch_loss(model, batch), index).backward()
            grads = [
                torch.zeros_like(f) if p.grad is None else dist_util.local(p.grad) for p, f in zip(tensors, fisher)
            ]
            fisher_update_(fisher, grads, backend=backend)
        finally:
            for p, g in zip(module_params, stashed):
                p.grad = g
        return 1

    return accumulate


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


def _take(batch, rows):
    """The examples `rows` (a slice or a bool mask) of a batch."""
    return map_examples(batch, lambda t: t[rows])


def _model_logits(model, batch, pairs):
    """The model's output logits on a batch, without labels (no loss computed)."""
    if pairs:
        return model(batch[0])
    output = model(**{k: v for k, v in batch.items() if k != "labels"})
    return output.logits if hasattr(output, "logits") else output


def _sample_accumulator(
    model, tensors, fisher, batch_loss, pairs, estimator, chunk_size, exact_classes, samples, generator, backend
):
    if isinstance(model, DistributedDataParallel):  # each rank's own samples, no DDP hooks; summed afterwards
        model = model.module
    names = _module_names(model, tensors)
    trainable = {f"model.{n}": p.detach() for n, p in zip(names, tensors)}
    protected = {id(p) for p in tensors}
    rest = {
        f"model.{n}": t.detach()
        for n, t in (*model.named_parameters(), *model.named_buffers())
        if id(t) not in protected
    }
    wrapper = _BatchLoss(model, batch_loss)

    def looped_grads(batch, index):
        """One autograd backward per sample, for models or batches that torch.func cannot vmap."""
        stacks = [[] for _ in tensors]
        for i in range(batch_size(batch)):
            with torch.enable_grad():
                loss = scalar_loss(batch_loss(model, _take(batch, slice(i, i + 1))), index)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
            for stack, p, g in zip(stacks, tensors, grads):
                stack.append(torch.zeros_like(p) if g is None else g)
        return {f"model.{n}": torch.stack(stack) for n, stack in zip(names, stacks)}

    def per_sample_grads(batch, index):
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, torch.Tensor) and bool(mask.all()):  # all ones: the same as none (HF reads it in Python)
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        elif chunk_size == 1 or isinstance(mask, torch.Tensor):  # padding: one backward per sequence
            return looped_grads(batch, index)
        dims = example_dims(batch)

        def sample_loss(weights, sample):
            loss = functional_call(wrapper, (weights, rest), (add_example_dim(sample, dims),), strict=True)
            return scalar_loss(loss, index)

        try:
            return vmap(grad(sample_loss), in_dims=(None, dims))(trainable, batch)
        except RuntimeError as error:  # not ValueError: scalar_loss's own errors pass unchanged
            raise RuntimeError(
                f"per-sample gradients through torch.func (vmap) failed for this model ({error}); pass chunk_size=1 "
                "to compute them in a loop, one backward per sample, or use estimator='batch', which needs only "
                "loss.backward()"
            ) from error

    def add_squares(batch, index, weights=None):
        """F += sum_i w_i g_i^2 over the chunk (w_i = 1 without weights; MAS: sum_i |g_i|): one fused call."""
        grads = per_sample_grads(batch, index)
        stacks = [grads[f"model.{n}"] for n in names]
        if weights is not None:  # (sqrt(w) g)^2 = w g^2
            roots = weights.sqrt()
            stacks = [g * roots.view(-1, *([1] * (g.dim() - 1))) for g in stacks]
        fisher_update_(fisher, stacks, absolute=estimator == "mas", backend=backend)

    def add_true(batch, index):
        """E_{y ~ p_theta} g(x, y)^2: exact over a classifier's classes, else drawn labels."""
        with torch.no_grad():
            logits = _model_logits(model, batch, pairs)
        labels = batch[1] if pairs else batch.get("labels") if isinstance(batch, Mapping) else None
        if not isinstance(labels, torch.Tensor):
            raise ValueError("the true Fisher needs a batch with labels (targets, or a 'labels' entry) to replace")
        with_labels = (lambda y: (batch[0], y)) if pairs else (lambda y: {**batch, "labels": y})
        if logits.dim() == 2:  # a classifier
            probs = torch.softmax(logits.float(), dim=-1)
            classes = probs.shape[-1]
            if classes <= exact_classes:  # E_y g^2 = sum_c p(c|x) g(x, c)^2, exactly
                for c in range(classes):
                    add_squares(with_labels(torch.full_like(labels, c)), index, probs[:, c])
                return
            for _ in range(samples):  # labels drawn from the model
                drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(labels.dtype)
                add_squares(with_labels(drawn), index, torch.full((len(drawn),), 1 / samples, device=drawn.device))
            return
        if logits.dim() != 3 or pairs or labels.shape != logits.shape[:2]:
            raise ValueError(
                f"the true Fisher needs (batch, classes) logits, or (batch, seq, vocab) logits with a dict batch "
                f"whose 'labels' are (batch, seq); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            )
        # a language model: the label at t is predicted by the logits at t - 1 (HF's shift)
        probs = torch.softmax(logits[:, :-1].float(), dim=-1)
        counted = labels[:, 1:] != IGNORE_INDEX
        for _ in range(samples):
            drawn = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(counted.shape)
            sampled = torch.full_like(labels, IGNORE_INDEX)
            sampled[:, 1:] = torch.where(counted, drawn.to(labels.dtype), IGNORE_INDEX)
            add_squares(with_labels(sampled), index, torch.full((len(labels),), 1 / samples, device=labels.device))

    def accumulate(index, batch):
        """Adds the batch's samples (those with a counted label); returns how many."""
        counted = counted_examples(batch) if estimator != "mas" else None  # MAS needs no labels
        if counted is not None and not counted.all():
            batch = _take(batch, counted)
        size = batch_size(batch)
        for start in range(0, size, chunk_size):
            chunk = _take(batch, slice(start, start + chunk_size))
            if estimator in ("empirical", "mas"):
                add_squares(chunk, index)
            else:
                add_true(chunk, index)
        return size

    return accumulate
