"""What every replay policy provides (after Avalanche's ``ExemplarsBuffer``, avalanche/training/storage_policy.py:
one class per policy behind one interface). The buffer owns the layout, the storage, ``seen`` and the generator;
a policy decides which slot each offered example goes to and keeps its own bookkeeping."""

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from fastforget.replay.layout import Layout, corrupt
from fastforget.replay.storage import Storage


class Policy(ABC):
    """``count`` examples stored, in the slots ``occupied()``; ``slots`` is how many the storage allocates."""

    name: ClassVar[str]  # the ``policy=`` string of ReplayBuffer
    options: ClassVar[tuple[str, ...]] = ()  # ReplayBuffer keyword arguments that belong to this policy

    def __init__(self, capacity: int, generator: torch.Generator, device: torch.device):
        self.capacity, self.generator, self.device = capacity, generator, device
        self.count = 0

    @property
    def slots(self) -> int:
        return self.capacity

    def checked_batch(self, batch, layout: Layout, parts: list, size: int):
        """What ``insert`` needs from a batch besides its parts (labels, features), checked; None by default."""
        return None

    @abstractmethod
    def insert(self, storage: Storage, parts: list, extra, seen: int) -> None:
        """Offer a checked, non-empty batch (``seen`` examples offered before it)."""

    def occupied(self) -> torch.Tensor:
        """The slots holding the stored examples, in slot order (default: the first ``count``)."""
        return torch.arange(self.count)

    def filled(self) -> torch.Tensor:
        """Every slot holding an example (stored or waiting)."""
        return self.occupied()

    def slots_of(self, picks: torch.Tensor) -> torch.Tensor:
        """The slots of stored examples number ``picks`` (0 <= picks < count)."""
        return picks

    def state_dict(self) -> dict:
        """The policy's own entries of the buffer's state dict (copies)."""
        return {}

    def load_state(self, state: dict, seen: int, count: int) -> None:
        """Take the policy's entries of a buffer state into this fresh policy, checking them (the caller discards
        it on error). Default: the stream invariant, ``count = min(seen, capacity)``."""
        if count != min(seen, self.capacity):
            raise corrupt(f"count={count} after seen={seen} examples; expected min(seen, capacity={self.capacity})")
        self.count = count
