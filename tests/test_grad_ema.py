"""ff.grad_ema_protect_ (per-element EMA variance protection) on every backend against a float64 reference."""

import math

import pytest
import torch
from conftest import FUSED_BACKENDS, device_of, run_launch_variants
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.testing import assert_close

SIZES = [0, 1, 97, 1025, 65537]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(shapes, device, dtype=torch.float32, seed=0):
    """gradients in `dtype` and a state that has seen a few steps (mean ~ 0.1 N(0,1), var ~ U(0, 1)), fp32."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    mean = [0.1 * torch.randn(s, generator=g).to(device) for s in shapes]
    var = [torch.rand(s, generator=g).to(device) for s in shapes]
    return grads, mean, var


def float64_truth(grads, mean, var, alpha, **kwargs):
    """The reference op run on float64 copies: the gradients' values and the state, in float64."""
    copies = [[t.detach().double().cpu() for t in ts] for ts in (grads, mean, var)]
    importance, found_inf = ff.grad_ema_protect_(*copies, alpha, backend="reference", **kwargs)
    return (*copies, importance, found_inf)


def assert_matches(got_lists, expected_lists, dtypes):
    for got, expected in zip(got_lists, expected_lists):
        for i, (a, e) in enumerate(zip(got, expected)):
            assert_close(a.cpu(), e, dtype=dtypes[i] if got is got_lists[0] else torch.float32)


@pytest.mark.parametrize("normalize", ["none", "max"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64(backend, size, dtype, normalize):
    grads, mean, var = make([(size,)], device_of(backend), dtype, seed=size)
    expected = float64_truth(grads, mean, var, 0.3, normalize=normalize, inv_scale=0.5, temperature=2.0)
    importance, found_inf = ff.grad_ema_protect_(
        grads, mean, var, 0.3, normalize=normalize, inv_scale=0.5, temperature=2.0, backend=backend
    )
    assert not found_inf.item() and grads[0].dtype == dtype and mean[0].dtype == torch.float32
    assert_matches((grads, mean, var), expected[:3], [dtype])
    torch.testing.assert_close(importance.double().cpu(), expected[3], rtol=1e-5, atol=1e-6)


def test_threshold_selects_elements(backend):
    # var' = 0.5 (v + 0.5 d^2) with m = 0, v = 0: importance sigmoid(0.25 g^2) vs 0.6 splits the elements
    device = device_of(backend)
    g = torch.tensor([0.0, 0.5, 1.0, 2.0, -3.0], device=device)
    grads, mean, var = [g.clone()], [torch.zeros(5, device=device)], [torch.zeros(5, device=device)]
    ff.grad_ema_protect_(grads, mean, var, 0.5, threshold=0.6, backend=backend)
    importance = torch.sigmoid(0.25 * g.cpu().double() ** 2)
    expected = torch.where(importance > 0.6, (1 - importance) * g.cpu().double(), g.cpu().double())
    assert_close(grads[0].cpu(), expected.float())
    assert torch.equal(grads[0][:3].cpu(), g[:3].cpu())  # importance 0.5, 0.516, 0.562: untouched


def test_mixed_list_per_tensor_alpha_and_many_tensors(backend):
    device = device_of(backend)
    shapes = [(33, 7), (1025,), (0, 4), (5000,)] + [(i % 7 + 1,) for i in range(1100)]
    grads, mean, var = make(shapes, device)
    grads[1], grads[3] = grads[1].bfloat16(), grads[3].half()
    grads[0] = grads[0].t().contiguous().t()  # non-contiguous: updated through a copy
    alpha = torch.linspace(0.01, 1.0, len(shapes), device=device)
    expected = float64_truth(grads, mean, var, alpha.double().cpu(), normalize="max", inv_scale=0.25)
    ff.grad_ema_protect_(grads, mean, var, alpha, normalize="max", inv_scale=torch.tensor(0.25), backend=backend)
    assert not grads[0].is_contiguous()
    assert_matches((grads, mean, var), expected[:3], [g.dtype for g in grads])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy says so
@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e30])
def test_non_finite_step_writes_nothing(backend, bad):
    # 1e30 is finite but its square overflows the fp32 variance: also a step that must not poison the state
    grads, mean, var = make([(97,), (5000,)], device_of(backend))
    grads[1][4321] = bad
    before = [t.clone() for t in grads + mean + var]
    importance, found_inf = ff.grad_ema_protect_(grads, mean, var, 0.2, backend=backend)
    assert found_inf.item() and importance.isnan().all()
    assert all(torch.equal(a, b) for a, b in zip(grads + mean + var, before) if a.isfinite().all())
    torch.testing.assert_close(grads[1], before[1], rtol=0, atol=0, equal_nan=True)


