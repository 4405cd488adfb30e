"""Rehearsal (replay) buffers: ``ReplayBuffer`` keeps a bounded sample of a stream of batches for replay.

A batch is a tensor, a tuple or a dict of parts sharing their first (batch) dimension; a part is a tensor or a list
of per-example tensors of varying length (ragged sequences). Storage is allocated once, at the first add: a
``(slots, *shape)`` tensor per tensor part, a list of per-slot tensors per ragged part. Policies:

``reservoir``       Vitter's Algorithm R (Vitter 1985, "Random sampling with a reservoir", ACM TOMS 11(1)): after
                    ``seen`` examples each of them is stored with probability ``capacity / seen``. Vectorised per
                    batch (``_stream_targets``): one draw per example, conflicts resolved so that the last writer
                    of a slot wins, exactly as the sequential algorithm would (tested against it, draw for draw).
``class_balanced``  per-class quotas, ``capacity // C`` slots for each of the C classes seen so far, plus one for the
                    first ``capacity % C`` classes in order of first appearance; each class is a reservoir of its own
                    examples within its quota (Algorithm R on the class's own stream, all classes of a batch in one
                    vectorised pass). A new class shrinks the quotas and the classes over theirs evict uniformly at
                    random down to them (a uniform subset of a uniform sample stays uniform). A class with fewer
                    examples than its quota leaves the rest of its slots empty.
``diversity``       greedy k-center coverage in the space of ``feature_fn(batch)`` (Gonzalez 1985, "Clustering to
                    minimize the maximum intercluster distance", TCS 38; the core-set step of Sener & Savarese 2018,
                    "Active learning for convolutional neural networks: a core-set approach"). Once full, offered
                    examples wait in a pool of ``pool_size`` slots (not sampled, not counted by len); when the pool
                    is full, the farthest-point greedy keeps ``capacity`` of the ``capacity + pool_size``
                    candidates. Cost: ``capacity`` steps of one matrix-vector product over the candidates per
                    reselection, O(capacity (capacity + pool_size) d) per ``pool_size`` examples offered; a larger
                    pool costs memory (storage for capacity + pool_size examples) and reselects less often.
``random_replace``  the seed's rule, kept for comparison: once full, every example overwrites a uniformly random slot.
                    Biased towards recent data: an example survives ``t`` later ones with probability
                    ``(1 - 1/capacity)^t``, so the buffer mostly holds the last few ``capacity`` examples.
"""

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import torch

POLICIES = ("reservoir", "class_balanced", "diversity", "random_replace")
DRAW_RANGE = 2**62  # reservoir draws: j = r mod (i + 1) with r uniform in [0, 2^62), bias below (i + 1) / 2^62
STATE_KEYS = ("policy", "capacity", "pool_size", "label_key", "seen", "count", "generator", "layout", "data")


@dataclass(frozen=True)
class _Spec:
    """A part of a batch: a tensor (``ragged`` False; ``shape`` past the batch dimension) or a list of per-example
    tensors (``ragged`` True; ``shape`` past each example's own first, variable, dimension)."""

    ragged: bool
    dtype: torch.dtype
    shape: tuple[int, ...]

    @staticmethod
    def of(part) -> "_Spec | None":
        """The spec of a checked part (None for an empty list, whose spec is unknown)."""
        if isinstance(part, list):
            return _Spec(True, part[0].dtype, tuple(part[0].shape[1:])) if part else None
        return _Spec(False, part.dtype, tuple(part.shape[1:]))

    def to_state(self) -> dict:
        return {"ragged": self.ragged, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape)}

    @staticmethod
    def from_state(state: dict) -> "_Spec":
        dtype = getattr(torch, state["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"corrupt ReplayBuffer state: unknown dtype {state['dtype']!r}")
        return _Spec(bool(state["ragged"]), dtype, tuple(state["shape"]))


def _part_name(kind: str, key) -> str:
    return "the batch" if kind == "tensor" else f"batch[{key!r}]"


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} is a {type(t).__name__}; parts are tensors or lists of tensors")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")
    if t.dim() == 0:
        raise ValueError(f"{name} is 0-dimensional; it needs a first (batch or length) dimension")


