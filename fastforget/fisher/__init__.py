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

Per-sample gradients (``engine.PerSampleGradients``, one engine under the three per-sample estimators) come from
per-layer hooks on one ordinary backward of the batch (``layers``: nn.Linear, PEFT's LoRA layers, fastforget's
LoRALinear, GPT-2's Conv1D, embeddings, and any other leaf module such as a norm), squared (MAS: absolute) and
summed layer by layer with the fused ``ff.fisher_update_``; no per-sample copy of the whole model's gradients is
made, gradient checkpointing, PEFT models and ``enable_input_require_grads`` work. The example losses come from the
batch's one forward: ``loss_fn`` on each example's slice of the outputs, MAS's ``output_norm`` per example, or, for
``batch_loss`` on dict batches with ``labels``, the model's own loss of each example (token-mean cross-entropy after
the shift, checked against ``batch_loss`` on the batch's first example). Where this does not apply (another
``batch_loss``, a layer whose input's dim 0 is not the batch, such as GPT-2's position embedding, a module called
twice, a parameter in a module with no rule) and where ``chunk_size`` is given, ``torch.func`` (functional_call +
vmap + grad) computes them in chunks of ``chunk_size`` samples (by default as many, at most 32, as fit in
``CHUNK_ELEMENTS`` = 2^28 gradient elements), each chunk's stack accumulated by one ``ff.fisher_update_``;
``chunk_size=1``, a padded chunk (a Hugging Face model reads its ``attention_mask``'s values in Python) and a model
vmap refuses (after one warning) run one backward per sample. The model runs in eval mode during estimation (its mode
is restored afterwards); the parameters' ``requires_grad`` and ``.grad`` are left as they were.

Distributed: pass the wrapped model. The ``batch`` estimator runs ``loss.backward()`` on it (the parameters'
``.grad`` are stashed and restored), so DDP all-reduces (averages) each batch's gradient over the ranks and FSDP2
reduce-scatters it: F = 1/B sum_b (mean over ranks of the ranks' b-th batch mean gradients)^2, the single-process
``batch`` Fisher over the union of the ranks' b-th batches when those have equal sizes. Under DDP the per-sample
estimators compute each rank's per-sample gradients on its own samples (the unwrapped module, no DDP hooks), then
sum the squares and the sample counts over the ranks and divide: exactly the single-process Fisher over the union of
the ranks' samples, for any per-rank sample counts, identical on every rank. Under FSDP2 only ``batch`` is supported
(per-sample gradients would need the full parameters on each rank); its results are DTensors sharded like the
parameters. An unwrapped model while torch.distributed runs several processes raises ``ValueError``: each rank
would silently compute the Fisher of its own samples only.
"""

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fastforget import distributed as dist_util
from fastforget.fisher.core import (
    IGNORE_INDEX,
    Progress,
    batch_loss_of,
    batches,
    counted_examples,
    eval_mode,
    loader_length,
    output_norm,
    scalar_loss,
    trainable_parameters,
)
from fastforget.fisher.engine import CHUNK_ELEMENTS, SampleLosses
from fastforget.fisher.estimators import ESTIMATOR_CLASSES, ESTIMATORS

__all__ = [
    "CHUNK_ELEMENTS",
    "ESTIMATORS",
    "ESTIMATOR_CLASSES",
    "IGNORE_INDEX",
    "batch_loss_of",
    "counted_examples",
    "estimate_fisher",
    "fisher_stats",
    "output_norm",
    "scalar_loss",
    "trainable_parameters",
]


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
        losses, pairs = SampleLosses(output_norm, mas=True), False
    else:
        batch_loss, pairs = batch_loss_of(loss_fn, batch_loss)
        losses = SampleLosses(batch_loss, loss_fn if pairs else None)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an integer >= 1, got {samples!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    names, tensors = trainable_parameters(model if params is None else params)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    group = _reduction_group(model, names, tensors, estimator)
    shards = [dist_util.local(p) for p in tensors]
    device = shards[0].device
    fisher = [torch.zeros(s.shape, dtype=torch.float32, device=device) for s in shards]
    if estimator != "batch" and isinstance(model, DistributedDataParallel):  # each rank's own samples, no DDP hooks
        model = model.module
    method = ESTIMATOR_CLASSES[estimator](
        model, tensors, fisher, losses, pairs=pairs, chunk_size=chunk_size, exact_classes=exact_classes,
        samples=samples, generator=generator, backend=backend,
    )  # fmt: skip
    report = Progress(f"fisher [{estimator}]", loader_length(loader, max_batches), progress)
    seen = count = 0
    with eval_mode(model):
        for index, batch in batches(loader, max_batches, device, pairs):
            count += method.accumulate(index, batch)
            seen += 1
            report.update(seen, count)
    report.close()
    if group is not None:
        count = _sum_over_ranks(fisher, count, group)
    if seen == 0:
        raise ValueError("the loader yielded no batches: nothing to estimate the Fisher from")
    if count == 0:
        raise ValueError("no sample of the loader had a counted label (labels are all -100): no Fisher to estimate")
    torch._foreach_mul_(fisher, 1.0 / count)
    return [dist_util.like(f, p) for f, p in zip(fisher, tensors)]


def _reduction_group(model, names, tensors, estimator):
    """The process group the per-sample estimators sum over (None: nothing to sum); raises where a per-rank Fisher
    would be computed silently.

    ``batch`` is reduced by the wrapper's own backward (DDP all-reduces, FSDP2 reduce-scatters each batch's
    gradient); the per-sample estimators run on each rank's samples and sum the squares and counts over the ranks
    of a DDP model; they need the full parameters, so FSDP2 supports ``batch`` only."""
    if dist_util.check_parameters(names, tensors) is not None:
        if estimator != "batch":
            raise ValueError(
                f"the {estimator!r} Fisher needs per-sample gradients of the full parameters; with sharded (FSDP2) "
                "parameters use estimator='batch', or compute it elsewhere and pass it to EWC.load_importance"
            )
        return None
    if isinstance(model, DistributedDataParallel):
        return None if estimator == "batch" else model.process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(
            f"torch.distributed runs {dist.get_world_size()} processes but the model given to estimate the Fisher is "
            "not wrapped: each rank would compute the Fisher of its own samples only. Pass the "
            "DistributedDataParallel-wrapped model (its parameters: params=...), or shard it with FSDP2 "
            "(estimator='batch')"
        )
    return None


def _sum_over_ranks(fisher, samples, group):
    """Sum the unnormalised Fisher tensors (in place, one all-reduce of them all) and the sample counts over the
    ranks; returns the total count."""
    flat = torch.cat([f.reshape(-1) for f in fisher])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(fisher, [part.view_as(f) for part, f in zip(flat.split([f.numel() for f in fisher]), fisher)])
    count = torch.tensor(samples, device=flat.device)
    dist.all_reduce(count, group=group)
    return int(count)


def fisher_stats(fisher):
    """{"mean", "max", "elements"} over all elements of a Fisher (a list of tensors, or of DTensors sharded over one
    mesh: reduced over it, so every rank gets the global figures), as Python numbers."""
    shards = [dist_util.local(f) for f in fisher]
    total = torch.zeros((), dtype=torch.float64, device=shards[0].device)
    peak = torch.zeros_like(total)  # a Fisher is >= 0
    for shard in shards:
        if shard.numel():
            total += shard.sum(dtype=torch.float64)
            peak = torch.maximum(peak, shard.max().double())
    group = next((f.device_mesh.get_group() for f in fisher if dist_util.is_sharded(f)), None)
    if group is not None:
        dist.all_reduce(total, group=group)
        dist_util.all_reduce_max(peak, group)
    elements = sum(f.numel() for f in fisher)
    return {"mean": float(total) / max(elements, 1), "max": float(peak), "elements": elements}
