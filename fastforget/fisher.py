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

Per-sample gradients use ``torch.func`` (functional_call + vmap + grad) in chunks of ``chunk_size`` samples, so
memory is bounded by chunk_size x the trainable parameters (by default as many samples, at most 32, as fit in
``CHUNK_ELEMENTS`` = 2^28 gradient elements: 1 GiB in fp32; a GPT-2-small chunk is 2 samples). Each chunk's stack
of squared gradients is accumulated by one call of the fused ``ff.fisher_update_``. The model runs in eval mode
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

import torch
import torch.distributed as dist
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel

from fastforget import distributed as dist_util
from fastforget._validation import check_distinct
from fastforget.ops.fisher_update import fisher_update_

ESTIMATORS = ("empirical", "batch", "true")
CHUNK_ELEMENTS = 1 << 28


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


def _batches(loader, max_batches, device):
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            return
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(f"batch {index} is not an (inputs, targets) pair")
        inputs, targets = batch
        yield inputs.to(device), targets.to(device)


def _length(loader, max_batches):
    try:
        n = len(loader)
    except TypeError:
        return max_batches
    return n if max_batches is None else min(n, max_batches)


def estimate_fisher(
    model,
    loader,
    loss_fn,
    *,
    estimator="empirical",
    params=None,
    max_batches=None,
    chunk_size=None,
    exact_classes=10,
    generator=None,
    progress=False,
    backend="auto",
):
    """The diagonal Fisher of `model`'s trainable parameters (or `params`: a list of (name, param) of `model`),
    as fp32 tensors shaped like them, estimated over `loader`'s (inputs, targets) batches. See the module doc."""
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
        accumulate = _batch_accumulator(model, tensors, fisher, loss_fn, backend)
    else:
        accumulate = _sample_accumulator(
            model, names, tensors, fisher, loss_fn, estimator, chunk_size, exact_classes, generator, backend
        )
    batches = samples = 0
    with _eval_mode(model):
        for inputs, targets in _batches(loader, max_batches, device):
            accumulate(inputs, targets)
            batches, samples = batches + 1, samples + len(inputs)
            report.update(batches, samples)
    report.close()
    if isinstance(model, DistributedDataParallel) and estimator != "batch":
        samples = _sum_over_ranks(fisher, samples, model.process_group)
    if (batches if estimator == "batch" else samples) == 0:
        raise ValueError("the loader yielded no batches: nothing to estimate the Fisher from")
    torch._foreach_mul_(fisher, 1.0 / (batches if estimator == "batch" else samples))
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


def _batch_accumulator(model, tensors, fisher, loss_fn, backend):
    """F += g_b^2 with g_b the batch's gradient from loss.backward() (so DDP and FSDP2 reduce it over the ranks).

    Every parameter's .grad is stashed first and restored afterwards."""
    module_params = list(model.parameters())

    def accumulate(inputs, targets):
        stashed = [p.grad for p in module_params]
        try:
            for p in module_params:
                p.grad = None
            with torch.enable_grad():
                loss_fn(model(inputs), targets).backward()
            grads = [
                torch.zeros_like(f) if p.grad is None else dist_util.local(p.grad) for p, f in zip(tensors, fisher)
            ]
            fisher_update_(fisher, grads, backend=backend)
        finally:
            for p, g in zip(module_params, stashed):
                p.grad = g

    return accumulate


def _module_names(model, tensors):
    """The names `model` itself gives `tensors` (whatever the caller called them), for functional_call."""
    names = {id(p): n for n, p in model.named_parameters()}
    for i, p in enumerate(tensors):
        if id(p) not in names:
            raise ValueError(f"protected parameter {i} is not a parameter of the model given to estimate the Fisher")
    return [names[id(p)] for p in tensors]


def _sample_accumulator(
    model, names, tensors, fisher, loss_fn, estimator, chunk_size, exact_classes, generator, backend
):
    if isinstance(model, DistributedDataParallel):  # each rank's own samples, no DDP hooks; summed afterwards
        model = model.module
    names = _module_names(model, tensors)
    trainable = dict(zip(names, (p.detach() for p in tensors)))
    protected = {id(p) for p in tensors}
    rest = {n: t.detach() for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) not in protected}

    def sample_loss(weights, x, y):
        output = functional_call(model, (weights, rest), (x.unsqueeze(0),), strict=True)
        return loss_fn(output, y.unsqueeze(0))

    per_sample_grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def add_squares(x, y, weights=None):
        """F += sum_i w_i g(x_i, y_i)^2 over the chunk (w_i = 1 without weights): one fused call per chunk."""
        grads = per_sample_grads(trainable, x, y)
        stacks = [grads[n] for n in names]
        if weights is not None:  # (sqrt(w) g)^2 = w g^2
            roots = weights.sqrt()
            stacks = [g * roots.view(-1, *([1] * (g.dim() - 1))) for g in stacks]
        fisher_update_(fisher, stacks, backend=backend)

    def accumulate(inputs, targets):
        for x, y in zip(inputs.split(chunk_size), targets.split(chunk_size)):
            if estimator == "empirical":
                add_squares(x, y)
                continue
            with torch.no_grad():
                logits = model(x)
            if logits.dim() != 2:
                raise ValueError(
                    f"the true Fisher needs (batch, classes) logits; the model returned {tuple(logits.shape)}"
                )
            probs = torch.softmax(logits.float(), dim=-1)
            classes = probs.shape[-1]
            if classes <= exact_classes:  # E_y g^2 = sum_c p(c|x) g(x, c)^2, exactly
                for c in range(classes):
                    add_squares(x, torch.full_like(y, c), probs[:, c])
            else:  # one label per sample drawn from the model
                add_squares(x, torch.multinomial(probs, 1, generator=generator).squeeze(1).to(y.dtype))

    return accumulate
