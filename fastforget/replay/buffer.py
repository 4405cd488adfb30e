"""``ReplayBuffer``: the layout (layout.py), the storage (storage.py) and one policy object (policy.py and one
module per policy) behind the interface the rest of fastforget and its users call."""

import torch

from fastforget._validation import check_allocation, check_bool, check_int
from fastforget.replay.class_balanced import ClassBalanced
from fastforget.replay.diversity import Diversity
from fastforget.replay.layout import Layout, corrupt, split
from fastforget.replay.policy import Policy
from fastforget.replay.reservoir import DRAW_RANGE, RandomReplace, Reservoir
from fastforget.replay.storage import POINTER_BYTES, Storage

POLICY_CLASSES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (Reservoir, ClassBalanced, Diversity, RandomReplace)
}
POLICIES = tuple(POLICY_CLASSES)
STATE_KEYS = ("policy", "capacity", "pool_size", "label_key", "seen", "count", "generator", "layout", "data")
SLOT_BOOKKEEPING_BYTES = 8  # int64 indices and draws per slot, whatever the examples: a floor checked up front


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
    """A rehearsal buffer of at most ``capacity`` examples of a stream of batches (see the package doc).

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
        self.capacity = check_int("capacity", capacity, minimum=1)
        if not isinstance(policy, str) or policy not in POLICY_CLASSES:
            raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
        cls = POLICY_CLASSES[policy]
        options = {"feature_fn": feature_fn, "pool_size": pool_size, "label_key": label_key}
        for option, value in options.items():
            if value is not None and option not in cls.options:
                owner = next(other.name for other in POLICY_CLASSES.values() if option in other.options)
                raise ValueError(f"{option} belongs to policy={owner!r}, not {policy!r}")
        if cls is Diversity:
            options["pool_size"] = check_int("pool_size", capacity if pool_size is None else pool_size, minimum=1)
        self.device = torch.device(device)
        if check_bool("pin_memory", pin_memory) and (self.device.type != "cpu" or not torch.cuda.is_available()):
            raise ValueError(
                "pin_memory=True needs device='cpu' and CUDA (pinned memory only speeds up copies to a GPU)"
            )
        self.pin_memory = pin_memory
        self.generator = _own_generator(generator)
        self._options = {option: options[option] for option in cls.options}
        self._policy = self._new_policy(cls)
        self.policy, self.feature_fn, self.label_key = policy, feature_fn, label_key
        self.pool_size = self._policy.slots - self.capacity
        self._seen = 0
        self._layout: Layout | None = None
        self._storage: Storage | None = None

    def _new_policy(self, cls: type[Policy]) -> Policy:
        """A fresh policy object, after checking that its slots' bookkeeping alone fits in memory."""
        slots = self.capacity + self._options.get("pool_size", 0)
        check_allocation(
            f"a ReplayBuffer of {slots} slots (at {SLOT_BOOKKEEPING_BYTES} bytes a slot before any example)",
            slots * SLOT_BOOKKEEPING_BYTES,
            "cpu",
        )
        return cls(self.capacity, self.generator, self.device, **self._options)

    def __len__(self) -> int:
        return self._policy.count

    @property
    def seen(self) -> int:
        """Examples offered so far."""
        return self._seen

    def add(self, batch) -> None:
        """Offer a batch; a rejected one (TypeError/ValueError) changes nothing, the RNG state and ``seen`` included.
        The buffer stores detached copies: nothing of the caller's autograd graph is kept."""
        kind, keys, parts, size = split(batch)
        if size == 0:
            if self._layout is not None:
                self._layout.align(kind, keys, parts)
            return
        layout = self._layout or Layout.of(kind, keys, parts)
        parts = layout.align(kind, keys, parts)
        extra = self._policy.checked_batch(batch, layout, parts, size)
        if self._storage is None:
            self._storage = Storage(layout, self._policy.slots, self.device, self.pin_memory)
            self._layout = layout
        self._policy.insert(self._storage, parts, extra, self._seen)
        self._seen += size

    def sample(self, k, *, replace=False):
        """k stored examples drawn uniformly (without replacement unless ``replace``), as a batch like those added."""
        k = check_int("k", k, minimum=0)
        replace = check_bool("replace", replace)
        count = self._policy.count
        if count == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        if k > count and not replace:
            raise ValueError(f"k={k} is more than the {count} stored examples; pass replace=True to allow repeats")
        if k > count:  # more than the storage holds: check the gathered copy fits before drawing it
            ragged = sum(spec.ragged for spec in self._layout.specs)
            per_example = self._layout.example_bytes() + POINTER_BYTES * (1 + ragged)  # + its int64 index
            check_allocation(f"sample(k={k}, replace=True)", k * per_example, self.device)
        if replace:
            picks = torch.randint(count, (k,), generator=self.generator)
        else:
            picks = _distinct_uniform(count, k, self.generator)
        return self._layout.rebuild(self._storage.gather(self._policy.slots_of(picks)))

    def contents(self):
        """Every stored example, in slot order, as one batch like the added ones."""
        if self._policy.count == 0:
            raise ValueError("the ReplayBuffer is empty")
        return self._layout.rebuild(self._storage.gather(self._policy.occupied()))

    def covering_radius(self) -> float:
        """diversity: the largest feature-space distance from a candidate of the latest selection (the kept set and
        pool it chose from), or an example pending since, to its nearest kept example; 0 before any selection."""
        if not isinstance(self._policy, Diversity):
            raise ValueError(
                f"covering_radius() needs policy='diversity' (the only one that stores features), not {self.policy!r}"
            )
        return self._policy.covering_radius()

    def state_dict(self) -> dict:
        """A snapshot (copies): strings, numbers, lists and tensors, loadable with ``torch.load(weights_only=True)``."""
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "pool_size": self.pool_size,
            "label_key": self.label_key,
            "seen": self._seen,
            "count": self._policy.count,
            "generator": self.generator.get_state(),
            "layout": None if self._layout is None else self._layout.to_state(),
            "data": None if self._storage is None else self._storage.to_state(),
            **self._policy.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a ``state_dict()``, checked as a whole first (nothing changes on error): the buffer then continues
        exactly as the saved one would have, same stored examples in the same slots, same RNG state."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict (a ReplayBuffer.state_dict()), not {type(state).__name__}")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"not a ReplayBuffer state: missing {missing}")
        for name in ("policy", "capacity", "pool_size", "label_key"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the state is of a buffer with {name}={state[name]!r}; this one has {getattr(self, name)!r}"
                )
        seen = check_int("state['seen']", state["seen"], minimum=0)
        count = check_int("state['count']", state["count"], minimum=0, maximum=min(seen, self.capacity))
        generator, expected = state["generator"], self.generator.get_state()
        is_bytes = isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
        if not is_bytes or generator.shape != expected.shape:
            raise corrupt(f"generator must be a uint8 tensor of shape {tuple(expected.shape)} (Generator.get_state())")
        policy = self._new_policy(type(self._policy))
        policy.load_state(state, seen, count)
        if (state["layout"] is None) != (seen == 0) or (state["data"] is None) != (state["layout"] is None):
            raise corrupt(f"layout and data must be saved once (and only once) examples were offered (seen={seen})")
        layout = storage = None
        if state["layout"] is not None:
            layout = Layout.from_state(state["layout"])
            storage = Storage(layout, policy.slots, self.device, self.pin_memory)
            storage.load(layout, state["data"], policy.filled())
        self.generator.set_state(generator)
        self._seen, self._policy, self._layout, self._storage = seen, policy, layout, storage
