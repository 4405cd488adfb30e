"""Preallocated slots for the examples of a replay buffer, one store per part of its layout."""

import torch

from fastforget._validation import check_allocation
from fastforget.replay.layout import Layout, Spec, corrupt

POINTER_BYTES = 8  # a ragged part keeps one Python reference per slot


def _is_example(t, spec: Spec) -> bool:
    """Whether `t` is one example of the ragged part `spec`."""
    return isinstance(t, torch.Tensor) and t.dim() > 0 and Spec.of([t]) == spec


class Storage:
    """A ``(slots, *shape)`` tensor per tensor part, a list of per-slot tensors (None where empty) per ragged part.
    Stored and returned tensors are detached copies: the caller's are never aliased, no autograd graph is kept."""

    def __init__(self, layout: Layout, slots: int, device: torch.device, pin_memory: bool):
        check_allocation(f"storage for {slots} examples", self.nbytes(layout, slots), device)
        self.device, self.pin_memory = device, pin_memory
        self.parts = [
            [None] * slots
            if spec.ragged
            else torch.zeros((slots, *spec.shape), dtype=spec.dtype, device=device, pin_memory=pin_memory)
            for spec in layout.specs
        ]

    @staticmethod
    def nbytes(layout: Layout, slots: int) -> int:
        """Bytes allocated up front for `slots` examples (ragged examples are allocated as they are stored)."""
        return slots * (layout.example_bytes() + POINTER_BYTES * sum(spec.ragged for spec in layout.specs))

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        own = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=self.pin_memory)
        return own.copy_(t.detach())

    @torch.no_grad()
    def write(self, slots: torch.Tensor, parts: list, rows: torch.Tensor) -> None:
        """Slot ``slots[i]`` of every part takes example ``rows[i]`` of the batch (``slots`` distinct)."""
        for store, part in zip(self.parts, parts):
            if isinstance(store, list):
                for slot, row in zip(slots.tolist(), rows.tolist()):
                    store[slot] = self._copy(part[row])
            else:
                values = part.index_select(0, rows.to(part.device)).to(self.device)
                store.index_copy_(0, slots.to(self.device), values)

    def gather(self, slots: torch.Tensor) -> list:
        """The examples in ``slots``, as parts (pinned when the storage is)."""
        parts = []
        for store in self.parts:
            if isinstance(store, list):
                parts.append([self._copy(store[slot]) for slot in slots.tolist()])
            elif self.pin_memory:  # gathered straight into page-locked memory, ready for a non_blocking copy
                out = torch.empty((len(slots), *store.shape[1:]), dtype=store.dtype, pin_memory=True)
                parts.append(torch.index_select(store, 0, slots, out=out))
            else:
                parts.append(store.index_select(0, slots.to(self.device)))
        return parts

    def move(self, destinations: torch.Tensor, sources: torch.Tensor) -> None:
        """Slot ``destinations[i]`` takes the example in slot ``sources[i]`` (the two sets disjoint)."""
        for store in self.parts:
            if isinstance(store, list):
                for destination, source in zip(destinations.tolist(), sources.tolist()):
                    store[destination] = store[source]
            else:
                store[destinations.to(self.device)] = store[sources.to(self.device)]

    def to_state(self) -> list:
        return [[None if t is None else t.clone() for t in s] if isinstance(s, list) else s.clone() for s in self.parts]

    def load(self, layout: Layout, data, filled: torch.Tensor) -> None:
        """Copy a ``to_state()`` list in, after checking it against the layout and the slot count, and that every
        ragged part holds an example in each ``filled`` slot."""
        if not isinstance(data, list) or len(data) != len(self.parts):
            count = len(data) if isinstance(data, list) else type(data).__name__
            raise corrupt(f"{count} stored parts for a layout of {len(self.parts)}")
        filled = set(filled.tolist())
        for name, spec, store, saved in zip(layout.names(), layout.specs, self.parts, data):
            if isinstance(store, list):
                valid = isinstance(saved, list) and len(saved) == len(store)
                valid = valid and all(
                    _is_example(t, spec) or (t is None and slot not in filled) for slot, t in enumerate(saved)
                )
            else:
                valid = isinstance(saved, torch.Tensor) and saved.shape == store.shape and saved.dtype == store.dtype
            if not valid:
                raise corrupt(f"the stored {name} does not match the layout")
        for i, (store, saved) in enumerate(zip(self.parts, data)):
            if isinstance(store, list):
                self.parts[i] = [None if t is None else self._copy(t) for t in saved]
            else:
                store.copy_(saved)
