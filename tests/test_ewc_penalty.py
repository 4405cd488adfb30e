"""ff.ewc_penalty / ff.ewc_penalty_ on every backend against the pure-torch reference."""

import math

import pytest
import torch
from conftest import CUDA, FUSED_BACKENDS, device_of, run_launch_variants
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.testing import assert_close

LAM = 0.4
SIZES = [0, 1, 97, 1025, 65537]
PARAM_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FISHER_DTYPES = [torch.float32, torch.bfloat16]


def make_case(shapes, param_dtype, fisher_dtype, device, anchor_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device, param_dtype) for s in shapes]
    anchors = [
        (p.float() + 0.5 * torch.randn(s, generator=g).to(device)).to(anchor_dtype or param_dtype)
        for p, s in zip(params, shapes)
    ]
    fisher = [torch.rand(s, generator=g).to(device, fisher_dtype) for s in shapes]
    return params, anchors, fisher


def autograd_result(params, anchors, fisher, backend, upstream=3.0):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    penalty = ff.ewc_penalty(leaves, anchors, fisher, LAM, backend=backend)
    (upstream * penalty).backward()
    return penalty.detach(), [p.grad for p in leaves]


def fused_result(params, anchors, fisher, backend, initial_grads):
    leaves = [p.detach().clone() for p in params]
    for p, g in zip(leaves, initial_grads):
        p.grad = None if g is None else g.clone()
    penalty = ff.ewc_penalty_(leaves, anchors, fisher, LAM, backend=backend)
    return penalty, [p.grad for p in leaves]


def check_against_reference(params, anchors, fisher, backend):
    expected, expected_grads = autograd_result(params, anchors, fisher, "reference")
    penalty, grads = autograd_result(params, anchors, fisher, backend)
    assert penalty.dtype == expected.dtype and penalty.shape == ()
    assert_close(penalty, expected, torch.float32)
    for p, g, e in zip(params, grads, expected_grads):
        assert g.dtype == p.dtype and g.shape == p.shape
        assert_close(g, e, p.dtype)

    initial = [torch.randn(p.shape).to(p) if i % 2 else None for i, p in enumerate(params)]
    expected, expected_grads = fused_result(params, anchors, fisher, "reference", initial)
    penalty, grads = fused_result(params, anchors, fisher, backend, initial)
    assert not penalty.requires_grad
    assert_close(penalty, expected, torch.float32)
    for p, g, e in zip(params, grads, expected_grads):
        assert g.dtype == p.dtype
        assert_close(g, e, p.dtype)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("param_dtype", PARAM_DTYPES, ids=str)
@pytest.mark.parametrize("fisher_dtype", FISHER_DTYPES, ids=str)
def test_matches_reference(backend, size, param_dtype, fisher_dtype):
    check_against_reference(*make_case([(size,)], param_dtype, fisher_dtype, device_of(backend)), backend)


@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_anchors_with_low_precision_params(backend, param_dtype):
    case = make_case([(33, 7), (1025,)], param_dtype, torch.float16, device_of(backend), anchor_dtype=torch.float32)
    check_against_reference(*case, backend)


TRANSFORMER_SHAPES = (
    [(100, 32), (16, 32)]
    + 2 * [(32,), (32,), (96, 32), (96,), (32, 32), (32,), (32,), (32,), (128, 32), (128,), (32, 128), (32,)]
    + [(32,), (32,)]
)


def test_transformer_shaped_list_with_mixed_dtypes(backend):
    device = device_of(backend)
    params, anchors, fisher = make_case(TRANSFORMER_SHAPES, torch.float32, torch.float32, device)
    # bf16 matrices, fp32 vectors (as under mixed precision): several dtype groups in one call
    params = [p if p.dim() == 1 else p.bfloat16() for p in params]
    anchors = [a.to(p.dtype) for a, p in zip(anchors, params)]
    fisher = [f if i % 3 else f.half() for i, f in enumerate(fisher)]
    check_against_reference(params, anchors, fisher, backend)


def test_non_contiguous_inputs_and_gradients(backend):
    device = device_of(backend)
    base, anchors, fisher = make_case([(40, 30), (64, 8)], torch.float32, torch.float32, device)
    params = [base[0].t(), base[1][::2]]  # transposed, strided
    anchors = [anchors[0].t(), anchors[1][::2]]
    fisher = [fisher[0].t(), fisher[1][::2]]
    check_against_reference(params, anchors, fisher, backend)
    leaves = [p.clone() for p in params]
    grads = [torch.ones(30, 80, device=device)[:, ::2], torch.ones(8, 32, device=device).t()]
    for p, g in zip(leaves, grads):
        p.grad = g
    ff.ewc_penalty_(leaves, anchors, fisher, LAM, backend=backend)
    for p, a, f, g in zip(params, anchors, fisher, grads):
        assert_close(g, 1 + 2 * LAM * f * (p - a), torch.float32)


