"""ReplayBuffer: every policy against a per-example Python implementation driven by the same draws, the statistics
of reservoir sampling (and the seed's bias), class balance, k-center coverage, ragged batches, state round trips and
every error case (a rejected add changes nothing)."""

import io
import itertools
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastforget.replay import DRAW_RANGE, ReplayBuffer

CUDA = torch.cuda.is_available()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def id_batches(sizes: list[int]) -> list[torch.Tensor]:
    """Plain-tensor batches of example ids 0, 1, 2, ... cut into the given sizes."""
    bounds = [0, *itertools.accumulate(sizes)]
    return [torch.arange(start, stop) for start, stop in zip(bounds, bounds[1:])]


def assert_same_state(a, b) -> None:
    """Deep, bitwise equality of two state dicts (or any nesting of dicts, lists, tensors and plain values)."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


# --- reservoir and random_replace: exactness against the sequential algorithms ---------------------------------


def per_example_stream(policy: str, capacity: int, batches: list[torch.Tensor], seed: int) -> list[int]:
    """Algorithm R (or the seed's random replacement) one example at a time, in plain Python, driven by the same
    draws as the vectorised buffer: per add, one draw per example (used once the first `capacity` are in)."""
    draws, slots, seen = generator(seed), [], 0
    for batch in batches:
        high = DRAW_RANGE if policy == "reservoir" else capacity
        for example, value in zip(batch.tolist(), torch.randint(high, (len(batch),), generator=draws).tolist()):
            if seen < capacity:
                slots.append(example)
            else:
                j = value % (seen + 1) if policy == "reservoir" else value
                if j < capacity:
                    slots[j] = example
            seen += 1
    return slots


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(["reservoir", "random_replace"]),
    capacity=st.integers(1, 12),
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=12),
    seed=st.integers(0, 2**31),
)
def test_stream_policies_equal_the_sequential_algorithm(policy, capacity, sizes, seed):
    batches = id_batches(sizes)
    buffer = ReplayBuffer(capacity, policy, generator=generator(seed))
    for batch in batches:
        buffer.add(batch)
    assert buffer.seen == sum(sizes)
    assert len(buffer) == min(sum(sizes), capacity)
    if len(buffer):
        assert buffer.contents().tolist() == per_example_stream(policy, capacity, batches, seed)


def test_vectorised_reservoir_resolves_slot_conflicts_last_write_wins():
    # capacity 2 and batches of 50 after the fill: many examples of one batch target the same slot
    batches = id_batches([2, 50, 50, 50])
    for seed in range(20):
        buffer = ReplayBuffer(2, generator=generator(seed))
        for batch in batches:
            buffer.add(batch)
        assert buffer.contents().tolist() == per_example_stream("reservoir", 2, batches, seed)


def chi2_upper_quantile(df: int, p: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (within 0.1 % of the exact one at df = 99)."""
    z = statistics.NormalDist().inv_cdf(p)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def inclusion_chi_square(policy: str, runs: int, capacity: int, stream: int, batch: int) -> float:
    """Pearson's statistic of how often each of `stream` examples ends in the buffer over `runs` seeded runs,
    against the uniform expectation runs * capacity / stream."""
    counts = torch.zeros(stream)
    for run in range(runs):
        buffer = ReplayBuffer(capacity, policy, generator=generator(run))
        for ids in id_batches([batch] * (stream // batch) + [stream % batch]):
            buffer.add(ids)
        counts[buffer.contents()] += 1
    expected = runs * capacity / stream
    return float(((counts - expected) ** 2 / expected).sum())


# Uniform inclusion: each count is Binomial(runs, p = capacity/stream) across independent runs, so Pearson's statistic
# is about (1 - p) chi2(stream - 1) (Var = runs p (1 - p) rather than runs p): the chi2(99) 0.999 quantile (148) is a
# conservative bound. The runs are seeded, so the test is deterministic; the seed's policy lands far above it
# (its last examples are in the buffer with probability ~ 1 - e^-1, the first ones almost never).
RUNS, CAPACITY, STREAM, BATCH = 1000, 10, 100, 7


def test_reservoir_inclusion_probabilities_are_uniform():
    statistic = inclusion_chi_square("reservoir", RUNS, CAPACITY, STREAM, BATCH)
    assert statistic < chi2_upper_quantile(STREAM - 1, 0.999)


def test_random_replace_fails_the_same_test():
    statistic = inclusion_chi_square("random_replace", RUNS, CAPACITY, STREAM, BATCH)
    assert statistic > 10 * chi2_upper_quantile(STREAM - 1, 0.999)


# --- class_balanced -------------------------------------------------------------------------------------------


def class_counts(buffer: ReplayBuffer, key=1) -> dict[int, int]:
    """Stored examples per label."""
    labels, counts = torch.unique(buffer.contents()[key], return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


def test_class_balanced_quotas_as_classes_arrive_in_sequence():
    buffer = ReplayBuffer(20, "class_balanced", generator=generator(0))
    expected = {1: [20], 2: [10, 10], 3: [7, 7, 6], 4: [5, 5, 5, 5], 5: [4, 4, 4, 4, 4], 6: [4, 4, 3, 3, 3, 3]}
    for label in range(6):
        for _ in range(5):  # 5 batches of 9 examples of this class
            buffer.add((torch.randn(9, 3), torch.full((9,), label)))
        assert class_counts(buffer) == dict(enumerate(expected[label + 1]))
        assert len(buffer) == 20


def per_example_class_balanced(capacity: int, batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int) -> list:
    """Class-balanced replay one example at a time in plain Python, with the buffer's draws: per batch, classes first
    seen join (in order of first appearance; each older class over its new quota evicts the randperm-chosen ones of
    its held slots), then each example runs Algorithm R on its class's stream (one draw per example, used past its
    class's quota). A class's position p is its p-th held slot (in slot order, as the batch
    starts) or, past those, its share of the free slots (in slot order, shared out in class order)."""
    draws, slots, owner, classes, seen = generator(seed), [None] * capacity, [-1] * capacity, [], []

    def quota(c):
        return capacity // len(classes) + (c < capacity % len(classes))

    def held_by(c):
        return [slot for slot in range(capacity) if owner[slot] == c]

    for ids, labels in batches:
        old = len(classes)
        classes += [label for label in dict.fromkeys(labels.tolist()) if label not in classes]
        seen += [0] * (len(classes) - old)
        for c in range(old):
            held, excess = held_by(c), len(held_by(c)) - quota(c)
            if excess > 0:
                for k in torch.randperm(len(held), generator=draws)[:excess].tolist():
                    owner[held[k]] = -1
        held = [held_by(c) for c in range(len(classes))]
        free = [slot for slot in range(capacity) if owner[slot] < 0]
        free_start = list(itertools.accumulate([0] + [quota(c) - len(held[c]) for c in range(len(classes))]))
        examples = []
        for example, label in zip(ids.tolist(), labels.tolist()):
            c = classes.index(label)
            examples.append((example, c, seen[c]))
            seen[c] += 1
        values = torch.randint(DRAW_RANGE, (len(examples),), generator=draws).tolist()
        for (example, c, i), value in zip(examples, values):
            p = i if i < quota(c) else value % (i + 1)
            if p < quota(c):
                slot = held[c][p] if p < len(held[c]) else free[free_start[c] + p - len(held[c])]
                slots[slot], owner[slot] = example, c
    return [slots[slot] for slot in range(capacity) if owner[slot] >= 0]


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 10),
    labels=st.lists(st.lists(st.integers(-2, 4), max_size=15), min_size=1, max_size=10),
    seed=st.integers(0, 2**31),
)
def test_class_balanced_equals_the_per_example_algorithm(capacity, labels, seed):
    ids = id_batches([len(batch) for batch in labels])
    batches = [(batch_ids, torch.tensor(batch, dtype=torch.int64)) for batch_ids, batch in zip(ids, labels)]
    buffer = ReplayBuffer(capacity, "class_balanced", generator=generator(seed))
    for batch in batches:
        buffer.add(batch)
    expected = per_example_class_balanced(capacity, batches, seed)
    assert len(buffer) == len(expected)
    if expected:
        assert buffer.contents()[0].tolist() == expected


def test_class_balanced_rare_class_keeps_its_slots_empty():
    buffer = ReplayBuffer(10, "class_balanced", generator=generator(0))
    buffer.add((torch.randn(3, 2), torch.tensor([7, 7, 7])))
    buffer.add((torch.randn(40, 2), torch.full((40,), -2)))
    assert class_counts(buffer) == {7: 3, -2: 5}  # quota 5 each; class 7 has only 3 examples so far
    assert len(buffer) == 8


def test_class_balanced_new_classes_in_one_batch_join_in_order_of_first_appearance():
    buffer = ReplayBuffer(5, "class_balanced", label_key="y", generator=generator(0))
    buffer.add({"x": torch.randn(12, 2), "y": torch.tensor([9, 9, 4, 4, 9, 4, 1, 1, 1, 9, 4, 1], dtype=torch.int32)})
    assert class_counts(buffer, "y") == {9: 2, 4: 2, 1: 1}  # 5 // 3 = 1 each, the extra goes to 9, then 4


def test_class_balanced_more_classes_than_capacity():
    buffer = ReplayBuffer(3, "class_balanced", generator=generator(0))
    buffer.add((torch.randn(10, 2), torch.arange(10)))
    assert class_counts(buffer) == {0: 1, 1: 1, 2: 1}  # quota 1 for the first 3 classes, 0 for the rest


# Within-class uniformity through two rebalancings: classes 0, 1, 2 arrive in sequence, 40 examples each, capacity
# 12, so each ends with quota 4 and every example should be kept with probability 4/40. Same bound as above.
def test_class_balanced_is_uniform_within_each_class_through_rebalancing():
    runs, per_class, capacity = 600, 40, 12
    counts = torch.zeros(3 * per_class)
    for run in range(runs):
        buffer = ReplayBuffer(capacity, "class_balanced", generator=generator(run))
        for label in range(3):
            for start in range(0, per_class, 6):
                ids = torch.arange(label * per_class + start, label * per_class + min(start + 6, per_class))
                buffer.add((ids, torch.full((len(ids),), label)))
        counts[buffer.contents()[0]] += 1
    expected = runs * 4 / per_class
    statistic = float(((counts - expected) ** 2 / expected).sum())
    assert statistic < chi2_upper_quantile(3 * per_class - 1, 0.999)


# --- diversity --------------------------------------------------------------------------------------------------


def clustered_stream(seed: int, points: int = 2000):
    """2-D points in 8 tight clusters (std 0.1) on a circle of radius 10; one cluster holds 90 % of the points."""
    draws = generator(seed)
    angles = torch.arange(8) * (2 * math.pi / 8)
    centers = 10 * torch.stack([angles.cos(), angles.sin()], 1)
    weights = torch.tensor([0.9] + [0.1 / 7] * 7)
    cluster = torch.multinomial(weights, points, replacement=True, generator=draws)
    return centers[cluster] + 0.1 * torch.randn(points, 2, generator=draws)


def stream_radius(points: torch.Tensor, kept: torch.Tensor) -> float:
    return torch.cdist(points, kept).min(1).values.max().item()


def test_diversity_covers_clustered_data_better_than_reservoir():
    points = clustered_stream(0)
    diversity = ReplayBuffer(16, "diversity", feature_fn=lambda x: x, generator=generator(0))
    reservoir = ReplayBuffer(16, generator=generator(0))
    for start in range(0, len(points), 50):
        diversity.add(points[start : start + 50])
        reservoir.add(points[start : start + 50])
    covered = stream_radius(points, diversity.contents())
    assert covered < 1.0  # every cluster keeps a point (clusters are 7.6 apart, 0.1 wide)
    assert stream_radius(points, reservoir.contents()) > 5 * covered
    assert diversity.covering_radius() <= covered + 1e-5  # over the last candidates only, a subset of the stream


def farthest_point_greedy(features: list[list[float]], k: int) -> tuple[list[int], float]:
    """Gonzalez's greedy in plain Python and float64: start farthest from the mean, one candidate at a time."""
    mean = [sum(column) / len(features) for column in zip(*features)]
    pick = max(range(len(features)), key=lambda i: (math.dist(features[i], mean), -i))
    nearest, chosen = [math.inf] * len(features), []
    for _ in range(k):
        chosen.append(pick)
        for i, feature in enumerate(features):
            nearest[i] = min(nearest[i], math.dist(feature, features[pick]))
        for i in chosen:
            nearest[i] = -math.inf
        pick = max(range(len(features)), key=lambda i: (nearest[i], -i))
    return chosen, max(0.0, max(nearest))


def test_diversity_equals_per_example_greedy_k_center():
    capacity, pool_size = 10, 4
    points = torch.randn(67, 3, generator=generator(1))
    buffer = ReplayBuffer(capacity, "diversity", feature_fn=lambda b: b["x"], pool_size=pool_size)
    kept, pending, radius = [], [], 0.0  # the per-example reference: ids
    for start in range(0, len(points), 9):
        ids = torch.arange(start, min(start + 9, len(points)))
        buffer.add({"id": ids, "x": points[ids]})
        for example in ids.tolist():
            (kept if len(kept) < capacity else pending).append(example)
            if len(pending) == pool_size:
                candidates = kept + pending
                chosen, radius = farthest_point_greedy(points[candidates].double().tolist(), capacity)
                kept, pending = [candidates[i] for i in chosen], []
        assert sorted(buffer.contents()["id"].tolist()) == sorted(kept)
        extra = stream_radius(points[pending], points[kept]) if pending else 0.0
        assert buffer.covering_radius() == pytest.approx(max(radius, extra), rel=1e-5)


def test_diversity_pool_of_one_reselects_on_every_example():
    buffer = ReplayBuffer(3, "diversity", feature_fn=lambda x: x, pool_size=1)
    buffer.add(torch.tensor([[0.0], [1.0], [2.0], [10.0], [1.5]]))
    assert sorted(buffer.contents()[:, 0].tolist()) == [0.0, 2.0, 10.0]
    # 10 made the first selection among {0, 1, 2, 10} (1 dropped); 1.5 the second, among {0, 2, 10, 1.5}
    assert buffer.covering_radius() == pytest.approx(0.5)


# --- batch structures -------------------------------------------------------------------------------------------


def llm_batch(first_id: int, lengths: list[int]) -> dict:
    """A dict batch with ragged token sequences of the given lengths, a ragged (length, 4) fp16 part and ids."""
    ids = list(range(first_id, first_id + len(lengths)))
    return {
        "input_ids": [torch.arange(n) + 1000 * i for i, n in zip(ids, lengths)],
        "attention_mask": [torch.ones(n, dtype=torch.bool) for n in lengths],
        "embeddings": [torch.full((n, 4), float(i), dtype=torch.float16) for i, n in zip(ids, lengths)],
        "id": torch.tensor(ids),
    }


def assert_examples_as_added(batch: dict, added: dict[int, dict]) -> None:
    for row, example_id in enumerate(batch["id"].tolist()):
        for key in ("input_ids", "attention_mask", "embeddings"):
            stored, original = batch[key][row], added[example_id][key]
            assert stored.dtype == original.dtype and torch.equal(stored, original)


@pytest.mark.parametrize("policy", ["reservoir", "random_replace", "class_balanced"])
def test_dict_batches_with_ragged_sequences(policy):
    label_key = "id" if policy == "class_balanced" else None
    buffer = ReplayBuffer(6, policy, label_key=label_key, generator=generator(3))
    added, lengths = {}, torch.randint(1, 9, (40,), generator=generator(4)).tolist()
    for start in range(0, 40, 5):
        batch = llm_batch(start, lengths[start : start + 5])
        buffer.add(batch)
        for row in range(5):
            added[start + row] = {key: batch[key][row] for key in ("input_ids", "attention_mask", "embeddings")}
    sampled = buffer.sample(4)
    assert isinstance(sampled["input_ids"], list) and len(sampled["input_ids"]) == 4
    assert_examples_as_added(sampled, added)
    assert_examples_as_added(buffer.contents(), added)


def test_tuple_and_plain_tensor_batches_round_trip():
    buffer = ReplayBuffer(5, generator=generator(0))
    x, y = torch.randn(5, 2, 3), torch.arange(5)
    buffer.add((x, y))
    assert_same_state(buffer.contents(), (x, y))
    plain = ReplayBuffer(5, generator=generator(0))
    plain.add(x.to(torch.uint8))
    assert_same_state(plain.contents(), x.to(torch.uint8))


def test_dict_key_order_is_free():
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add({"a": torch.zeros(2), "b": torch.ones(2, dtype=torch.int64)})
    buffer.add({"b": torch.full((2,), 5), "a": torch.full((2,), 7.0)})
    assert_same_state(buffer.contents(), {"a": torch.tensor([0.0, 0, 7, 7]), "b": torch.tensor([1, 1, 5, 5])})


def test_stored_examples_are_copies():
    buffer = ReplayBuffer(3, generator=generator(0))
    x, seqs = torch.zeros(2, 2), [torch.zeros(3), torch.zeros(1)]
    buffer.add((x, seqs))
    x.add_(1)
    seqs[0].add_(1)
    sampled = buffer.sample(2)
    sampled[1][0].add_(5)
    stored_x, stored_seqs = buffer.contents()
    assert stored_x.eq(0).all() and all(s.eq(0).all() for s in stored_seqs)


def test_storage_is_allocated_once():
    buffer = ReplayBuffer(8, generator=generator(0))
    buffer.add((torch.randn(3, 4), torch.arange(3)))
    pointers = [part.data_ptr() for part in buffer._storage.parts]
    for _ in range(10):
        buffer.add((torch.randn(3, 4), torch.arange(3)))
    assert [part.data_ptr() for part in buffer._storage.parts] == pointers


def test_empty_batch_changes_nothing():
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add(torch.empty(0, 3))
    assert len(buffer) == 0 and buffer.seen == 0 and buffer._layout is None
    buffer.add(torch.ones(2, 3))
    before = buffer.state_dict()
    buffer.add(torch.empty(0, 3))
    assert_same_state(before, buffer.state_dict())


# --- sample -----------------------------------------------------------------------------------------------------


def test_sample_without_and_with_replacement():
    buffer = ReplayBuffer(10, generator=generator(0))
    buffer.add(torch.arange(10))
    assert sorted(buffer.sample(10).tolist()) == list(range(10))
    assert len(set(buffer.sample(7).tolist())) == 7
    with_replacement = buffer.sample(50, replace=True)
    assert with_replacement.shape == (50,) and set(with_replacement.tolist()) <= set(range(10))


def test_sample_from_a_large_buffer_skips_repeats_of_uniform_draws():
    # n >= 100 k: the sample is the first k distinct values of uniform draws (k, then one per missing value)
    buffer = ReplayBuffer(1000, generator=generator(0))
    buffer.add(torch.arange(1000))
    draws = generator(0)
    torch.randint(DRAW_RANGE, (1000,), generator=draws)  # the add's draws
    topped_up = 0
    for _ in range(200):
        values = torch.randint(1000, (7,), generator=draws).tolist()
        topped_up += len(set(values)) < 7
        while len(set(values)) < 7:
            values += torch.randint(1000, (7 - len(set(values)),), generator=draws).tolist()
        assert buffer.sample(7).tolist() == list(dict.fromkeys(values))
    assert topped_up > 0  # a repeat among 7 draws: 2 % of samples


def test_sample_zero_returns_an_empty_batch_of_the_structure():
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add({"x": torch.randn(2, 3, dtype=torch.float64), "seq": [torch.ones(2), torch.ones(5)]})
    empty = buffer.sample(0)
    assert empty["x"].shape == (0, 3) and empty["x"].dtype == torch.float64 and empty["seq"] == []


def test_sample_is_uniform_over_class_balanced_slots():
    buffer = ReplayBuffer(6, "class_balanced", generator=generator(0))
    buffer.add((torch.arange(4), torch.tensor([0, 0, 0, 1])))  # 4 of 6 slots held (quota 3 each; class 1 has 1)
    drawn = torch.cat([buffer.sample(2)[0] for _ in range(400)])
    assert set(drawn.tolist()) == {0, 1, 2, 3}


# --- state_dict -------------------------------------------------------------------------------------------------


def policy_buffer(policy: str, seed: int) -> ReplayBuffer:
    options = {
        "reservoir": {},
        "random_replace": {},
        "class_balanced": {"label_key": "label"},
        "diversity": {"feature_fn": lambda b: b["x"], "pool_size": 3},
    }[policy]
    return ReplayBuffer(7, policy, generator=generator(seed), **options)


def mixed_batch(step: int) -> dict:
    lengths = torch.randint(1, 6, (5,), generator=generator(100 + step)).tolist()
    return {
        "x": torch.randn(5, 2, generator=generator(200 + step)),
        "seq": [torch.arange(n) for n in lengths],
        "label": torch.tensor([step % 3, step % 4, 1, step % 3, 0]),
    }


@pytest.mark.parametrize("policy", ["reservoir", "random_replace", "class_balanced", "diversity"])
def test_state_dict_round_trip_continues_identically(policy):
    original = policy_buffer(policy, seed=5)
    for step in range(6):
        original.add(mixed_batch(step))
        original.sample(2)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    saved.seek(0)
    restored = policy_buffer(policy, seed=99)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    assert_same_state(original.state_dict(), restored.state_dict())
    for step in range(6, 12):
        original.add(mixed_batch(step))
        restored.add(mixed_batch(step))
        assert_same_state(original.sample(3), restored.sample(3))
    assert_same_state(original.state_dict(), restored.state_dict())
    if policy == "diversity":
        assert original.covering_radius() == restored.covering_radius()


def test_state_dict_is_a_snapshot_and_loads_into_an_empty_buffer():
    buffer = ReplayBuffer(4, generator=generator(0))
    assert_same_state(ReplayBuffer(4, generator=generator(0)).state_dict(), buffer.state_dict())
    buffer.add((torch.zeros(2, 2), [torch.zeros(1), torch.zeros(2)]))
    state = buffer.state_dict()
    buffer.add((torch.ones(4, 2), [torch.ones(1)] * 4))
    assert state["data"][0].eq(0).all() and state["seen"] == 2
    other = ReplayBuffer(4)
    other.load_state_dict(state)
    assert len(other) == 2 and other.contents()[0].eq(0).all()


def test_load_state_dict_rejects_another_buffer_and_changes_nothing():
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add(torch.randn(3, 2))
    before = buffer.state_dict()
    cases = [
        (ReplayBuffer(5).state_dict(), "capacity=5"),
        (ReplayBuffer(4, "random_replace").state_dict(), "policy='random_replace'"),
        ({"policy": "reservoir"}, "missing"),
        ({**before, "data": [torch.zeros(4, 3)]}, "does not match the layout"),
        (
            {**before, "layout": {**before["layout"], "specs": [{"ragged": False, "dtype": "nope", "shape": [2]}]}},
            "dtype",
        ),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            buffer.load_state_dict(state)
        assert_same_state(before, buffer.state_dict())


# --- construction and device ------------------------------------------------------------------------------------


def test_default_generator_follows_torch_manual_seed():
    def draws():
        torch.manual_seed(11)
        buffer = ReplayBuffer(3)
        buffer.add(torch.arange(50))
        return buffer.contents()

    assert torch.equal(draws(), draws())


def test_device_argument():
    buffer = ReplayBuffer(3, device=torch.device("cpu"))
    buffer.add(torch.arange(5))
    assert buffer.sample(2).device.type == "cpu"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_buffer_and_pinned_memory():
    gpu = ReplayBuffer(4, "diversity", feature_fn=lambda b: b[0], device="cuda", pool_size=2)
    gpu.add((torch.randn(9, 3), [torch.ones(2)] * 9))
    assert gpu.sample(2)[0].is_cuda and gpu.sample(2)[1][0].is_cuda
    pinned = ReplayBuffer(4, pin_memory=True)
    pinned.add((torch.randn(9, 3), [torch.ones(2)] * 9))
    x, seq = pinned.sample(2)
    assert x.is_pinned() and seq[0].is_pinned()


@pytest.mark.skipif(CUDA, reason="checks the error raised without CUDA")
def test_pin_memory_without_cuda_is_an_error():
    with pytest.raises(ValueError, match="pin_memory"):
        ReplayBuffer(4, pin_memory=True)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"capacity": 0}, ValueError, "capacity must be >= 1"),
        ({"capacity": 2.0}, TypeError, "capacity must be an integer"),
        ({"capacity": True}, TypeError, "capacity must be an integer"),
        ({"capacity": 3, "policy": "fifo"}, ValueError, "unknown policy"),
        ({"capacity": 3, "policy": "diversity"}, ValueError, "needs feature_fn"),
        ({"capacity": 3, "feature_fn": lambda b: b}, ValueError, "feature_fn belongs to policy='diversity'"),
        ({"capacity": 3, "label_key": 1}, ValueError, "label_key belongs to policy='class_balanced'"),
        ({"capacity": 3, "policy": "class_balanced", "label_key": 1.5}, TypeError, "label_key must be"),
        ({"capacity": 3, "policy": "diversity", "feature_fn": abs, "pool_size": 0}, ValueError, "pool_size must be"),
        ({"capacity": 3, "generator": 7}, TypeError, "torch.Generator"),
    ],
)
def test_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        ReplayBuffer(**kwargs)


