"""ff.scale_grads_ (grads[i] *= factors[i], in place) on every backend against the reference."""

import pytest
import torch
from conftest import device_of

import fastforget as ff
from fastforget.testing import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_matches_reference(backend, dtype):
    device = device_of(backend)
    grads = [torch.randn(s, device=device).to(dtype) for s in [(97,), (0,), (33, 7), (65537,)]]
    grads[2] = grads[2].t()  # non-contiguous: updated through a copy
    factors = torch.tensor([0.5, 2.0, -1.25, 0.75], device=device)
    expected = [g.clone() for g in grads]
    ff.scale_grads_ref(expected, factors)
    ff.scale_grads_(grads, factors, backend=backend)
    for g, e in zip(grads, expected):
        assert g.dtype == dtype
        assert_close(g, e)


def test_mixed_dtypes_and_many_tensors(backend):
    device = device_of(backend)
    grads = [torch.ones(i % 5 + 1, device=device, dtype=(torch.float32, torch.bfloat16)[i % 2]) for i in range(1100)]
    factors = torch.linspace(0, 1, 1100, device=device)
    ff.scale_grads_(grads, factors, backend=backend)
    for g, f in zip(grads, factors):
        assert_close(g, torch.full_like(g, f.item()))


def test_bad_input_changes_nothing(backend):
    grads = [torch.ones(3), torch.ones(4)]
    with pytest.raises(ValueError, match="factors has 3 entries but grads has 2"):
        ff.scale_grads_(grads, torch.ones(3), backend=backend)
    with pytest.raises(TypeError, match="1-D floating point"):
        ff.scale_grads_(grads, torch.ones(2, dtype=torch.long), backend=backend)
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] are the same tensor"):
        ff.scale_grads_([grads[0], grads[0]], torch.zeros(2), backend=backend)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    op = ff.dispatch.native_op("scale_grads", fused_backend)
    grads = [torch.randn(4, 3, device=device), torch.randn(9, device=device).half()]
    torch.library.opcheck(op, (grads, torch.tensor([0.5, 2.0], device=device)))


def test_direct_op_call_checks_factors(fused_backend):
    op = ff.dispatch.native_op("scale_grads", fused_backend)
    grads = [torch.ones(3), torch.ones(2)]
    with pytest.raises(RuntimeError, match="factors has 1"):
        op(grads, torch.ones(1))
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


def misaligned(t):
    """A contiguous copy of t whose data start one element into their storage: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_match_aligned(fused_backend, dtype):
    # Triton's vector path needs 16-byte aligned data; other tensors (here every other one) take the scalar path
    grads = [torch.randn(s).to(dtype) for s in [(2 * 4096 + 37,), (5, 3), (4100,)]]
    factors = torch.tensor([0.5, -3.0, 1.25])
    aligned = [g.clone() for g in grads]
    mixed = [misaligned(g) if i % 2 == 0 else g.clone() for i, g in enumerate(grads)]
    assert mixed[0].storage_offset() == 1
    ff.scale_grads_(aligned, factors, backend=fused_backend)
    ff.scale_grads_(mixed, factors, backend=fused_backend)
    assert mixed[0].storage_offset() == 1 and all(torch.equal(a, m) for a, m in zip(aligned, mixed))