def test_empty_list_and_zero_size(backend):
    assert ff.ewc_penalty([], [], [], LAM, backend=backend).item() == 0.0
    assert ff.ewc_penalty_([], [], [], LAM, backend=backend).item() == 0.0
    device = device_of(backend)
    params = [torch.zeros(0, 5, device=device).requires_grad_()]
    penalty = ff.ewc_penalty(
        params, [torch.zeros(0, 5, device=device)], [torch.zeros(0, 5, device=device)], LAM, backend=backend
    )
    penalty.backward()
    assert penalty.item() == 0.0 and params[0].grad.shape == (0, 5)


def test_single_tensor_arguments(backend):
    device = device_of(backend)
    p, a, f = (t[0] for t in make_case([(50,)], torch.float32, torch.float32, device))
    expected = LAM * (f * (p - a) ** 2).sum()
    assert_close(ff.ewc_penalty(p, a, f, LAM, backend=backend), expected, torch.float32)


def test_thousand_tensors_one_call(fused_backend):
    shapes = [(i % 7 + 1,) for i in range(1200)]
    check_against_reference(*make_case(shapes, torch.float32, torch.float32, device_of(fused_backend)), fused_backend)


def test_multiple_chunks_per_tensor():
    # the CPU kernel splits tensors into 2**16-element chunks (Triton's 4096-element programs: the other tests)
    check_against_reference(*make_case([(3 * 65536 + 5,), (70000,)], torch.float32, torch.float32, "cpu"), "cpu")


def test_penalty_formula_and_lam_convention():
    p, a, f = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([0.5])
    for backend in FUSED_BACKENDS + ["reference"]:
        x = p.clone().to(device_of(backend)).requires_grad_()
        penalty = ff.ewc_penalty(x, a.to(x.device), f.to(x.device), 0.4, backend=backend)
        penalty.backward()
        assert math.isclose(penalty.item(), 0.4 * 0.5 * 4.0, rel_tol=1e-6)  # no 1/2 factor
        assert math.isclose(x.grad.item(), 2 * 0.4 * 0.5 * 2.0, rel_tol=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["autograd", "inplace"])
def test_deterministic_across_launches(fused_backend, fused):
    """Gradients are bitwise the same however the work is split (conftest.launch_variants); the penalty too for
    the same list order, and within rounding when the list order (its summation order) changes."""
    shapes = [(9000,), (1025,)] if fused_backend == "triton" and not CUDA else [(300_000,), (1025,), (70_001,)]
    lists = make_case(shapes, torch.float32, torch.float32, device_of(fused_backend))
    penalties = []

    def launch(params, anchors, fisher):
        if fused:
            penalty, grads = fused_result(params, anchors, fisher, fused_backend, [torch.ones_like(p) for p in params])
        else:
            penalty, grads = autograd_result(params, anchors, fisher, fused_backend)
        penalties.append(penalty)
        return grads

    results = run_launch_variants(launch, lists)
    assert all(torch.equal(g, g0) for grads in results[1:] for g, g0 in zip(grads, results[0]))
    assert torch.equal(penalties[1], penalties[0])  # same order, other thread count: bitwise
    for penalty in penalties[2:]:
        assert_close(penalty, penalties[0], torch.float32)


def test_fp64_gradcheck(backend):
    device = device_of(backend)
    params, anchors, fisher = make_case([(5, 3), (7,)], torch.float64, torch.float64, device)
    params = [p.requires_grad_() for p in params]

    def penalty(*ps):
        return ff.ewc_penalty(list(ps), anchors, fisher, LAM, backend=backend)

    assert torch.autograd.gradcheck(penalty, params)
    assert torch.autograd.gradgradcheck(penalty, params)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=8),
    dtypes=st.lists(st.sampled_from(PARAM_DTYPES), min_size=8, max_size=8),
    lam=st.floats(0, 100),
    backend=st.sampled_from(FUSED_BACKENDS),
    seed=st.integers(0, 2**31),
)
def test_random_lists(sizes, dtypes, lam, backend, seed):
    device = device_of(backend)
    params, anchors, fisher = make_case([(s,) for s in sizes], torch.float32, torch.float32, device, seed=seed)
    params = [p.to(d) for p, d in zip(params, dtypes)]
    anchors = [a.to(d) for a, d in zip(anchors, dtypes)]
    expected = ff.ewc_penalty_ref(params, anchors, fisher, lam)
    assert_close(ff.ewc_penalty(params, anchors, fisher, lam, backend=backend), expected, torch.float32)
    grads = [torch.zeros_like(p) for p in params]
    ref_grads = [torch.zeros_like(p) for p in params]
    ff.ewc_penalty_accumulate_ref(params, anchors, fisher, ref_grads, lam)
    leaves = [p.clone() for p in params]
    for p, g in zip(leaves, grads):
        p.grad = g
    assert_close(ff.ewc_penalty_(leaves, anchors, fisher, lam, backend=backend), expected, torch.float32)
    for g, e in zip(grads, ref_grads):
        assert_close(g, e, g.dtype)