# --- bad input: clear errors, nothing changed -------------------------------------------------------------------


def held_buffer(policy: str = "reservoir", **options) -> ReplayBuffer:
    buffer = ReplayBuffer(4, policy, generator=generator(0), **options)
    buffer.add((torch.randn(6, 3), torch.arange(6) % 2, [torch.ones(2), torch.ones(3)] * 3))
    return buffer


def good(n: int = 2) -> list:
    return [torch.randn(n, 3), torch.arange(n) % 2, [torch.ones(1)] * n]


def with_part(index: int, value) -> tuple:
    parts = good()
    parts[index] = value
    return tuple(parts)


BAD_ADDS = [
    ([torch.randn(2, 3)], TypeError, r"pass tuple\(batch\)"),
    ("text", TypeError, "a batch is a Tensor"),
    ((), ValueError, "at least one part"),
    ({1: torch.zeros(2)}, TypeError, "keys must be strings"),
    (with_part(0, [[1.0]]), TypeError, r"batch\[0\]\[0\] is a list"),
    (with_part(0, torch.tensor(1.0)), ValueError, r"batch\[0\] is 0-dimensional"),
    (with_part(0, torch.randn(3, 3)), ValueError, r"different first dimensions: batch\[0\] has 3"),
    (with_part(0, torch.randn(2, 3).to_sparse()), TypeError, "layout"),
    (with_part(2, [torch.ones(1), torch.ones(1, dtype=torch.int64)]), TypeError, r"batch\[2\]\[1\] has dtype"),
    (with_part(2, [torch.ones(1), torch.ones(1, 2)]), ValueError, r"batch\[2\]\[1\] has shape"),
    (with_part(2, [torch.ones(1), torch.tensor(1.0)]), ValueError, r"batch\[2\]\[1\] is 0-dimensional"),
    (torch.randn(2, 3), TypeError, "holds tuple batches; got a tensor batch"),
    (tuple(good()[:2]), ValueError, r"parts \[0, 1, 2\]; got \[0, 1\]"),
    (with_part(0, torch.randn(2, 3, dtype=torch.float64)), TypeError, r"batch\[0\] has dtype torch.float64"),
    (with_part(0, torch.randn(2, 4)), ValueError, r"batch\[0\] has examples of shape \(4,\)"),
    (with_part(1, [torch.ones(1)] * 2), TypeError, r"batch\[1\] is a list but the buffer holds tensors"),
    (with_part(2, torch.ones(2, 1)), TypeError, r"batch\[2\] is a tensor but the buffer holds lists"),
    (with_part(2, [torch.ones(1, dtype=torch.int32)] * 2), TypeError, r"batch\[2\] has dtype torch.int32"),
]


