"""Stream policies: every example of a batch at once, as the one-at-a-time algorithm would place it.

``reservoir``       Vitter's Algorithm R (Vitter 1985, "Random sampling with a reservoir", ACM TOMS 11(1)): after
                    ``seen`` examples each of them is stored with probability ``capacity / seen``. Vectorised per
                    batch (``stream_targets``): one draw per example, conflicts resolved so that the last writer of
                    a slot wins, exactly as the sequential algorithm would (tested against it, draw for draw).
``random_replace``  the seed's rule, kept for comparison: once full, every example overwrites a uniformly random slot.
                    Biased towards recent data: an example survives ``t`` later ones with probability
                    ``(1 - 1/capacity)^t``, so the buffer mostly holds the last few ``capacity`` examples.
"""

from abc import abstractmethod

import torch

from fastforget.replay.policy import Policy
from fastforget.replay.storage import Storage

DRAW_RANGE = 2**62  # reservoir draws: j = r mod (i + 1) with r uniform in [0, 2^62), bias below (i + 1) / 2^62


def last_write_wins(positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct position once, with the latest (largest) of the rows that write it."""
    unique, inverse = torch.unique(positions, return_inverse=True)
    return unique, torch.full_like(unique, -1).scatter_reduce_(0, inverse, rows, "amax")


def stream_targets(index: torch.Tensor, capacity, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one-at-a-time processing would write each example of a batch. ``index``: each example's 0-based index
    in its stream, ``capacity``: its stream's (a number, or one per example when a batch interleaves several
    streams, such as classes). Every example draws one value (``draw(index)``); index i < capacity fills position i,
    a later example is written at its draw if that is < capacity. Returns (positions, rows) in batch order, hence
    in stream order within each stream: the last write of a position is the largest row that targets it."""
    targets = torch.where(index < capacity, index, draw(index))
    rows = (targets < capacity).nonzero().squeeze(1)
    return targets[rows], rows


def reservoir_draw(generator: torch.Generator):
    """Algorithm R's draw for stream index i: j uniform in [0, i] (as r mod (i + 1), r uniform in [0, DRAW_RANGE))."""
    return lambda index: torch.randint(DRAW_RANGE, index.shape, generator=generator) % (index + 1)


class StreamPolicy(Policy):
    """Slots 0..capacity-1 in stream order, then each later example goes where its draw says (if < capacity)."""

    @abstractmethod
    def draw(self, index: torch.Tensor) -> torch.Tensor:
        """One draw per stream index (used by the examples past the first ``capacity``)."""

    def insert(self, storage: Storage, parts: list, extra, seen: int) -> None:
        size = len(parts[0])
        slots, rows = last_write_wins(*stream_targets(torch.arange(seen, seen + size), self.capacity, self.draw))
        storage.write(slots, parts, rows)
        self.count = min(seen + size, self.capacity)


class Reservoir(StreamPolicy):
    name = "reservoir"

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        return reservoir_draw(self.generator)(index)


class RandomReplace(StreamPolicy):
    name = "random_replace"

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        return torch.randint(self.capacity, index.shape, generator=self.generator)
