"""``class_balanced``: per-class quotas, ``capacity // C`` slots for each of the C classes seen so far, plus one for
the first ``capacity % C`` classes in order of first appearance (Avalanche's ``ClassBalancedBuffer`` with
``adaptive_size=True``); each class is a reservoir of its own examples within its quota (Algorithm R on the class's
own stream, all classes of a batch in one vectorised pass). A new class shrinks the quotas and the classes over
theirs evict uniformly at random down to them (a uniform subset of a uniform sample stays uniform). A class with
fewer examples than its quota leaves the rest of its slots empty."""

from collections.abc import Sequence

import torch

from fastforget.replay.layout import Layout, corrupt
from fastforget.replay.policy import Policy
from fastforget.replay.reservoir import last_write_wins, reservoir_draw, stream_targets
from fastforget.replay.storage import Storage


class ClassBalanced(Policy):
    name = "class_balanced"
    options = ("label_key",)

    def __init__(self, capacity: int, generator: torch.Generator, device: torch.device, *, label_key=None):
        if label_key is not None and (isinstance(label_key, bool) or not isinstance(label_key, int | str)):
            raise TypeError(f"label_key must be a tuple index (int) or a dict key (str), got {label_key!r}")
        super().__init__(capacity, generator, device)
        self.label_key = label_key
        self.classes: list[int] = []  # label of each class, in order of first appearance
        self.class_index: dict[int, int] = {}  # label -> its index in classes
        self.class_seen = torch.zeros(0, dtype=torch.long)  # examples of each class offered so far
        self.owner = torch.full((capacity,), -1, dtype=torch.long)  # class index in each slot, -1 if free

    def checked_batch(self, batch, layout: Layout, parts: list, size: int) -> torch.Tensor:
        """The class labels of a batch (a 1-D integer part), on the CPU."""
        if layout.kind == "tensor":
            raise TypeError("policy='class_balanced' needs labels: add (x, y) tuples or dicts (with label_key)")
        if layout.kind == "dict" and self.label_key is None:
            raise ValueError("policy='class_balanced' with dict batches needs label_key, the key of the labels")
        key = 1 if self.label_key is None else self.label_key
        if layout.kind == "tuple" and isinstance(key, int) and -len(layout.keys) <= key < 0:
            key += len(layout.keys)
        if key not in layout.keys:
            raise ValueError(f"label_key {key!r} is not a part of the batch (parts: {list(layout.keys)})")
        position = layout.keys.index(key)
        labels, spec, name = parts[position], layout.specs[position], layout.names()[position]
        if spec.ragged or spec.dtype.is_floating_point or spec.dtype.is_complex or spec.dtype == torch.bool:
            raise TypeError(
                f"the labels {name} must be an integer tensor, got {'a list' if spec.ragged else spec.dtype}"
            )
        if spec.shape != ():
            raise ValueError(f"the labels {name} must be 1-D (one class per example), got shape {tuple(labels.shape)}")
        return labels.cpu()

    def quotas(self) -> torch.Tensor:
        """Slots of each class: capacity // C, one more for the first capacity % C classes."""
        count = len(self.classes)
        return self.capacity // count + (torch.arange(count) < self.capacity % count)

    def _admit(self, labels: list[int]) -> None:
        """New classes join; every older class over its new quota evicts uniformly at random down to it."""
        old = len(self.classes)
        self.class_index.update((label, old + i) for i, label in enumerate(labels))
        self.classes += labels
        self.class_seen = torch.cat([self.class_seen, torch.zeros(len(labels), dtype=torch.long)])
        quotas = self.quotas()
        for index in range(old):
            held = (self.owner == index).nonzero().squeeze(1)
            excess = len(held) - int(quotas[index])
            if excess > 0:
                self.owner[held[torch.randperm(len(held), generator=self.generator)[:excess]]] = -1

    def insert(self, storage: Storage, parts: list, labels: torch.Tensor, seen: int) -> None:
        """Classes first seen in this batch join first, in order of first appearance; then every example goes
        through Algorithm R on its class's own stream, within the class's quota."""
        values, inverse = torch.unique(labels, return_inverse=True)
        rows = torch.arange(len(labels))
        first_rows = torch.full(values.shape, len(labels)).scatter_reduce_(0, inverse, rows, "amin")
        new = [label for label in values[first_rows.argsort()].tolist() if label not in self.class_index]
        if new:
            self._admit(new)
        classes = torch.tensor([self.class_index[label] for label in values.tolist()])[inverse]
        quotas, in_batch = self.quotas(), torch.bincount(classes, minlength=len(self.classes))
        # each example's index in its class's stream: the class's count so far + its rank among the batch's examples
        # of that class (a stable sort groups them in batch order)
        order = torch.argsort(classes, stable=True)
        rank = torch.empty_like(order)
        rank[order] = rows - (in_batch.cumsum(0) - in_batch)[classes[order]]
        index = self.class_seen[classes] + rank
        positions, writers = stream_targets(index, quotas[classes], reservoir_draw(self.generator))
        # a class's positions 0..quota-1 are its held slots in slot order, then its share of the free slots (free
        # slots in slot order, shared out in class order: each class holds min(seen, quota) examples, so the
        # shortfalls quota - held sum to at most the free slots)
        by_owner = torch.argsort(self.owner, stable=True)  # the free slots (-1), then class 0's, class 1's, ...
        per_owner = torch.bincount(self.owner + 1, minlength=len(self.classes) + 1)
        held, held_start = per_owner[1:], (per_owner.cumsum(0) - per_owner)[1:]
        free_start = (quotas - held).cumsum(0) - (quotas - held)
        owner = classes[writers]
        in_order = torch.where(
            positions < held[owner], held_start[owner] + positions, free_start[owner] + positions - held[owner]
        )
        slots, picked = last_write_wins(by_owner[in_order], writers)
        self.owner[slots] = classes[picked]
        storage.write(slots, parts, picked)
        self.class_seen += in_batch
        self.count = int((self.owner >= 0).sum())

    def occupied(self) -> torch.Tensor:
        return (self.owner >= 0).nonzero().squeeze(1)

    def slots_of(self, picks: torch.Tensor) -> torch.Tensor:
        return self.occupied()[picks]

    def state_dict(self) -> dict:
        return {"classes": list(self.classes), "class_seen": self.class_seen.clone(), "owner": self.owner.clone()}

    def load_state(self, state: dict, seen: int, count: int) -> None:
        """Checks: integer labels, distinct; class_seen >= 0 per class, summing to seen; owner a class index or -1
        per slot; each class within min(its examples, its quota); count the occupied slots."""
        missing = [key for key in ("classes", "class_seen", "owner") if key not in state]
        if missing:
            raise corrupt(f"policy='class_balanced' state without {missing}")
        classes, class_seen, owner = state["classes"], state["class_seen"], state["owner"]
        if not isinstance(classes, Sequence) or not all(
            isinstance(label, int) and not isinstance(label, bool) for label in classes
        ):
            raise corrupt(f"classes must be a list of integer labels, got {classes!r}")
        if len(set(classes)) != len(classes):
            raise corrupt(f"classes {list(classes)} has repeats")
        for key, value, shape in (("class_seen", class_seen, (len(classes),)), ("owner", owner, (self.capacity,))):
            if not isinstance(value, torch.Tensor) or value.dtype != torch.long or value.shape != shape:
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise corrupt(f"{key} must be an int64 tensor of shape {shape}, found {found}")
        if bool((class_seen < 0).any()) or int(class_seen.sum()) != seen:
            raise corrupt(f"class_seen {class_seen.tolist()} must be >= 0 and sum to seen={seen}")
        if bool(((owner < -1) | (owner >= len(classes))).any()):
            raise corrupt(f"owner holds a class index outside [-1, {len(classes)}): {owner.tolist()}")
        if int((owner >= 0).sum()) != count:
            raise corrupt(f"count={count} but owner marks {int((owner >= 0).sum())} slots occupied")
        self.classes, self.class_seen, self.owner = [int(label) for label in classes], class_seen.clone(), owner.clone()
        self.class_index = {label: index for index, label in enumerate(self.classes)}
        if self.classes:
            held = torch.bincount(owner[owner >= 0], minlength=len(classes))
            if bool((held > torch.minimum(class_seen, self.quotas())).any()):
                raise corrupt(f"classes hold {held.tolist()} slots, more than their examples or quotas")
        self.count = count
