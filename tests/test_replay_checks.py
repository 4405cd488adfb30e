"""ReplayBuffer's guards (issue R): stored examples are detached, a state is checked as a whole before any of it
is applied, sizes the machine cannot hold fail before allocating. A rejected call leaves the buffer as it was."""

import math

import pytest
import torch
from test_replay import assert_same_state, mixed_batch, policy_buffer

from fastforget.replay import ReplayBuffer


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def filled(policy: str) -> ReplayBuffer:
    buffer = policy_buffer(policy, seed=3)
    for step in range(5):
        buffer.add(mixed_batch(step))
    return buffer


def assert_rejected(buffer: ReplayBuffer, call, error, message) -> None:
    before = buffer.state_dict()
    with pytest.raises(error, match=message):
        call()
    assert_same_state(before, buffer.state_dict())


# --- stored examples are detached ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reservoir", "random_replace", "class_balanced", "diversity"])
def test_add_stores_detached_copies(policy):
    weight = torch.randn(2, 2, requires_grad=True)
    buffer = policy_buffer(policy, seed=0)
    for step in range(4):
        batch = mixed_batch(step)
        batch["x"] = batch["x"] @ weight  # a part that carries an autograd graph
        batch["seq"] = [(s.float() * weight[0, 0]) for s in batch["seq"]]
        buffer.add(batch)
    assert weight.grad is None
    for sampled in (buffer.sample(3), buffer.contents()):
        for t in [sampled["x"], *sampled["seq"]]:
            assert not t.requires_grad and t.grad_fn is None
    for store in buffer._storage.parts:
        for t in store if isinstance(store, list) else [store]:
            assert t is None or (not t.requires_grad and t.grad_fn is None)


def test_a_replay_backward_reaches_only_the_current_step():
    model = torch.nn.Linear(3, 3)
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add(model(torch.randn(4, 3, generator=generator(1))))  # outputs of an old step, with its graph
    replayed, x = buffer.sample(2), torch.randn(2, 3, generator=generator(2))
    (model(x) * replayed).sum().backward()
    expected = torch.autograd.grad((model(x) * replayed.detach()).sum(), model.weight)[0]
    assert torch.equal(model.weight.grad, expected)  # nothing flowed back into the old step's graph


# --- load_state_dict: the whole state is checked before anything is applied -------------------------------------


def corrupted(policy: str, **changes) -> dict:
    state = filled(policy).state_dict()
    state.update(changes)
    return state


def owner_with(index: int, value: int) -> dict:
    state = filled("class_balanced").state_dict()
    owner = state["owner"].clone()
    owner[index] = value
    return {**state, "owner": owner}


def ragged_hole(policy: str) -> dict:
    state = filled(policy).state_dict()
    seq = list(state["data"][1])
    seq[0] = None
    return {**state, "data": [state["data"][0], seq, state["data"][2]]}


BAD_STATES = [
    ("reservoir", lambda: corrupted("reservoir", count=8), ValueError, r"state\['count'\] must be <= 7"),
    ("reservoir", lambda: corrupted("reservoir", count=-1), ValueError, r"state\['count'\] must be >= 0"),
    ("reservoir", lambda: corrupted("reservoir", count=6.5), TypeError, r"state\['count'\] must be an integer"),
    ("reservoir", lambda: corrupted("reservoir", count=6), ValueError, r"count=6 after seen=25"),
    ("reservoir", lambda: corrupted("reservoir", seen=-3), ValueError, r"state\['seen'\] must be >= 0"),
    ("reservoir", lambda: corrupted("reservoir", seen=float("nan")), TypeError, r"state\['seen'\] must be an integer"),
    ("reservoir", lambda: corrupted("reservoir", generator=torch.zeros(3)), ValueError, "generator must be a uint8"),
    ("reservoir", lambda: corrupted("reservoir", layout=None), ValueError, "layout and data must be saved"),
    ("reservoir", lambda: ragged_hole("reservoir"), ValueError, r"stored batch\['seq'\] does not match"),
    ("random_replace", lambda: corrupted("random_replace", count=2), ValueError, "count=2 after seen=25"),
    ("class_balanced", lambda: owner_with(0, 4), ValueError, r"class index outside \[-1, 4\)"),
    ("class_balanced", lambda: owner_with(0, -2), ValueError, r"class index outside \[-1, 4\)"),
    ("class_balanced", lambda: corrupted("class_balanced", count=5), ValueError, "owner marks 7 slots"),
    (
        "class_balanced",
        lambda: corrupted("class_balanced", class_seen=torch.tensor([30, -2, -3, 0])),
        ValueError,
        "class_seen",
    ),
    ("class_balanced", lambda: corrupted("class_balanced", classes=[0, 1, 1]), ValueError, "repeats"),
    ("class_balanced", lambda: corrupted("class_balanced", classes=[0, 1.5, 2]), ValueError, "integer labels"),
    (
        "class_balanced",
        lambda: corrupted("class_balanced", owner=torch.zeros(7, dtype=torch.long)),
        ValueError,
        "more than their examples or quotas",
    ),
    ("diversity", lambda: corrupted("diversity", pending=3), ValueError, r"state\['pending'\] must be <= 2"),
    ("diversity", lambda: corrupted("diversity", selection_radius=math.nan), ValueError, "must be finite"),
    ("diversity", lambda: corrupted("diversity", selection_radius=-1.0), ValueError, "must be >= 0"),
    (
        "diversity",
        lambda: corrupted("diversity", features=torch.full((10, 2), math.inf)),
        ValueError,
        "finite floating-point",
    ),
    ("diversity", lambda: corrupted("diversity", features=torch.zeros(9, 2)), ValueError, r"\(capacity \+ pool_size"),
    ("diversity", lambda: corrupted("diversity", features=None), ValueError, "features must be saved"),
]