# ---------------------------------------------------------------------------------------------------- bad input


def good_inputs(n=3):
    params, anchors, fisher = make_case([(4, 3), (5,), (2, 2, 2)][:n], torch.float32, torch.float32, "cpu")
    for p in params:
        p.grad = torch.full_like(p, 7.0)
    return params, anchors, fisher


BAD_INPUTS = {
    "length": (lambda p, a, f: (p, a[:2], f), ValueError, r"anchors has 2 tensors but params has 3"),
    "shape": (lambda p, a, f: (p, a, [f[0], f[1].reshape(5, 1), f[2]]), ValueError, r"fisher\[1\] has shape \(5, 1\)"),
    "device": (lambda p, a, f: (p, [a[0], a[1].to("meta"), a[2]], f), ValueError, r"anchors\[1\] is on meta"),
    "param_device": (lambda p, a, f: ([p[0], p[1], p[2].to("meta")], a, f), ValueError, r"params\[2\] is on meta"),
    "int_params": (lambda p, a, f: ([p[0], p[1].long(), p[2]], a, f), TypeError, r"params\[1\] has dtype torch.int64"),
    "int_fisher": (lambda p, a, f: (p, a, [f[0], f[1], f[2].int()]), TypeError, r"fisher\[2\] has dtype torch.int32"),
    "anchor_dtype": (
        lambda p, a, f: (p, [a[0].half(), a[1], a[2]], f),
        TypeError,
        r"anchors\[0\] has dtype torch.float16",
    ),
    "fisher_fp64": (
        lambda p, a, f: (p, a, [f[0].double(), f[1], f[2]]),
        TypeError,
        r"fisher\[0\] has dtype torch.float64",
    ),
    "not_tensor": (lambda p, a, f: (p, [a[0], 1.0, a[2]], f), TypeError, r"anchors\[1\] is a float, not a Tensor"),
    "sparse": (lambda p, a, f: (p, a, [f[0].to_sparse(), f[1], f[2]]), TypeError, r"fisher\[0\] has layout"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["autograd", "inplace"])
def test_bad_input_is_rejected_before_anything_changes(backend, case, inplace):
    make_bad, error, message = BAD_INPUTS[case]
    params, anchors, fisher = good_inputs()
    before = [p.grad.clone() for p in params]
    bad = make_bad(params, anchors, fisher)
    with pytest.raises(error, match=message):
        (ff.ewc_penalty_ if inplace else ff.ewc_penalty)(*bad, LAM, backend=backend)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(
    "lam, error",
    [(float("nan"), ValueError), (float("inf"), ValueError), (-0.1, ValueError), ("0.4", TypeError), (True, TypeError)],
)
def test_bad_lam(lam, error):
    params, anchors, fisher = good_inputs()
    before = [p.grad.clone() for p in params]
    for fn in (ff.ewc_penalty, ff.ewc_penalty_):
        with pytest.raises(error, match="lam"):
            fn(params, anchors, fisher, lam)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_gradient_with_wrong_dtype_is_rejected():
    params, anchors, fisher = good_inputs()
    params[2].grad_dtype = None  # torch would refuse the assignment below otherwise
    params[2].grad = torch.zeros(2, 2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype torch.int64"):
        ff.ewc_penalty_(params, anchors, fisher, LAM)
    params[2].grad = None
    # a None grad elsewhere must not be allocated when the call is rejected
    params[0].grad = None
    params[1].grad = torch.zeros(5)
    with pytest.raises(ValueError, match="lam"):
        ff.ewc_penalty_(params, anchors, fisher, -1.0)
    assert params[0].grad is None and params[2].grad is None


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="Tensor.grad_dtype is newer than this torch")
def test_fp32_gradients_of_bf16_params(fused_backend):
    # grad_dtype=float32 (fp32 gradient accumulation for bf16 weights) is honoured: the update is rounded to fp32
    params, anchors, fisher = make_case([(1000,), (7, 3)], torch.bfloat16, torch.float32, device_of(fused_backend))
    expected = [torch.ones(p.shape, device=p.device) for p in params]
    ff.ewc_penalty_accumulate_ref(params, anchors, fisher, expected, LAM)
    for p in params:
        p.grad_dtype = torch.float32
        p.grad = torch.ones(p.shape, device=p.device)
    ff.ewc_penalty_(params, anchors, fisher, LAM, backend=fused_backend)
    for p, e in zip(params, expected):
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, e, torch.float32)