def test_bitwise_across_launches(fused_backend):
    """Per tensor (the importance normalised by its own max, the state, the gradients) nothing depends on how the
    list was launched (conftest.launch_variants)."""
    lists = make([(300_000,), (77,), (4097,)], device_of(fused_backend))

    def launch(grads, mean, var):
        grads, mean, var = ([t.clone() for t in ts] for ts in (grads, mean, var))
        importance, _ = ff.grad_ema_protect_(grads, mean, var, 0.1, normalize="max", backend=fused_backend)
        return list(zip(importance.unbind(), grads, mean, var))

    results = run_launch_variants(launch, lists)
    assert all(torch.equal(a, b) for r in results[1:] for ts, ts0 in zip(r, results[0]) for a, b in zip(ts, ts0))


def test_bad_input_changes_nothing(backend):
    grads, mean, var = make([(4,), (4,)], device_of(backend))
    before = [t.clone() for t in grads + mean + var]
    for kwargs, error, match in [
        (dict(mean=[mean[0]]), ValueError, "mean has 1 tensors but grads has 2"),
        (dict(var=[var[0], var[1][:3]]), ValueError, r"var\[1\] has shape \(3,\) but grads\[1\] has shape \(4,\)"),
        (dict(mean=[mean[0], mean[1].bfloat16()]), TypeError, r"mean\[1\] has dtype torch.bfloat16"),
        (dict(var=[var[0], var[1].double()]), TypeError, r"var\[1\] has dtype torch.float64"),
        (dict(mean=[mean[0], torch.zeros(4, 2)[:, 0]]), ValueError, r"mean\[1\] is not contiguous"),
        (dict(alpha=0.0), ValueError, r"alpha must be in \(0, 1\]"),
        (dict(alpha=torch.ones(3)), ValueError, "alpha must be a float or a floating point tensor of shape"),
        (dict(threshold=math.nan), ValueError, "threshold must be finite"),
        (dict(temperature=0.0), ValueError, "temperature must be > 0"),
        (dict(normalize="sum"), ValueError, "unknown normalize"),
        (dict(inv_scale=math.inf), ValueError, "inv_scale must be finite"),
        (dict(grads=[grads[0], grads[0]]), ValueError, r"grads\[0\] and grads\[1\] are the same tensor"),
    ]:
        args = dict(grads=grads, mean=mean, var=var, alpha=0.5) | kwargs
        with pytest.raises(error, match=match):
            ff.grad_ema_protect_(args.pop("grads"), args.pop("mean"), args.pop("var"), backend=backend, **args)
    assert all(torch.equal(a, b) for a, b in zip(grads + mean + var, before))
    importance, found_inf = ff.grad_ema_protect_([], [], [], 0.5, backend=backend)
    assert importance.shape == (0,) and not found_inf


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    stats = ff.dispatch.native_op("grad_ema_stats", fused_backend)
    protect = ff.dispatch.native_op("grad_ema_protect", fused_backend)
    grads, mean, var = make([(4, 3), (0,), (9,)], device)
    grads[2] = grads[2].half()
    scalars = torch.tensor(0.5, device=device), torch.full((3,), 0.3, device=device)
    torch.library.opcheck(stats, (grads, mean, var, *scalars))
    for skip in (False, True):
        var_scale = torch.ones(3, device=device)
        torch.library.opcheck(protect, (grads, mean, var, *scalars, var_scale, torch.tensor(skip, device=device), 0.6))