def _check_part(name: str, part) -> None:
    if not isinstance(part, list):
        _check_tensor(name, part)
        return
    for i, item in enumerate(part):
        _check_tensor(f"{name}[{i}]", item)
        if item.dtype != part[0].dtype:
            raise TypeError(f"{name}[{i}] has dtype {item.dtype} but {name}[0] has {part[0].dtype}")
        if item.shape[1:] != part[0].shape[1:]:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(item.shape)} but {name}[0] has {tuple(part[0].shape)}: ragged "
                "examples may differ in their first dimension only"
            )


def _split(batch) -> tuple[str, tuple, list]:
    """(kind, keys, parts) of a batch, every part checked on its own."""
    if isinstance(batch, torch.Tensor):
        kind, keys, parts = "tensor", (None,), [batch]
    elif isinstance(batch, tuple):
        kind, keys, parts = "tuple", tuple(range(len(batch))), list(batch)
    elif isinstance(batch, Mapping):
        kind, keys, parts = "dict", tuple(batch), list(batch.values())
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(f"dict batch keys must be strings, got {key!r}")
    else:
        hint = " (pass tuple(batch) for a list of parts)" if isinstance(batch, list) else ""
        raise TypeError(f"a batch is a Tensor, a tuple or a dict of parts, not a {type(batch).__name__}{hint}")
    if not parts:
        raise ValueError("a batch needs at least one part")
    for key, part in zip(keys, parts):
        _check_part(_part_name(kind, key), part)
    return kind, keys, parts


def _batch_size(kind: str, keys: tuple, parts: list) -> int:
    sizes = [len(part) for part in parts]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"{_part_name(kind, key)} has {size}" for key, size in zip(keys, sizes))
        raise ValueError(f"batch parts have different first dimensions: {listed}")
    return sizes[0]


@dataclass(frozen=True)
class _Layout:
    """The structure every batch of a buffer shares: kind ("tensor", "tuple" or "dict"), keys, one spec per part."""

    kind: str
    keys: tuple
    specs: tuple[_Spec, ...]

    def names(self) -> list[str]:
        return [_part_name(self.kind, key) for key in self.keys]

    def align(self, kind: str, keys: tuple, parts: list) -> list:
        """The parts in this layout's order, after checking that they match it (a dict's key order is free)."""
        if kind != self.kind:
            raise TypeError(f"the buffer holds {self.kind} batches; got a {kind} batch")
        if keys != self.keys:
            if kind != "dict" or set(keys) != set(self.keys):
                raise ValueError(f"the buffer holds batches with parts {list(self.keys)}; got {list(keys)}")
            parts = [dict(zip(keys, parts))[key] for key in self.keys]
        for name, spec, part in zip(self.names(), self.specs, parts):
            got = _Spec.of(part)
            if got is None:
                continue
            if got.ragged != spec.ragged:
                held = "lists of tensors" if spec.ragged else "tensors"
                raise TypeError(f"{name} is a {'list' if got.ragged else 'tensor'} but the buffer holds {held} there")
            if got.dtype != spec.dtype:
                raise TypeError(f"{name} has dtype {got.dtype} but the buffer holds {spec.dtype}")
            if got.shape != spec.shape:
                shapes = f"{got.shape} (past the first dimension) but the buffer holds {spec.shape}"
                raise ValueError(f"{name} has examples of shape {shapes}")
        return parts

    def rebuild(self, parts: list):
        """A batch of this layout's kind from its parts."""
        if self.kind == "tensor":
            return parts[0]
        return tuple(parts) if self.kind == "tuple" else dict(zip(self.keys, parts))

    def to_state(self) -> dict:
        return {"kind": self.kind, "keys": list(self.keys), "specs": [spec.to_state() for spec in self.specs]}

    @staticmethod
    def from_state(state: dict) -> "_Layout":
        keys = (None,) if state["kind"] == "tensor" else tuple(state["keys"])
        return _Layout(state["kind"], keys, tuple(_Spec.from_state(spec) for spec in state["specs"]))