def test_mixed_fp64_and_16_bit_list(backend):
    # fp64 anywhere makes the whole call fp64; 16-bit outputs are still rounded correctly
    device = device_of(backend)
    params, anchors, fisher = make_case([(50,), (3, 7), (1025,)], torch.float64, torch.float64, device)
    params = [params[0], params[1].bfloat16(), params[2].half()]
    anchors = [anchors[0], anchors[1].bfloat16(), anchors[2].half()]
    fisher = [fisher[0], fisher[1].bfloat16(), fisher[2].half()]
    check_against_reference(params, anchors, fisher, backend)


def test_the_same_tensor_twice_is_rejected_before_any_gradient_is_made():
    params, anchors, fisher = make_case([(6,), (4,)], torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"params\[0\] and params\[2\] are the same tensor"):
        ff.ewc_penalty_([params[0], params[1], params[0]], anchors + anchors[:1], fisher + fisher[:1], LAM)
    assert all(p.grad is None for p in params)


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="Tensor.grad_dtype is newer than this torch")
def test_missing_gradient_gets_the_grad_dtype():
    params, anchors, fisher = make_case([(10,)], torch.bfloat16, torch.float32, "cpu")
    params[0].grad_dtype = torch.float32
    ff.ewc_penalty_(params, anchors, fisher, LAM)
    assert params[0].grad.dtype == torch.float32
    assert_close(params[0].grad, 2 * LAM * fisher[0] * (params[0].float() - anchors[0].float()), torch.float32)


def test_self_overlapping_gradient_is_rejected():
    params, anchors, fisher = make_case([(4,), (4,)], torch.float32, torch.float32, "cpu")
    shared = torch.zeros(1)
    params[0].grad, params[1].grad = torch.zeros(4), shared.expand(4)
    with pytest.raises(ValueError, match=r"grads\[1\] has elements that share memory"):
        ff.ewc_penalty_(params, anchors, fisher, LAM)
    assert torch.equal(params[0].grad, torch.zeros(4)) and shared.item() == 0.0


def test_overlapping_gradients_are_rejected():
    params, anchors, fisher = make_case([(6,), (6,)], torch.float32, torch.float32, "cpu")
    flat = torch.zeros(9)
    params[0].grad, params[1].grad = flat[:6], flat[3:]
    with pytest.raises(ValueError, match=r"grads\[0\] and grads\[1\] overlap"):
        ff.ewc_penalty_(params, anchors, fisher, LAM)
    assert torch.equal(flat, torch.zeros(9))
    # disjoint views of one flat buffer (as in fused-gradient-buffer optimizers) are fine
    flat = torch.zeros(12)
    params[0].grad, params[1].grad = flat[:6], flat[6:]
    ff.ewc_penalty_(params, anchors, fisher, LAM)
    assert_close(flat, torch.cat([2 * LAM * f * (p - a) for p, a, f in zip(params, anchors, fisher)]), torch.float32)


def test_constant_anchors_and_fisher_must_not_require_grad():
    params, anchors, fisher = good_inputs()
    with pytest.raises(ValueError, match=r"fisher\[1\] requires grad"):
        ff.ewc_penalty(params, anchors, [fisher[0], fisher[1].requires_grad_(), fisher[2]], LAM)


# ---------------------------------------------------------------------------------------------------- torch.library


def opcheck_samples(device):
    params, anchors, fisher = make_case([(4, 3), (70,), (0,)], torch.float32, torch.float32, device)
    mixed = make_case([(9,), (3, 3)], torch.bfloat16, torch.float16, device, anchor_dtype=torch.float32)
    # non-contiguous inputs: a channels_last conv weight and a transposed matrix
    strided = make_case([(8, 3, 3, 3), (5, 4)], torch.float32, torch.float32, device)
    strided = [[t[0].contiguous(memory_format=torch.channels_last), t[1].t()] for t in strided]
    for p, a, f in ((params, anchors, fisher), mixed, strided):
        yield "ewc_penalty", ([x.clone().requires_grad_() for x in p], a, f, LAM)
        yield "ewc_penalty_backward", (p, a, f, LAM, torch.tensor(1.5, device=device))
        yield "ewc_penalty_accumulate", (p, a, f, [torch.randn(x.shape, device=device).to(x.dtype) for x in p], LAM)