def test_torch_compile_fullgraph(fused_backend):
    device = device_of(fused_backend)
    grads, mean, var = make([(33, 7), (1025,)], device)
    want = [[t.clone() for t in ts] for ts in (grads, mean, var)]

    def step(grads, mean, var):
        return ff.grad_ema_protect_(grads, mean, var, 0.25, normalize="max", backend=fused_backend)

    got_importance, _ = torch.compile(step, fullgraph=True, backend="aot_eager")(grads, mean, var)
    want_importance, _ = step(*want)
    assert torch.equal(got_importance, want_importance)
    assert all(torch.equal(a, b) for a, b in zip(grads + mean + var, sum(want, [])))


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=6),
    alpha=st.floats(0.001, 1.0),
    backend=st.sampled_from(FUSED_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_random_lists(sizes, alpha, backend, seed):
    grads, mean, var = make([(s,) for s in sizes], device_of(backend), seed=seed)
    expected = float64_truth(grads, mean, var, alpha)
    ff.grad_ema_protect_(grads, mean, var, alpha, backend=backend)
    assert_matches((grads, mean, var), expected[:3], [torch.float32] * len(sizes))


def test_direct_op_calls_check_element_counts(fused_backend):
    """torch.ops calls skip the Python checks: a per-tensor argument of the wrong length must be refused by the
    binding itself (a kernel would read it out of bounds), before anything is written."""
    stats = ff.dispatch.native_op("grad_ema_stats", fused_backend)
    protect = ff.dispatch.native_op("grad_ema_protect", fused_backend)
    grads, mean, var = make([(5,), (3,)], device_of(fused_backend))
    before = [t.clone() for t in grads + mean + var]
    one, two = torch.ones(1), torch.full((2,), 0.5)
    for name, inv_scale, alpha, var_scale, skip in [
        ("inv_scale", torch.ones(2), two, two, torch.zeros(1, dtype=torch.bool)),
        ("alpha", one, torch.full((1,), 0.5), two, torch.zeros(1, dtype=torch.bool)),
        ("var_scale", one, two, torch.ones(1), torch.zeros(1, dtype=torch.bool)),
        ("skip", one, two, two, torch.zeros(2, dtype=torch.bool)),
    ]:
        with pytest.raises(RuntimeError, match=f"{name} has . elements; expected"):
            protect(grads, mean, var, inv_scale, alpha, var_scale, skip, 0.5)
        if name in ("inv_scale", "alpha"):
            with pytest.raises(RuntimeError, match=f"{name} has . elements; expected"):
                stats(grads, mean, var, inv_scale, alpha)
    assert all(torch.equal(a, b) for a, b in zip(grads + mean + var, before))


def misaligned(t):
    """A contiguous copy of t whose data start one element into their storage: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_match_aligned(fused_backend, dtype):
    # Triton's vector path needs 16-byte aligned data; other tensors (here every other one) take the scalar path
    lists = make([(2 * 4096 + 37,), (5, 3), (4100,)], device_of(fused_backend), dtype)
    aligned = [[t.clone() for t in ts] for ts in lists]
    mixed = [[misaligned(t) if i % 2 == 0 else t.clone() for i, t in enumerate(ts)] for ts in lists]
    for grads, mean, var in (aligned, mixed):
        ff.grad_ema_protect_(grads, mean, var, 0.3, normalize="max", threshold=0.55, backend=fused_backend)
    assert mixed[0][0].storage_offset() == 1
    assert all(torch.equal(a, m) for ts, ts0 in zip(mixed, aligned) for a, m in zip(ts, ts0))