@pytest.mark.parametrize("batch, error, message", BAD_ADDS)
def test_rejected_add_changes_nothing(batch, error, message):
    buffer = held_buffer()
    before = buffer.state_dict()
    with pytest.raises(error, match=message):
        buffer.add(batch)
    assert_same_state(before, buffer.state_dict())


@pytest.mark.parametrize(
    "options, batch, error, message",
    [
        ({}, torch.zeros(3, 2), TypeError, "needs labels"),
        ({}, (torch.zeros(3, 2),), ValueError, "label_key 1 is not a part"),
        ({}, (torch.zeros(3, 2), torch.zeros(3)), TypeError, r"labels batch\[1\] must be an integer tensor"),
        ({}, (torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool)), TypeError, "must be an integer tensor"),
        ({}, (torch.zeros(3, 2), [torch.ones(1, dtype=torch.int64)] * 3), TypeError, "got a list"),
        ({}, (torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.int64)), ValueError, "must be 1-D"),
        ({}, {"x": torch.zeros(3, 2), "y": torch.zeros(3, dtype=torch.int64)}, ValueError, "needs label_key"),
        ({"label_key": "z"}, {"y": torch.zeros(3, dtype=torch.int64)}, ValueError, "label_key 'z' is not a part"),
    ],
)
def test_class_balanced_label_errors(options, batch, error, message):
    buffer = ReplayBuffer(4, "class_balanced", generator=generator(0), **options)
    before = buffer.state_dict()
    with pytest.raises(error, match=message):
        buffer.add(batch)
    assert_same_state(before, buffer.state_dict())