@pytest.mark.parametrize("op", ["ewc_penalty", "ewc_penalty_backward", "ewc_penalty_accumulate"])
def test_opcheck(fused_backend, op):
    for name, args in opcheck_samples(device_of(fused_backend)):
        if name == op:
            torch.library.opcheck(ff.dispatch.native_op(op, fused_backend), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(fused_backend, compiler):
    device = device_of(fused_backend)
    params, anchors, fisher = make_case([(30, 20), (97,)], torch.float32, torch.float32, device)

    def training_loss(ps):
        task_loss = sum((p * p).sum() for p in ps)
        return task_loss + ff.ewc_penalty(ps, anchors, fisher, LAM, backend=fused_backend)

    def one_pass(ps):
        return ff.ewc_penalty_(ps, anchors, fisher, LAM, backend=fused_backend)

    compiled_loss = torch.compile(training_loss, fullgraph=True, backend=compiler)
    compiled_pass = torch.compile(one_pass, fullgraph=True, backend=compiler)
    for compiled, eager in ((compiled_loss, training_loss), (compiled_pass, one_pass)):
        got, want = [p.clone().requires_grad_() for p in params], [p.clone().requires_grad_() for p in params]
        for g, w in zip(got, want):
            g.grad, w.grad = torch.ones_like(g), torch.ones_like(w)
        out, expected = compiled(got), eager(want)
        if out.requires_grad:
            out.backward()
            expected.backward()
        assert_close(out, expected, torch.float32)
        for g, w in zip(got, want):
            assert_close(g.grad, w.grad, torch.float32)


def test_direct_backward_op_call_checks_grad_out(fused_backend):
    op = ff.dispatch.native_op("ewc_penalty_backward", fused_backend)
    params, anchors, fisher = make_case([(4,)], torch.float32, torch.float32, device_of(fused_backend))
    with pytest.raises(RuntimeError, match="grad_out has 2 elements; expected 1"):
        op(params, anchors, fisher, LAM, torch.ones(2))


def test_direct_op_calls_check_shapes(fused_backend):
    params, anchors, fisher = make_case([(4,), (3,)], torch.float32, torch.float32, device_of(fused_backend))
    grads = [torch.zeros(4), torch.zeros(3)]
    short = [fisher[0], fisher[1][:2]]
    with pytest.raises(RuntimeError, match=r"fisher\[1\] has shape"):
        ff.dispatch.native_op("ewc_penalty", fused_backend)(params, anchors, short, LAM)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        ff.dispatch.native_op("ewc_penalty_accumulate", fused_backend)(
            params, anchors, fisher, [grads[0], grads[1][:2]], LAM
        )
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def misaligned(t):
    """A contiguous copy of t whose data start one element into their storage: not 16-byte aligned."""
    return torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_misaligned_views_match_aligned(fused_backend, dtype):
    # Triton's vector path needs 16-byte aligned data; other tensors (here every other one) take the scalar path
    shapes = [(2 * 4096 + 37,), (5, 3), (4100,)]
    params, anchors, fisher = make_case(shapes, dtype, dtype, device_of(fused_backend))
    grads = [torch.randn(s).to(dtype) for s in shapes]
    results = []
    for misalign in (False, True):
        prepare = [misaligned if misalign and i % 2 == 0 else torch.clone for i in range(len(shapes))]
        leaves = [prepare[i](p).requires_grad_() for i, p in enumerate(params)]
        constants = [[prepare[i](t) for i, t in enumerate(ts)] for ts in (anchors, fisher)]
        penalty = ff.ewc_penalty(leaves, *constants, LAM, backend=fused_backend)
        penalty.backward()
        for p, g, make_grad in zip(leaves, grads, prepare):
            p.requires_grad_(False)
            p.grad = make_grad(g)
        accumulated = ff.ewc_penalty_(leaves, *constants, LAM, backend=fused_backend)
        results.append(([penalty, accumulated], [p.grad for p in leaves]))
        assert leaves[0].grad.storage_offset() == int(misalign)
    (penalties, grads_aligned), (penalties_mixed, grads_mixed) = results
    torch.testing.assert_close(penalties_mixed, penalties, rtol=1e-6, atol=0)  # sums: the same up to their order
    assert all(torch.equal(a, m) for a, m in zip(grads_aligned, grads_mixed))