@pytest.mark.parametrize("policy, make_state, error, message", BAD_STATES)
def test_load_state_dict_rejects_impossible_states_and_changes_nothing(policy, make_state, error, message):
    buffer = filled(policy)
    buffer.add(mixed_batch(7))
    assert_rejected(buffer, lambda: buffer.load_state_dict(make_state()), error, message)
    buffer.add(mixed_batch(8))  # still usable


def test_a_rejected_load_leaves_an_empty_buffer_empty():
    buffer = policy_buffer("class_balanced", seed=0)
    assert_rejected(buffer, lambda: buffer.load_state_dict(owner_with(1, 9)), ValueError, "class index")
    assert len(buffer) == 0 and buffer._layout is None and buffer._storage is None


# --- sizes: refused before allocating, with the figure ----------------------------------------------------------


@pytest.mark.parametrize("policy, options", [("reservoir", {}), ("class_balanced", {})])
def test_a_capacity_beyond_memory_is_refused_at_construction(policy, options):
    message = r"ReplayBuffer of 4611686018427387904 slots .* would need 34359738368.0 GiB but cpu has"
    with pytest.raises(ValueError, match=message):
        ReplayBuffer(2**62, policy, **options)


def test_a_diversity_pool_beyond_memory_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"ReplayBuffer of 4611686018427387908 slots"):
        ReplayBuffer(4, "diversity", feature_fn=lambda b: b, pool_size=2**62)


def test_storage_beyond_memory_is_refused_at_the_first_add_before_allocating():
    buffer = ReplayBuffer(10**9, generator=generator(0))  # bookkeeping fits; 4 KiB examples do not (~3.7 TiB)
    message = r"storage for 1000000000 examples would need 3814.7 GiB"
    assert_rejected(buffer, lambda: buffer.add(torch.zeros(2, 1024)), ValueError, message)
    assert buffer._storage is None and buffer._layout is None and buffer.seen == 0


def test_diversity_features_beyond_memory_are_refused_at_the_first_add():
    buffer = ReplayBuffer(10**6, "diversity", feature_fn=lambda b: b.expand(-1, 10**8), generator=generator(0))
    message = r"diversity features of shape \(2000000, 100000000\)"
    assert_rejected(buffer, lambda: buffer.add(torch.zeros(2, 1)), ValueError, message)
    assert buffer._storage is None and buffer.seen == 0


def test_sample_with_replacement_beyond_memory_is_refused_before_drawing():
    buffer = ReplayBuffer(4, generator=generator(0))
    buffer.add((torch.zeros(4, 1024), [torch.ones(3)] * 4))
    message = r"sample\(k=1000000000, replace=True\) would need"
    assert_rejected(buffer, lambda: buffer.sample(10**9, replace=True), ValueError, message)
    assert buffer.sample(9, replace=True)[0].shape == (9, 1024)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda b: b.sample(math.nan), TypeError, "k must be an integer"),
        (lambda b: b.sample(math.inf, replace=True), TypeError, "k must be an integer"),
        (lambda b: b.sample(2, replace="yes"), TypeError, "replace must be a bool"),
    ],
)
def test_non_finite_and_non_bool_arguments(call, error, message):
    buffer = filled("reservoir")
    assert_rejected(buffer, lambda: call(buffer), error, message)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"capacity": math.inf}, TypeError, "capacity must be an integer"),
        ({"capacity": math.nan}, TypeError, "capacity must be an integer"),
        ({"capacity": 3, "policy": "diversity", "feature_fn": abs, "pool_size": math.nan}, TypeError, "pool_size"),
        ({"capacity": 3, "pin_memory": 1}, TypeError, "pin_memory must be a bool"),
        ({"capacity": 3, "policy": ["reservoir"]}, ValueError, "unknown policy"),
    ],
)
def test_bad_construction_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ReplayBuffer(**kwargs)
