"""ff.grad_moments (per-tensor count, mean, M2) on every backend against float64 truth."""

import pytest
import torch
from conftest import FUSED_BACKENDS, device_of, run_launch_variants
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff

SIZES = [0, 1, 97, 1025, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def truth(grads, inv_scale=1.0):
    rows = []
    for g in grads:
        x = g.double().reshape(-1) * inv_scale
        mean = x.mean() if x.numel() else torch.zeros((), dtype=torch.float64)
        rows.append([x.numel(), mean.item(), (x - mean).square().sum().item()])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 3)


def assert_moments(got, grads, inv_scale=1.0, rtol=2e-5):
    expected = truth(grads, inv_scale)
    assert got.shape == (len(grads), 3) and got.dtype in (torch.float32, torch.float64)
    got = got.double().cpu()
    assert torch.equal(got[:, 0], expected[:, 0])
    scale = expected[:, 1].abs() + (expected[:, 2] / expected[:, 0].clamp_min(1)).sqrt() + 1e-30
    torch.testing.assert_close(got[:, 1] / scale, expected[:, 1] / scale, rtol=0, atol=rtol)
    torch.testing.assert_close(got[:, 2], expected[:, 2], rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, size, dtype):
    g = torch.Generator().manual_seed(size)
    grads = [(3 + 2 * torch.randn(size, generator=g)).to(device_of(backend), dtype)]
    assert_moments(ff.grad_moments(grads, backend=backend), grads)


def test_mixed_list_inv_scale_and_many_tensors(backend):
    device = device_of(backend)
    grads = [torch.randn(33, 7), torch.randn(1025).bfloat16(), torch.zeros(0, 4), torch.randn(5000).half()]
    grads = [g.to(device) for g in grads] + [torch.randn(i % 7 + 1, device=device) for i in range(1100)]
    grads[0] = grads[0].t()  # non-contiguous
    assert_moments(ff.grad_moments(grads, inv_scale=torch.tensor(0.25), backend=backend), grads, 0.25)


@pytest.mark.parametrize("offset", [1e4, -3e5])
def test_no_cancellation_for_large_offsets(backend, offset):
    # sum(x^2) - sum(x)^2 / n in fp32 would lose every digit of M2 here
    g = torch.Generator().manual_seed(1)
    grads = [
        (offset + 1e-3 * torch.randn(200_000 if backend != "triton" else 20_000, generator=g)).to(device_of(backend))
    ]
    got = ff.grad_moments(grads, backend=backend)
    expected = truth(grads)  # the fp32 values, in fp64
    torch.testing.assert_close(got[0, 2].double().cpu(), expected[0, 2], rtol=1e-3, atol=0)


def test_non_finite_rows(backend):
    device = device_of(backend)
    grads = [torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 0.0])]
    got = ff.grad_moments([g.to(device) for g in grads], backend=backend).cpu()
    assert not got[0, 1:].isfinite().any() and got[1].isfinite().all() and not got[2, 1:].isfinite().all()


def test_bitwise_across_launches(fused_backend):
    device = device_of(fused_backend)
    grads = [torch.randn(300_000, device=device), torch.randn(77, device=device), torch.randn(4097, device=device)]
    results = run_launch_variants(lambda grads: ff.grad_moments(grads, backend=fused_backend).unbind(), (grads,))
    assert all(torch.equal(a, b) for r in results[1:] for a, b in zip(r, results[0]))


def test_bad_input(backend):
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.int64"):
        ff.grad_moments([torch.ones(3), torch.ones(3, dtype=torch.long)], backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta"):
        ff.grad_moments([torch.ones(3), torch.ones(3, device="meta")], backend=backend)
    with pytest.raises(ValueError, match="inv_scale must be finite"):
        ff.grad_moments([torch.ones(3)], inv_scale=float("inf"), backend=backend)
    assert ff.grad_moments([], backend=backend).shape == (0, 3)


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    op = ff.dispatch.native_op("grad_moments", fused_backend)
    for grads in (
        [torch.randn(4, 3, device=device), torch.randn(0, device=device)],
        [torch.randn(9, device=device).half()],
    ):
        torch.library.opcheck(op, (grads, torch.tensor(0.5, device=device)))


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    offset=st.floats(-100, 100),
    backend=st.sampled_from(FUSED_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_random_lists(sizes, offset, backend, seed):
    g = torch.Generator().manual_seed(seed)
    grads = [(offset + torch.randn(s, generator=g)).to(device_of(backend)) for s in sizes]
    assert_moments(ff.grad_moments(grads, backend=backend), grads)


def test_direct_op_call_checks_inv_scale(fused_backend):
    op = ff.dispatch.native_op("grad_moments", fused_backend)
    with pytest.raises(RuntimeError, match="inv_scale has 2 elements; expected 1"):
        op([torch.ones(3)], torch.ones(2))


def misaligned(t):
    """A contiguous copy of t whose data start one element into their storage: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_match_aligned(fused_backend, dtype):
    # Triton's vector path needs 16-byte aligned data; other tensors (here every other one) take the scalar path
    grads = [(3 + torch.randn(s)).to(dtype) for s in [(2 * 4096 + 37,), (5, 3), (4100,)]]
    aligned = ff.grad_moments(grads, backend=fused_backend)
    mixed = ff.grad_moments([misaligned(g) if i % 2 == 0 else g for i, g in enumerate(grads)], backend=fused_backend)
    torch.testing.assert_close(mixed, aligned, rtol=1e-6, atol=0)  # sums: the same up to their order
