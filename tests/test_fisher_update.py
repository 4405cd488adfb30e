"""ff.fisher_update_ (F <- decay F + scale g^2, in place) on every backend against the pure-torch reference."""

import pytest
import torch
from conftest import FUSED_BACKENDS, device_of, run_launch_variants
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.testing import assert_close

DECAY, SCALE = 0.9, 0.5
SIZES = [0, 1, 97, 1025, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_case(shapes, fisher_dtype, grad_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    fisher = [torch.rand(s, generator=g).to(device, fisher_dtype) for s in shapes]
    grads = [(2 * torch.randn(s, generator=g)).to(device, grad_dtype) for s in shapes]
    return fisher, grads


def check_against_reference(fisher, grads, backend, decay=DECAY, scale=SCALE):
    expected = [f.clone() for f in fisher]
    ff.fisher_update_ref(expected, grads, decay, scale)
    ff.fisher_update_(fisher, grads, decay, scale, backend=backend)
    for f, e in zip(fisher, expected):
        assert f.dtype == e.dtype
        assert_close(f, e)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("fisher_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_dtype", DTYPES, ids=str)
def test_matches_reference(backend, size, fisher_dtype, grad_dtype):
    check_against_reference(*make_case([(size,)], fisher_dtype, grad_dtype, device_of(backend)), backend)


@pytest.mark.parametrize("samples", [0, 1, 3])
@pytest.mark.parametrize("fisher_dtype", DTYPES, ids=str)
def test_stacked_gradients(backend, samples, fisher_dtype):
    # grads[i] of shape (k, *F.shape): F <- decay F + scale sum_s g_s^2 (per-sample gradients from vmap)
    device = device_of(backend)
    fisher, _ = make_case([(97,), (33, 7), (0,), (1025,)], fisher_dtype, torch.float32, device)
    _, stacks = make_case(
        [(samples, 97), (samples, 33, 7), (samples, 0), (samples, 1025)], fisher_dtype, torch.float32, device, seed=3
    )
    stacks[1] = stacks[1].bfloat16()
    check_against_reference(fisher, stacks, backend)


def test_stacked_gradients_formula(backend):
    f = torch.tensor([1.0, 2.0])
    ff.fisher_update_(f, torch.tensor([[3.0, -1.0], [1.0, 2.0]]), decay=0.5, scale=2.0, backend=backend)
    assert f.tolist() == [0.5 + 2.0 * (9.0 + 1.0), 1.0 + 2.0 * (1.0 + 4.0)]


def test_formula(backend):
    f, g = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    ff.fisher_update_(f, g, decay=0.5, scale=2.0, backend=backend)
    assert f.tolist() == [0.5 + 18.0, 1.0 + 2.0]


def test_mixed_list_non_contiguous_and_many_tensors(backend):
    device = device_of(backend)
    fisher, grads = make_case([(33, 7), (5,), (0, 3), (1025,)], torch.float32, torch.float32, device)
    fisher = [fisher[0].t(), fisher[1].bfloat16(), fisher[2], fisher[3].half()]  # transposed, mixed dtypes
    grads = [grads[0].t(), grads[1], grads[2].bfloat16(), grads[3][::1]]
    check_against_reference(fisher, grads, backend)
    check_against_reference(
        *make_case([(i % 5 + 1,) for i in range(1100)], torch.float32, torch.float32, device), backend
    )


def test_fp64(backend):
    check_against_reference(*make_case([(100,), (3, 3)], torch.float64, torch.float64, device_of(backend)), backend)


def test_bitwise_across_launches(fused_backend):
    fisher, grads = make_case([(200_003,), (7,), (4099,)], torch.float32, torch.bfloat16, device_of(fused_backend))

    def launch(fisher, grads):
        out = [f.clone() for f in fisher]
        ff.fisher_update_(out, grads, DECAY, SCALE, backend=fused_backend)
        return out

    results = run_launch_variants(launch, (fisher, grads))
    assert all(torch.equal(a, b) for out in results[1:] for a, b in zip(out, results[0]))


BAD_INPUTS = {
    "length": (lambda f, g: (f, g[:1]), ValueError, r"grads has 1 tensors but fisher has 2"),
    "shape": (lambda f, g: (f, [g[0], g[1].reshape(5, 1)]), ValueError, r"grads\[1\] has shape \(5, 1\); expected"),
    "stack": (lambda f, g: (f, [g[0].expand(2, 4, 3).reshape(4, 2, 3), g[1]]), ValueError, r"grads\[0\] has shape"),
    "device": (lambda f, g: (f, [g[0].to("meta"), g[1]]), ValueError, r"grads\[0\] is on meta"),
    "int_fisher": (lambda f, g: ([f[0], f[1].long()], g), TypeError, r"fisher\[1\] has dtype torch.int64"),
    "int_grads": (lambda f, g: (f, [g[0].int(), g[1]]), TypeError, r"grads\[0\] has dtype torch.int32"),
    "not_tensor": (lambda f, g: (f, [g[0], [1.0]]), TypeError, r"grads\[1\] is a list, not a Tensor"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
def test_bad_input_changes_nothing(backend, case):
    make_bad, error, message = BAD_INPUTS[case]
    fisher, grads = make_case([(4, 3), (5,)], torch.float32, torch.float32, "cpu")
    before = [f.clone() for f in fisher]
    with pytest.raises(error, match=message):
        ff.fisher_update_(*make_bad(fisher, grads), DECAY, SCALE, backend=backend)
    assert all(torch.equal(f, b) for f, b in zip(fisher, before))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(decay=float("nan")), ValueError),
        (dict(scale=float("inf")), ValueError),
        (dict(decay=-0.5), ValueError),
        (dict(scale=-1.0), ValueError),
        (dict(scale="1"), TypeError),
    ],
)
def test_bad_scalars_change_nothing(kwargs, error):
    fisher, grads = make_case([(6,)], torch.float32, torch.float32, "cpu")
    before = fisher[0].clone()
    with pytest.raises(error, match=next(iter(kwargs))):
        ff.fisher_update_(fisher, grads, **kwargs)
    assert torch.equal(fisher[0], before)


def test_mixed_fp64_and_16_bit_list(backend):
    fisher, grads = make_case([(50,), (3, 7), (1025,)], torch.float64, torch.float64, device_of(backend))
    fisher = [fisher[0], fisher[1].bfloat16(), fisher[2].half()]
    check_against_reference(fisher, [grads[0], grads[1].bfloat16(), grads[2]], backend)


def test_self_overlapping_fisher_is_rejected():
    shared = torch.ones(1)
    with pytest.raises(ValueError, match=r"fisher\[0\] has elements that share memory"):
        ff.fisher_update_([shared.expand(3)], [torch.ones(3)])
    assert shared.item() == 1.0


def test_overlapping_fisher_is_rejected():
    flat = torch.zeros(10)
    with pytest.raises(ValueError, match=r"fisher\[0\] and fisher\[1\] overlap"):
        ff.fisher_update_([flat[:6], flat[4:]], [torch.ones(6), torch.ones(6)])
    assert torch.equal(flat, torch.zeros(10))


def test_empty_list_is_a_no_op(backend):
    assert ff.fisher_update_([], [], backend=backend) is None


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    op = ff.dispatch.native_op("fisher_update", fused_backend)
    for case in (
        make_case([(4, 3), (70,), (0,)], torch.float32, torch.float32, device),
        make_case([(9,)], torch.bfloat16, torch.float16, device),
    ):
        torch.library.opcheck(op, (*case, DECAY, SCALE))


def test_torch_compile_fullgraph(fused_backend):
    fisher, grads = make_case([(30, 20), (97,)], torch.float32, torch.float32, device_of(fused_backend))
    expected = [f.clone() for f in fisher]
    ff.fisher_update_ref(expected, grads, DECAY, SCALE)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(fisher, grads):
        ff.fisher_update_(fisher, grads, DECAY, SCALE, backend=fused_backend)

    step(fisher, grads)
    for f, e in zip(fisher, expected):
        assert_close(f, e)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    dtypes=st.lists(st.sampled_from(DTYPES), min_size=12, max_size=12),
    decay=st.floats(0, 1),
    scale=st.floats(0, 10),
    backend=st.sampled_from(FUSED_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_random_lists(sizes, dtypes, decay, scale, backend, seed):
    fisher, grads = make_case([(s,) for s in sizes], torch.float32, torch.float32, device_of(backend), seed=seed)
    fisher = [f.to(d) for f, d in zip(fisher, dtypes)]
    grads = [g.to(d) for g, d in zip(grads, dtypes[6:])]
    check_against_reference(fisher, grads, backend, decay, scale)


def test_direct_op_call_checks_shapes(fused_backend):
    op = ff.dispatch.native_op("fisher_update", fused_backend)
    fisher = [torch.ones(4), torch.ones(3)]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        op(fisher, [torch.ones(4), torch.ones(2)], DECAY, SCALE)
    assert all(torch.equal(f, torch.ones_like(f)) for f in fisher)


def misaligned(t):
    """A contiguous copy of t whose data start one element into their storage: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("fisher_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_match_aligned(fused_backend, fisher_dtype):
    # Triton's vector path needs 16-byte aligned data (and, for stacked gradients, aligned samples: 4097 fp32
    # elements per sample are not); other tensors (here every other one) take the scalar path
    fisher, grads = make_case(
        [(2 * 4096 + 37,), (5, 3), (4100,)], fisher_dtype, torch.float32, device_of(fused_backend)
    )
    grads[2] = torch.randn(2, 4100)
    fisher.append(torch.rand(4097).to(fisher_dtype))
    grads.append(torch.randn(2, 4097))
    aligned = [f.clone() for f in fisher]
    mixed = [misaligned(f) if i % 2 == 0 else f.clone() for i, f in enumerate(fisher)]
    ff.fisher_update_(aligned, grads, DECAY, SCALE, backend=fused_backend)
    ff.fisher_update_(
        mixed, [misaligned(g) if i % 2 == 0 else g for i, g in enumerate(grads)], DECAY, SCALE, backend=fused_backend
    )
    assert mixed[0].storage_offset() == 1 and all(torch.equal(a, m) for a, m in zip(aligned, mixed))


@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stacked"])
def test_absolute_accumulates_abs_gradients(backend, stacked):
    """absolute=True (MAS's importance): F <- decay F + scale sum_s |g_s|, against the fp64 formula."""
    fisher, grads = make_case([(1025,), (3, 7)], torch.float32, torch.bfloat16, device_of(backend))
    if stacked:
        grads = [torch.randn(3, *f.shape).to(f.device, torch.bfloat16) for f in fisher]
    expected = [
        DECAY * f.double() + SCALE * (g.double().abs().sum(0) if stacked else g.double().abs())
        for f, g in zip(fisher, grads)
    ]
    ff.fisher_update_(fisher, grads, DECAY, SCALE, absolute=True, backend=backend)
    for f, e in zip(fisher, expected):
        torch.testing.assert_close(f.double(), e, rtol=1e-6, atol=1e-6)


def test_absolute_must_be_a_bool(backend):
    fisher, grads = make_case([(4,)], torch.float32, torch.float32, device_of(backend))
    before = [f.clone() for f in fisher]
    with pytest.raises(TypeError, match="absolute must be a bool"):
        ff.fisher_update_(fisher, grads, absolute=1, backend=backend)
    assert all(torch.equal(f, b) for f, b in zip(fisher, before))