class _Storage:
    """Preallocated slots for every part: a ``(slots, *shape)`` tensor per tensor part, a list of per-slot tensors
    (None where empty) per ragged part. Stored and returned tensors are copies: the caller's are never aliased."""

    def __init__(self, layout: _Layout, slots: int, device: torch.device, pin_memory: bool):
        self.device, self.pin_memory = device, pin_memory
        self.parts = [
            [None] * slots
            if spec.ragged
            else torch.zeros((slots, *spec.shape), dtype=spec.dtype, device=device, pin_memory=pin_memory)
            for spec in layout.specs
        ]

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        own = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=self.pin_memory)
        return own.copy_(t)

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

    def load(self, layout: _Layout, data: list) -> None:
        """Copy a ``to_state()`` list in (checked against the layout and the slot count first)."""
        if len(data) != len(self.parts):
            raise ValueError(f"corrupt ReplayBuffer state: {len(data)} stored parts for a layout of {len(self.parts)}")
        for name, spec, store, saved in zip(layout.names(), layout.specs, self.parts, data):
            if isinstance(store, list):
                valid = isinstance(saved, list) and len(saved) == len(store)
                valid = valid and all(t is None or (t.dtype == spec.dtype and t.shape[1:] == spec.shape) for t in saved)
            else:
                valid = isinstance(saved, torch.Tensor) and saved.shape == store.shape and saved.dtype == store.dtype
            if not valid:
                raise ValueError(f"corrupt ReplayBuffer state: the stored {name} does not match the layout")
        for i, (store, saved) in enumerate(zip(self.parts, data)):
            if isinstance(store, list):
                self.parts[i] = [None if t is None else self._copy(t) for t in saved]
            else:
                store.copy_(saved)


