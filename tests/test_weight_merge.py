"""ff.weight_merge_ (linear and Fisher-weighted averaging of K models, in place) on every backend, against the fp64
formulas and the pure-torch reference."""

import pytest
import torch
from conftest import FUSED_BACKENDS, device_of, run_launch_variants
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.testing import assert_close

SIZES = [0, 1, 97, 1025, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
WEIGHTS = [0.2, 0.5, 0.3]
FLOORS = [1e-6, 0.0, 0.0]


def make_case(shapes, dtypes, device, models=3, seed=0):
    """out, K model lists, K Fisher lists; dtypes[k] is model k's dtype (and its Fisher's), dtypes[-1] out's."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g).to(device, dtypes[-1]) for s in shapes]
    thetas = [[torch.randn(s, generator=g).to(device, dtypes[k % len(dtypes)]) for s in shapes] for k in range(models)]
    fisher = [[torch.rand(s, generator=g).to(device, dtypes[k % len(dtypes)]) for s in shapes] for k in range(models)]
    return out, thetas, fisher


def formula(models, weights, fisher=None, floors=None):
    """The merge in fp64, per tensor."""
    merged = []
    for i in range(len(models[0])):
        thetas = [m[i].double() for m in models]
        if fisher is None:
            merged.append(sum(w * t for w, t in zip(weights, thetas)))
        else:
            scaled = [w * f[i].double().clamp_min(fl) for w, f, fl in zip(weights, fisher, floors)]
            merged.append(sum(s * t for s, t in zip(scaled, thetas)) / sum(scaled))
    return merged


def check_merge(out, models, backend, fisher=None, weights=WEIGHTS, floors=FLOORS):
    floors = floors[: len(models)] if fisher is not None else None
    expected = formula(models, weights[: len(models)], fisher, floors)
    reference = [o.clone() for o in out]
    ff.weight_merge_ref(reference, models, weights[: len(models)], fisher, floors)
    ff.weight_merge_(out, models, weights[: len(models)], fisher=fisher, floors=floors, backend=backend)
    for o, r, e in zip(out, reference, expected):
        assert o.dtype == r.dtype
        assert_close(o, r)
        assert_close(o, e.to(o.dtype), dtype=o.dtype)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fisher", [False, True], ids=["linear", "fisher"])
def test_matches_formula(backend, size, dtype, fisher):
    out, models, fishers = make_case([(size,)], [torch.float32, torch.bfloat16, dtype], device_of(backend))
    check_merge(out, models, backend, fishers if fisher else None)


@pytest.mark.parametrize("num_models", [1, 2, 5])
def test_any_number_of_models(backend, num_models):
    out, models, fishers = make_case([(97,), (3, 5)], DTYPES, device_of(backend), models=num_models)
    weights, floors = [0.1 * (k + 1) for k in range(num_models)], [1e-6] * num_models
    check_merge(out, models, backend, None, weights, floors)
    check_merge(out, models, backend, fishers, weights, floors)


def test_formula_by_hand(backend):
    out = [torch.zeros(3)]
    theta0, theta1 = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([3.0, 6.0, 8.0])
    f0, f1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 3.0, 0.0])
    ff.weight_merge_(out, [[theta0], [theta1]], [0.5, 0.5], fisher=[[f0], [f1]], floors=[0.25, 0.0], backend=backend)
    # element 1: F~_0 = 0.25 (floored), element 2: only the floored first model counts
    assert_close(out[0], torch.tensor([2.0, (0.25 * 2 + 3 * 6) / 3.25, 4.0], dtype=torch.float64), torch.float32)
    ff.weight_merge_(out, [[theta0], [theta1]], [0.25, 0.75], backend=backend)
    assert out[0].tolist() == [2.5, 5.0, 7.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wise_ft_in_place(backend, dtype):
    """out is one of its own sources: theta <- (1 - a) theta_0 + a theta, written over theta."""
    _, (base, params), _ = make_case([(1025,), (33, 7), (1,)], [torch.float32, dtype], device_of(backend), models=2)
    expected = formula([base, params], [0.3, 0.7])
    ff.weight_merge_(params, [base, params], [0.3, 0.7], backend=backend)
    for p, e in zip(params, expected):
        assert_close(p, e.to(dtype), dtype=dtype)


def test_ewc_state_as_a_source(backend):
    """bf16 parameters merged with fp32 anchors and Fisher (an EWC object's state_dtype)."""
    device = device_of(backend)
    out, models, fishers = make_case([(97,), (4, 9)], [torch.bfloat16, torch.float32, torch.bfloat16], device, 2)
    check_merge(out, models, backend, fishers)


def test_non_contiguous_mixed_and_many_tensors(backend):
    device = device_of(backend)
    out, models, fishers = make_case([(33, 7), (5,), (0, 3), (1025,)], DTYPES, device)
    out[0] = out[0].t().contiguous().t()  # transposed strides
    models[1][0] = models[1][0].t().contiguous().t()  # same shape, transposed strides
    fishers[2][3] = torch.rand(2050, device=device)[::2]
    check_merge(out, models, backend, fishers)
    check_merge(*make_case([(i % 5 + 1,) for i in range(1100)], DTYPES, device)[:2], backend)


def test_fp64(backend):
    out, models, fishers = make_case([(100,), (3, 3)], [torch.float64], device_of(backend))
    check_merge(out, models, backend, fishers)


def test_nan_fisher_stays_nan(backend):
    out = [torch.zeros(2)]
    f = [[torch.tensor([float("nan"), 1.0])], [torch.ones(2)]]
    ff.weight_merge_(out, [[torch.ones(2)], [torch.ones(2)]], [0.5, 0.5], fisher=f, floors=[1e-6, 0], backend=backend)
    assert out[0][0].isnan() and out[0][1].item() == 1.0


def test_bitwise_across_launches(fused_backend):
    out, models, fishers = make_case([(200_003,), (7,), (4099,)], DTYPES, device_of(fused_backend))

    def launch(out, *sources):
        result = [o.clone() for o in out]
        ff.weight_merge_(result, [sources[0], sources[1], sources[2]], WEIGHTS, fisher=list(sources[3:]),
                         floors=FLOORS, backend=fused_backend)  # fmt: skip
        return result

    results = run_launch_variants(launch, (out, *models, *fishers))
    assert all(torch.equal(a, b) for res in results[1:] for a, b in zip(res, results[0]))


def _bad(out, models, fisher):
    return {
        "models_type": ((out, "models", WEIGHTS), {}, TypeError, r"models must be a non-empty list"),
        "weights_length": ((out, models, [0.5, 0.5]), {}, ValueError, r"weights must be a list of 3"),
        "weight_negative": ((out, models, [0.5, -0.1, 0.6]), {}, ValueError, r"weights\[1\]"),
        "weight_nan": ((out, models, [0.5, float("nan"), 0.6]), {}, ValueError, r"weights\[1\]"),
        "model_length": ((out, [models[0], models[1][:1], models[2]], WEIGHTS), {}, ValueError,
                         r"models\[1\] has 1 tensors but out has 2"),
        "shape": ((out, [models[0], [models[1][0], models[1][1].reshape(-1, 1)], models[2]], WEIGHTS), {},
                  ValueError, r"models\[1\]\[1\] has shape"),
        "dtype": ((out, [models[0], [models[1][0].long(), models[1][1]], models[2]], WEIGHTS), {}, TypeError,
                  r"models\[1\]\[0\] has dtype torch.int64"),
        "device": ((out, [models[0], [models[1][0].to("meta"), models[1][1]], models[2]], WEIGHTS), {},
                   ValueError, r"is on meta"),
        "fisher_length": ((out, models, WEIGHTS), dict(fisher=fisher[:2]), ValueError, r"fisher must be a list"),
        "fisher_shape": ((out, models, WEIGHTS), dict(fisher=[fisher[0], fisher[1], [fisher[2][0], fisher[2][0]]]),
                         ValueError, r"fisher\[2\]\[1\] has shape"),
        "floors_length": ((out, models, WEIGHTS), dict(fisher=fisher, floors=[0.1]), ValueError, r"floors must be"),
        "floor_negative": ((out, models, WEIGHTS), dict(fisher=fisher, floors=[0.1, -1.0, 0]), ValueError,
                           r"floors\[1\]"),
        "floors_without_fisher": ((out, models, WEIGHTS), dict(floors=FLOORS), ValueError, r"pass fisher"),
        "partial_alias": ((out, [models[0], [out[0][:2], models[1][1]], models[2]], WEIGHTS), {}, ValueError,
                          r"shape|shares memory"),
    }  # fmt: skip


BAD_CASES = list(_bad(*make_case([(4, 3), (5,)], [torch.float32], "cpu")))


@pytest.mark.parametrize("case", BAD_CASES, ids=str)
def test_bad_input_changes_nothing(backend, case):
    out, models, fisher = make_case([(4, 3), (5,)], [torch.float32], "cpu")
    before = [o.clone() for o in out]
    args, kwargs, error, message = _bad(out, models, fisher)[case]
    with pytest.raises(error, match=message):
        ff.weight_merge_(*args, **kwargs, backend=backend)
    assert all(torch.equal(o, b) for o, b in zip(out, before))


def test_overlapping_source_is_rejected():
    flat = torch.zeros(10)
    with pytest.raises(ValueError, match=r"shares memory with out\[0\]"):
        ff.weight_merge_([flat[:6]], [[flat[4:]]], [1.0])
    assert torch.equal(flat, torch.zeros(10))


def test_empty_list_is_a_no_op(backend):
    assert ff.weight_merge_([], [[], []], [0.5, 0.5], backend=backend) is None


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    op = ff.dispatch.native_op("weight_merge", fused_backend)
    out, models, fishers = make_case([(4, 3), (70,), (0,)], DTYPES, device)
    flat, flat_fisher = [t for m in models for t in m], [t for f in fishers for t in f]
    torch.library.opcheck(op, (out, flat, [], WEIGHTS, []))
    torch.library.opcheck(op, (out, flat, flat_fisher, WEIGHTS, FLOORS))


def test_torch_compile_fullgraph(fused_backend):
    out, models, fishers = make_case([(30, 20), (97,)], [torch.float32], device_of(fused_backend))
    expected = formula(models, WEIGHTS, fishers, FLOORS)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def merge(out, models, fishers):
        ff.weight_merge_(out, models, WEIGHTS, fisher=fishers, floors=FLOORS, backend=fused_backend)

    merge(out, models, fishers)
    for o, e in zip(out, expected):
        assert_close(o, e.float())


def test_direct_op_call_checks_lists(fused_backend):
    op = ff.dispatch.native_op("weight_merge", fused_backend)
    out = [torch.ones(4), torch.ones(3)]
    with pytest.raises(RuntimeError, match=r"models has 3 tensors; expected 2 x 2"):
        op(out, [torch.ones(4), torch.ones(3), torch.ones(4)], [], [0.5, 0.5], [])
    with pytest.raises(RuntimeError, match=r"shape|source"):
        op(out, [torch.ones(4), torch.ones(2)], [], [1.0], [])
    assert all(torch.equal(o, torch.ones_like(o)) for o in out)


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4),
    num_models=st.integers(1, 4),
    fisher=st.booleans(),
    backend=st.sampled_from(FUSED_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_random_lists(sizes, dtypes, num_models, fisher, backend, seed):
    out, models, fishers = make_case([(s,) for s in sizes], dtypes, device_of(backend), num_models, seed)
    weights, floors = [0.25 + k for k in range(num_models)], [1e-3] * num_models
    check_merge(out, models, backend, fishers if fisher else None, weights, floors)
