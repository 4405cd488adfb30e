"""Rehearsal (replay) buffers: ``ReplayBuffer`` keeps a bounded sample of a stream of batches for replay.

A batch is a tensor, a tuple or a dict of parts sharing their first (batch) dimension; a part is a tensor or a list
of per-example tensors of varying length (ragged sequences). Storage is allocated once, at the first add: a
``(slots, *shape)`` tensor per tensor part, a list of per-slot tensors per ragged part.

The package follows its seams: ``layout`` (the structure of a batch, checked), ``storage`` (the preallocated slots),
``policy`` (what a policy provides) and one module per policy:

``reservoir``       Vitter's Algorithm R, vectorised per batch, and the seed's ``random_replace`` (reservoir.py).
``class_balanced``  per-class quotas, each class a reservoir of its own examples (class_balanced.py).
``diversity``       greedy k-center coverage in the space of ``feature_fn(batch)`` (diversity.py).
"""

from fastforget.replay.buffer import POLICIES, STATE_KEYS, ReplayBuffer
from fastforget.replay.reservoir import DRAW_RANGE

__all__ = ["DRAW_RANGE", "POLICIES", "STATE_KEYS", "ReplayBuffer"]