def test_class_balanced_negative_label_key():
    buffer = ReplayBuffer(4, "class_balanced", label_key=-1, generator=generator(0))
    buffer.add((torch.zeros(3, 2), torch.tensor([5, 5, 6])))
    assert class_counts(buffer) == {5: 2, 6: 1}


@pytest.mark.parametrize(
    "feature_fn, error, message",
    [
        (lambda b: b.tolist(), TypeError, "floating-point tensor"),
        (lambda b: b.long(), TypeError, "floating-point tensor"),
        (lambda b: b[:, 0], ValueError, r"return \(3, 2\) features"),
        (lambda b: b[:2], ValueError, r"got \(2, 2\)"),
        (lambda b: b[:, :1], ValueError, r"return \(3, 2\) features for this batch, got \(3, 1\)"),
        (lambda b: b / 0, ValueError, "NaN or infinite"),
    ],
)
def test_diversity_feature_errors(feature_fn, error, message):
    calls = {"n": 0}

    def first_good_then(batch):
        calls["n"] += 1
        return batch if calls["n"] == 1 else feature_fn(batch)

    buffer = ReplayBuffer(2, "diversity", feature_fn=first_good_then, generator=generator(0))
    buffer.add(torch.randn(3, 2))
    before = buffer.state_dict()
    with pytest.raises(error, match=message):
        buffer.add(torch.randn(3, 2))
    assert_same_state(before, buffer.state_dict())


def test_sample_and_contents_errors():
    empty = ReplayBuffer(3)
    with pytest.raises(ValueError, match="empty"):
        empty.sample(1)
    with pytest.raises(ValueError, match="empty"):
        empty.sample(0)
    with pytest.raises(ValueError, match="empty"):
        empty.contents()
    buffer = held_buffer()
    before = buffer.state_dict()
    with pytest.raises(ValueError, match="k must be >= 0"):
        buffer.sample(-1)
    with pytest.raises(TypeError, match="k must be an integer"):
        buffer.sample(1.0)
    with pytest.raises(ValueError, match="replace=True"):
        buffer.sample(5)
    assert_same_state(before, buffer.state_dict())
    with pytest.raises(ValueError, match="covering_radius"):
        buffer.covering_radius()