def _last_write_wins(positions: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each distinct position once, with the latest (largest) of the rows that write it."""
    unique, inverse = torch.unique(positions, return_inverse=True)
    return unique, torch.full_like(unique, -1).scatter_reduce_(0, inverse, rows, "amax")


def _stream_targets(index: torch.Tensor, capacity, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Where one-at-a-time processing would write each example of a batch. ``index``: each example's 0-based index
    in its stream, ``capacity``: its stream's (a number, or one per example when a batch interleaves several
    streams, such as classes). Every example draws one value (``draw(index)``); index i < capacity fills position i,
    a later example is written at its draw if that is < capacity. Returns (positions, rows) in batch order, hence
    in stream order within each stream: the last write of a position is the largest row that targets it."""
    targets = torch.where(index < capacity, index, draw(index))
    rows = (targets < capacity).nonzero().squeeze(1)
    return targets[rows], rows


def _reservoir_draw(generator: torch.Generator):
    """Algorithm R's draw for stream index i: j uniform in [0, i] (as r mod (i + 1), r uniform in [0, DRAW_RANGE))."""
    return lambda index: torch.randint(DRAW_RANGE, index.shape, generator=generator) % (index + 1)


def _random_replace_draw(capacity: int, generator: torch.Generator):
    """The seed's draw: a uniformly random slot (used by the examples offered once the buffer is full)."""
    return lambda index: torch.randint(capacity, index.shape, generator=generator)


def _distinct_uniform(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices drawn uniformly from [0, n), in draw order. randperm costs O(n); for n >= 100 k (about
    where a few fixed ops of the other way beat it on a CPU), uniform draws with repeats skipped (the sequential
    definition of sampling without replacement): k draws, then as many more as values are missing, until k."""
    if n < 100 * k:
        return torch.randperm(n, generator=generator)[:k]
    draws, distinct = torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    while len(distinct) < k:
        draws = torch.cat([draws, torch.randint(n, (k - len(distinct),), generator=generator)])
        values, inverse = torch.unique(draws, return_inverse=True)
        distinct = torch.full(values.shape, len(draws)).scatter_reduce_(0, inverse, torch.arange(len(draws)), "amin")
    return draws[distinct.sort().values]


def _k_center_greedy(features: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Gonzalez's farthest-point greedy over the rows of ``features`` (n, d): start from the row farthest from the
    mean, then add, k - 1 times, the row farthest from every row chosen so far. Returns the k chosen indices and the
    covering radius max_x min_c |x - c| over all rows (at most twice the optimal k-center radius). Each step is one
    matrix-vector product over all n rows: O(k n d) in all."""
    columns = features.T.contiguous().T  # column-major: the product below runs about 25 % faster on a CPU
    squared_norms = features.square().sum(1)
    nearest = torch.full_like(squared_norms, math.inf)  # squared distance from each row to its nearest chosen row
    pick, chosen = (features - features.mean(0)).square().sum(1).argmax(), []
    for _ in range(k):
        chosen.append(pick)
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2 for every row x at once (torch.cdist's matrix-product form)
        distances = torch.addmv(squared_norms, columns, features[pick], alpha=-2).add_(squared_norms[pick])
        torch.minimum(nearest, distances, out=nearest)
        nearest[pick] = -math.inf  # never picked again, even where rounding leaves it a distance above 0
        pick = nearest.argmax()
    return torch.stack(chosen), nearest.max().clamp_min(0).sqrt().item()


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _own_generator(generator) -> torch.Generator:
    """The given CPU generator, or a new one seeded from torch's global RNG (so torch.manual_seed fixes it)."""
    if generator is None:
        return torch.Generator().manual_seed(int(torch.randint(DRAW_RANGE, ())))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, not {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator (the buffer's bookkeeping is on the CPU), got {generator.device}"
        )
    return generator


class ReplayBuffer:
    """A rehearsal buffer of at most ``capacity`` examples of a stream of batches (see the module doc).

    ``add(batch)`` offers a batch, ``sample(k)`` draws k stored examples uniformly without replacement
    (``replace=True``: with replacement), ``contents()`` returns everything stored, in slot order, as one batch.
    ``label_key`` (class_balanced): the label part, a tuple index (default 1, for ``(x, y)``) or a dict key.
    ``feature_fn`` (diversity, required): ``batch -> (batch size, d)`` float tensor, run under ``torch.no_grad``.
    ``pool_size`` (diversity, default ``capacity``): examples that wait, once full, before a reselection.
    ``device``: where the examples are stored and returned; ``pin_memory``: page-locked CPU storage and samples
    (needs CUDA). ``generator``: a CPU torch.Generator for every random draw (default: a new one seeded from
    torch's global RNG).
    """

    def __init__(
        self, capacity, policy="reservoir", *, feature_fn=None, label_key=None, pool_size=None, device="cpu",
        pin_memory=False, generator=None,
    ):  # fmt: skip
        self.capacity = _check_count("capacity", capacity, 1)
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        for option, value, owner in (
            ("feature_fn", feature_fn, "diversity"),
            ("pool_size", pool_size, "diversity"),
            ("label_key", label_key, "class_balanced"),
        ):
            if value is not None and policy != owner:
                raise ValueError(f"{option} belongs to policy={owner!r}, not {policy!r}")
        if policy == "diversity" and not callable(feature_fn):
            raise ValueError("policy='diversity' needs feature_fn: a callable batch -> (batch size, d) features")
        if label_key is not None and (isinstance(label_key, bool) or not isinstance(label_key, int | str)):
            raise TypeError(f"label_key must be a tuple index (int) or a dict key (str), got {label_key!r}")
        self.policy, self.feature_fn, self.label_key = policy, feature_fn, label_key
        pool_size = self.capacity if pool_size is None else pool_size
        self.pool_size = _check_count("pool_size", pool_size, 1) if policy == "diversity" else 0
        self.device = torch.device(device)
        if pin_memory and (self.device.type != "cpu" or not torch.cuda.is_available()):
            raise ValueError(
                "pin_memory=True needs device='cpu' and CUDA (pinned memory only speeds up copies to a GPU)"
            )
        self.pin_memory = bool(pin_memory)
        self.generator = _own_generator(generator)
        self._seen = self._count = 0
        self._layout: _Layout | None = None
        self._storage: _Storage | None = None
        if policy == "class_balanced":
            self._classes: list[int] = []  # label of each class, in order of first appearance
            self._class_index: dict[int, int] = {}  # label -> its index in _classes
            self._class_seen = torch.zeros(0, dtype=torch.long)  # examples of each class offered so far
            self._owner = torch.full((self.capacity,), -1, dtype=torch.long)  # class index in each slot, -1 if free
        if policy == "diversity":
            self._features: torch.Tensor | None = None  # (capacity + pool_size, d) fp32: kept slots, then the pool
            self._pending = 0
            self._selection_radius = 0.0

    def __len__(self) -> int:
        return self._count

    @property
    def seen(self) -> int:
        """Examples offered so far."""
        return self._seen

    def add(self, batch) -> None:
        """Offer a batch; a rejected one (TypeError/ValueError) changes nothing, the RNG state and ``seen`` included."""
        kind, keys, parts = _split(batch)
        size = _batch_size(kind, keys, parts)
        if size == 0:
            if self._layout is not None:
                self._layout.align(kind, keys, parts)
            return
        layout = self._layout or _Layout(kind, keys, tuple(_Spec.of(part) for part in parts))
        parts = layout.align(kind, keys, parts)
        labels = self._labels(layout, parts) if self.policy == "class_balanced" else None
        features = self._features_of(batch, size) if self.policy == "diversity" else None
        if self._storage is None:
            self._storage = _Storage(layout, self.capacity + self.pool_size, self.device, self.pin_memory)
            self._layout = layout
        if self.policy == "class_balanced":
            self._insert_class_balanced(parts, labels)
        elif self.policy == "diversity":
            self._insert_diversity(parts, features)
        else:
            self._insert_stream(parts, size)
        self._seen += size

    def sample(self, k, *, replace=False):
        """k stored examples drawn uniformly (without replacement unless ``replace``), as a batch like those added."""
        k = _check_count("k", k, 0)
        if self._count == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        if k > self._count and not replace:
            raise ValueError(
                f"k={k} is more than the {self._count} stored examples; pass replace=True to allow repeats"
            )
        if replace:
            picks = torch.randint(self._count, (k,), generator=self.generator)
        else:
            picks = _distinct_uniform(self._count, k, self.generator)
        slots = self._occupied()[picks] if self.policy == "class_balanced" else picks  # others fill slots 0..len-1
        return self._layout.rebuild(self._storage.gather(slots))

    def contents(self):
        """Every stored example, in slot order, as one batch like the added ones."""
        if self._count == 0:
            raise ValueError("the ReplayBuffer is empty")
        return self._layout.rebuild(self._storage.gather(self._occupied()))

    def covering_radius(self) -> float:
        """diversity: the largest feature-space distance from a candidate of the latest selection (the kept set and
        pool it chose from), or an example pending since, to its nearest kept example; 0 before any selection."""
        if self.policy != "diversity":
            raise ValueError(
                f"covering_radius() needs policy='diversity' (the only one that stores features), not {self.policy!r}"
            )
        if self._pending == 0:
            return self._selection_radius
        pending = self._features[self.capacity : self.capacity + self._pending]
        nearest = torch.cdist(pending, self._features[: self.capacity]).min(1).values.max().item()
        return max(self._selection_radius, nearest)

    def _occupied(self) -> torch.Tensor:
        if self.policy == "class_balanced":
            return (self._owner >= 0).nonzero().squeeze(1)
        return torch.arange(self._count)

    def _labels(self, layout: _Layout, parts: list) -> torch.Tensor:
        """The checked class labels of a batch (a 1-D integer part), on the CPU."""
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

    def _features_of(self, batch, size: int) -> torch.Tensor:
        """The checked ``feature_fn(batch)``: finite, (size, d) with the d of the stored features; fp32 on device."""
        with torch.no_grad():
            features = self.feature_fn(batch)
        if not isinstance(features, torch.Tensor) or not features.dtype.is_floating_point:
            raise TypeError(
                f"feature_fn must return a floating-point tensor, got {getattr(features, 'dtype', type(features))}"
            )
        width = None if self._features is None else self._features.shape[1]
        if features.dim() != 2 or features.shape[0] != size or width not in (None, features.shape[1]):
            expected = f"({size}, {'d' if width is None else width})"
            raise ValueError(f"feature_fn must return {expected} features for this batch, got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("feature_fn returned NaN or infinite features")
        return features.detach().to(self.device, torch.float32)

    def _insert_stream(self, parts: list, size: int) -> None:
        """reservoir / random_replace: slots 0..capacity-1 in stream order, then the policy's draws."""
        if self.policy == "reservoir":
            draw = _reservoir_draw(self.generator)
        else:
            draw = _random_replace_draw(self.capacity, self.generator)
        index = torch.arange(self._seen, self._seen + size)
        slots, rows = _last_write_wins(*_stream_targets(index, self.capacity, draw))
        self._storage.write(slots, parts, rows)
        self._count = min(self._seen + size, self.capacity)

    def _quotas(self) -> torch.Tensor:
        """Slots of each class: capacity // C, one more for the first capacity % C classes."""
        count = len(self._classes)
        return self.capacity // count + (torch.arange(count) < self.capacity % count)

    def _admit_classes(self, labels: list[int]) -> None:
        """New classes join; every older class over its new quota evicts uniformly at random down to it."""
        old = len(self._classes)
        self._class_index.update((label, old + i) for i, label in enumerate(labels))
        self._classes += labels
        self._class_seen = torch.cat([self._class_seen, torch.zeros(len(labels), dtype=torch.long)])
        quotas = self._quotas()
        for index in range(old):
            held = (self._owner == index).nonzero().squeeze(1)
            excess = len(held) - int(quotas[index])
            if excess > 0:
                self._owner[held[torch.randperm(len(held), generator=self.generator)[:excess]]] = -1

    def _insert_class_balanced(self, parts: list, labels: torch.Tensor) -> None:
        """Classes first seen in this batch join first, in order of first appearance; then every example goes
        through Algorithm R on its class's own stream, within the class's quota."""
        values, inverse = torch.unique(labels, return_inverse=True)
        rows = torch.arange(len(labels))
        first_rows = torch.full(values.shape, len(labels)).scatter_reduce_(0, inverse, rows, "amin")
        new = [label for label in values[first_rows.argsort()].tolist() if label not in self._class_index]
        if new:
            self._admit_classes(new)
        classes = torch.tensor([self._class_index[label] for label in values.tolist()])[inverse]
        quotas, in_batch = self._quotas(), torch.bincount(classes, minlength=len(self._classes))
        # each example's index in its class's stream: the class's count so far + its rank among the batch's examples
        # of that class (a stable sort groups them in batch order)
        order = torch.argsort(classes, stable=True)
        rank = torch.empty_like(order)
        rank[order] = rows - (in_batch.cumsum(0) - in_batch)[classes[order]]
        index = self._class_seen[classes] + rank
        positions, writers = _stream_targets(index, quotas[classes], _reservoir_draw(self.generator))
        # a class's positions 0..quota-1 are its held slots in slot order, then its share of the free slots (free
        # slots in slot order, shared out in class order: each class holds min(seen, quota) examples, so the
        # shortfalls quota - held sum to at most the free slots)
        by_owner = torch.argsort(self._owner, stable=True)  # the free slots (-1), then class 0's, class 1's, ...
        per_owner = torch.bincount(self._owner + 1, minlength=len(self._classes) + 1)
        held, held_start = per_owner[1:], (per_owner.cumsum(0) - per_owner)[1:]
        free_start = (quotas - held).cumsum(0) - (quotas - held)
        owner = classes[writers]
        in_order = torch.where(
            positions < held[owner], held_start[owner] + positions, free_start[owner] + positions - held[owner]
        )
        slots, picked = _last_write_wins(by_owner[in_order], writers)
        self._owner[slots] = classes[picked]
        self._storage.write(slots, parts, picked)
        self._class_seen += in_batch
        self._count = int((self._owner >= 0).sum())

    def _insert_diversity(self, parts: list, features: torch.Tensor) -> None:
        """Fill the kept slots in stream order; then queue in the pool, reselecting each time it is full."""
        if self._features is None:
            self._features = torch.zeros(self.capacity + self.pool_size, features.shape[1], device=self.device)
        rows, start = torch.arange(len(features)), 0
        while start < len(rows):
            full = self._count == self.capacity
            first = self.capacity + self._pending if full else self._count
            room = self.pool_size - self._pending if full else self.capacity - self._count
            taken = rows[start : start + room]
            slots = torch.arange(first, first + len(taken))
            self._storage.write(slots, parts, taken)
            self._features[slots.to(self.device)] = features[taken.to(self.device)]
            start += len(taken)
            if not full:
                self._count += len(taken)
            else:
                self._pending += len(taken)
                if self._pending == self.pool_size:
                    self._reselect()

    def _reselect(self) -> None:
        """Keep the greedy k-center choice among the kept slots and the full pool; chosen pool examples move into
        the slots of the dropped kept ones."""
        chosen, self._selection_radius = _k_center_greedy(self._features, self.capacity)
        is_chosen = torch.zeros(len(self._features), dtype=torch.bool)
        is_chosen[chosen.cpu()] = True
        dropped = (~is_chosen[: self.capacity]).nonzero().squeeze(1)
        incoming = is_chosen[self.capacity :].nonzero().squeeze(1) + self.capacity
        self._storage.move(dropped, incoming)
        self._features[dropped.to(self.device)] = self._features[incoming.to(self.device)]
        self._pending = 0

    def state_dict(self) -> dict:
        """A snapshot (copies): strings, numbers, lists and tensors, loadable with ``torch.load(weights_only=True)``."""
        state = {
            "policy": self.policy,
            "capacity": self.capacity,
            "pool_size": self.pool_size,
            "label_key": self.label_key,
            "seen": self._seen,
            "count": self._count,
            "generator": self.generator.get_state(),
            "layout": None if self._layout is None else self._layout.to_state(),
            "data": None if self._storage is None else self._storage.to_state(),
        }
        if self.policy == "class_balanced":
            state.update(classes=list(self._classes), class_seen=self._class_seen.clone(), owner=self._owner.clone())
        if self.policy == "diversity":
            features = None if self._features is None else self._features.clone()
            state.update(features=features, pending=self._pending, selection_radius=self._selection_radius)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()`` (checked first; nothing changes on error). The buffer then continues exactly as
        the saved one would have: same stored examples in the same slots, same RNG state."""
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"not a ReplayBuffer state: missing {missing}")
        for name in ("policy", "capacity", "pool_size", "label_key"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the state is of a buffer with {name}={state[name]!r}; this one has {getattr(self, name)!r}"
                )
        layout = None if state["layout"] is None else _Layout.from_state(state["layout"])
        storage = None
        if layout is not None:
            storage = _Storage(layout, self.capacity + self.pool_size, self.device, self.pin_memory)
            storage.load(layout, state["data"])
        policy_state = self._policy_state(state)
        self.generator.set_state(state["generator"])
        self._seen, self._count = int(state["seen"]), int(state["count"])
        self._layout, self._storage = layout, storage
        for name, value in policy_state.items():
            setattr(self, name, value)

    def _policy_state(self, state: dict) -> dict:
        """The policy's own attributes from a state dict, checked."""
        if self.policy == "class_balanced":
            owner = state["owner"]
            if owner.shape != (self.capacity,) or len(state["classes"]) != len(state["class_seen"]):
                raise ValueError("corrupt ReplayBuffer state: class bookkeeping does not match the capacity")
            classes = [int(label) for label in state["classes"]]
            return {
                "_classes": classes,
                "_class_index": {label: index for index, label in enumerate(classes)},
                "_class_seen": state["class_seen"].to(torch.long, copy=True),
                "_owner": owner.to(torch.long, copy=True),
            }
        if self.policy == "diversity":
            features = state["features"]
            if features is not None and features.shape[0] != self.capacity + self.pool_size:
                raise ValueError("corrupt ReplayBuffer state: features do not match capacity + pool_size")
            features = None if features is None else features.to(self.device, torch.float32, copy=True)
            return {
                "_features": features,
                "_pending": int(state["pending"]),
                "_selection_radius": state["selection_radius"],
            }
        return {}
