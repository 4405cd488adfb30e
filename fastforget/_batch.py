"""Batches of any structure: an ``(inputs, targets)`` pair, a dict of tensors (a Hugging Face batch, or the
``BatchEncoding`` a tokenizer or collator returns), nested tuples and lists of them. Dim 0 of every tensor is the
example dimension."""

from collections.abc import Mapping

import torch


def to_device(batch, device):
    """The batch with every tensor moved to `device` (tuples, lists and mappings rebuilt, other values kept); a
    mapping becomes a plain dict."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(part, device) for part in batch)
    if isinstance(batch, Mapping):
        return {key: to_device(part, device) for key, part in batch.items()}
    return batch


def batch_size(batch):
    """Examples in a batch: the length of its first part (a tensor's first dimension, or a ragged list's length)."""
    if isinstance(batch, Mapping):
        return len(next(iter(batch.values())))
    return len(batch[0] if isinstance(batch, (tuple, list)) else batch)


def map_examples(batch, fn):
    """`batch` with fn(t) for every tensor t that has an example dimension (dim >= 1); other values kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch) if batch.dim() >= 1 else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_examples(part, fn) for part in batch)
    if isinstance(batch, Mapping):
        return {key: map_examples(part, fn) for key, part in batch.items()}
    return batch


def example_dims(batch):
    """vmap's in_dims for `batch`: 0 for every tensor with an example dimension, None for everything else."""
    if isinstance(batch, torch.Tensor):
        return 0 if batch.dim() >= 1 else None
    if isinstance(batch, (tuple, list)):
        return type(batch)(example_dims(part) for part in batch)
    if isinstance(batch, Mapping):
        return {key: example_dims(part) for key, part in batch.items()}
    return None


def add_example_dim(sample, dims):
    """One example (a batch sliced by vmap with in_dims `dims`, from example_dims) back into a batch of one."""
    if isinstance(sample, torch.Tensor):
        return sample.unsqueeze(0) if dims == 0 else sample
    if isinstance(sample, (tuple, list)):
        return type(sample)(add_example_dim(part, d) for part, d in zip(sample, dims))
    if isinstance(sample, Mapping):
        return {key: add_example_dim(part, dims[key]) for key, part in sample.items()}
    return sample
