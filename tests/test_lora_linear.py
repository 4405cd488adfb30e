"""ff.lora_linear on every backend against the PEFT formula evaluated in fp64 (the truth for the same inputs)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import CUDA, FUSED_BACKENDS, device_of
from hypothesis import given, settings
from hypothesis import strategies as st

import fastforget as ff
from fastforget.ops.lora_linear import dropout_keep_mask
from fastforget.testing import assert_close_matmul

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE = 1.7
# (M, in, out, r, bias, trainable base): every M in (1, 97, 1025), in/out in (33, 127, 256) and r in (1, 4, 16, 64);
# the last one also has a partial register tile of r after a whole one in the CPU kernels
SHAPES = [
    (1, 33, 127, 1, True, False),
    (97, 127, 33, 4, True, True),
    (1025, 256, 256, 16, False, False),
    (97, 33, 256, 64, True, False),
    (1025, 127, 33, 64, False, True),
    (1, 256, 33, 16, False, True),
    (1025, 130, 70, 20, True, False),
]
# Triton's interpreter runs every program in numpy: tiny sizes, still ragged against its 16-wide tiles
INTERPRETER_SHAPES = [(1, 33, 17, 1, True, False), (33, 64, 40, 8, True, True), (20, 17, 33, 4, False, True)]


def shapes_for(backend):
    return INTERPRETER_SHAPES if backend == "triton" and not CUDA else SHAPES


def make_layer(m, n_in, n_out, r, dtype, device, bias=True, seed=0):
    """x, weight, bias, lora_A, lora_B with outputs of order 1 (and a LoRA term as large as the base one)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device, dtype)

    return (
        rand(m, n_in),
        rand(n_out, n_in, std=n_in**-0.5),
        rand(n_out) if bias else None,
        rand(r, n_in, std=n_in**-0.5),
        rand(n_out, r, std=r**-0.5),
    )


def run(layer, backend, trainable_base=True, dropout_p=0.0, seed=None, grad_seed=1, **kwargs):
    """Output and gradients (x, weight, bias, lora_A, lora_B; None where not trainable) under an upstream gradient."""
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(i in (0, 3, 4) or trainable_base)
        for i, t in enumerate(layer)
    ]
    if seed is not None:
        torch.manual_seed(seed)
    y = ff.lora_linear(*leaves, SCALE, dropout_p, backend=backend, **kwargs)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y)
    y.backward(upstream)
    return y.detach(), [None if t is None else t.grad for t in leaves]


def truth(layer, trainable_base=True, keep=None, dropout_p=0.0):
    """PEFT's formula (the reference) on fp64 copies of the inputs, with autograd."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in layer]
    x = leaves[0]
    keep = None if keep is None else keep.reshape(x.shape)
    y = ff.lora_linear_ref(*leaves, SCALE, keep, dropout_p)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
    frozen = () if trainable_base else (1, 2)  # weight, bias
    return y.detach(), [None if t is None or i in frozen else t.grad for i, t in enumerate(leaves)]


def check_against_truth(layer, backend, trainable_base=True, dropout_p=0.0):
    keep = None
    if dropout_p:
        torch.manual_seed(7)
        keep = dropout_keep_mask(layer[0].reshape(-1, layer[0].shape[-1]).shape, dropout_p, layer[0].device)
    dtype = layer[0].dtype
    y, grads = run(layer, backend, trainable_base, dropout_p, seed=7 if dropout_p else None)
    y_true, grads_true = truth(layer, trainable_base, keep, dropout_p)
    assert y.dtype == dtype and y.shape == y_true.shape
    assert_close_matmul(y, y_true, dtype)
    for name, got, want in zip(("x", "weight", "bias", "lora_A", "lora_B"), grads, grads_true):
        assert (got is None) == (want is None), name
        if want is not None:
            assert got.dtype == dtype and got.shape == want.shape, name
            assert_close_matmul(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "backend, shape", [(b, shape) for b in FUSED_BACKENDS + ["reference"] for shape in shapes_for(b)], ids=str
)
def test_matches_peft_formula(backend, shape, dtype):
    m, n_in, n_out, r, bias, trainable_base = shape
    layer = make_layer(m, n_in, n_out, r, dtype, device_of(backend), bias)
    check_against_truth(layer, backend, trainable_base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dropout_matches_peft_formula_with_the_same_mask(backend, dtype):
    m, n_in, n_out, r = (33, 40, 24, 8) if backend == "triton" else (97, 127, 33, 16)
    check_against_truth(make_layer(m, n_in, n_out, r, dtype, device_of(backend)), backend, dropout_p=0.3)


def test_three_dimensional_and_strided_inputs(backend):
    device = device_of(backend)
    x, weight, bias, lora_A, lora_B = make_layer(6, 24, 20, 4, torch.float32, device)
    x3 = torch.randn(5, 3, 24, device=device).transpose(0, 1)  # (3, 5, 24), not contiguous
    weight_t = weight.t().contiguous().t()  # column-major
    lora_B_t = lora_B.t().contiguous().t()
    y, grads = run((x3, weight_t, bias, lora_A, lora_B_t), backend)
    y_true, grads_true = truth((x3, weight_t, bias, lora_A, lora_B_t))
    assert y.shape == (3, 5, 20)
    assert_close_matmul(y, y_true, torch.float32)
    assert grads[0].shape == x3.shape
    for got, want in zip(grads, grads_true):
        assert_close_matmul(got, want, torch.float32)


def test_no_rows(backend):
    layer = make_layer(0, 24, 20, 4, torch.float32, device_of(backend))
    y, (dx, dweight, dbias, dA, dB) = run(layer, backend)
    assert y.shape == (0, 20) and dx.shape == (0, 24)
    for grad in (dweight, dbias, dA, dB):
        assert not grad.any()


def test_gradients_only_where_required(backend):
    x, weight, bias, lora_A, lora_B = make_layer(7, 24, 20, 4, torch.float32, device_of(backend))
    lora_A.requires_grad_()
    y = ff.lora_linear(x, weight, bias, lora_A, lora_B, SCALE, backend=backend)
    y.sum().backward()  # an expanded (stride 0) upstream gradient
    assert x.grad is None and weight.grad is None and bias.grad is None and lora_B.grad is None
    lora_A64 = lora_A.detach().double().requires_grad_()
    ff.lora_linear_ref(x.double(), weight.double(), bias.double(), lora_A64, lora_B.double(), SCALE).sum().backward()
    assert_close_matmul(lora_A.grad, lora_A64.grad, torch.float32)


def test_initial_adapter_gives_the_base_output(backend):
    x, weight, bias, lora_A, lora_B = make_layer(9, 24, 20, 4, torch.float32, device_of(backend))
    y = ff.lora_linear(x, weight, bias, lora_A, torch.zeros_like(lora_B), SCALE, 0.5, backend=backend)
    assert_close_matmul(y, torch.nn.functional.linear(x, weight, bias), torch.float32)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(0, 70),
    n_in=st.integers(1, 70),
    n_out=st.integers(1, 70),
    r=st.integers(1, 40),
    bias=st.booleans(),
    trainable_base=st.booleans(),
    dropout_p=st.sampled_from([0.0, 0.3]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_random_cpu_layers(m, n_in, n_out, r, bias, trainable_base, dropout_p, dtype, seed):
    """The CPU kernels' tails at random: rows, columns and r not multiples of their register tiles."""
    layer = make_layer(m, n_in, n_out, r, dtype, "cpu", bias, seed=seed)
    check_against_truth(layer, "cpu", trainable_base, dropout_p)


def test_cpu_rank_r_products_are_deterministic_across_thread_counts():
    """The CPU backend's own kernels (S, dS, dA, dB) sum each element on one thread in a fixed order; the base GEMMs
    (y, dx) are MKL's, whose summation order may follow the thread count, so only lora_A's and lora_B's gradients
    are compared."""
    layer = make_layer(1025, 130, 70, 20, torch.float32, "cpu")
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(run(layer, "cpu", dropout_p=0.3, seed=5)[1][3:])
    finally:
        torch.set_num_threads(threads)
    for grads in results[1:]:
        assert all(torch.equal(g, g0) for g, g0 in zip(grads, results[0]))  # bitwise


def test_cpu_op_reads_a_non_contiguous_keep_mask_by_its_strides():
    """A direct op call may pass any bool mask shaped like x; the CPU kernels index contiguous ones only."""
    x, weight, bias, lora_A, lora_B = make_layer(40, 37, 21, 5, torch.float32, "cpu")
    keep = dropout_keep_mask(x.shape, 0.4, "cpu")
    keep_t = keep.t().contiguous().t()  # same values, column-major
    S = SCALE * x @ lora_A.t()
    grad_y = torch.randn(40, 21)
    op, backward = torch.ops.fastforget.lora_linear, torch.ops.fastforget.lora_linear_backward

    def outputs(mask):  # y, S, dx, dA, dB
        y, S_ = op(x, weight, bias, lora_A, lora_B, mask, SCALE)
        dx, _, _, dA, dB = backward(grad_y, x, weight, lora_A, lora_B, mask, S, SCALE, [True, False, False, True, True])
        return y, S_, dx, dA, dB

    for got, want in zip(outputs(keep_t), outputs(keep)):
        assert_close_matmul(got, want, torch.float32)


# ---------------------------------------------------------------------------------------------------- dropout


def test_dropout_is_reproducible_under_manual_seed(fused_backend):
    layer = make_layer(20, 24, 16, 4, torch.float32, device_of(fused_backend))
    first = run(layer, fused_backend, dropout_p=0.5, seed=3)
    again = run(layer, fused_backend, dropout_p=0.5, seed=3)
    other = run(layer, fused_backend, dropout_p=0.5, seed=4)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])


def test_dropout_is_off_in_eval_and_at_zero(fused_backend):
    layer = make_layer(20, 24, 16, 4, torch.float32, device_of(fused_backend))
    plain = run(layer, fused_backend)
    for p, training in ((0.5, False), (0.0, True)):
        y, grads = run(layer, fused_backend, dropout_p=p, seed=0, training=training)
        assert torch.equal(y, plain[0]) and all(torch.equal(a, b) for a, b in zip(grads, plain[1]))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under Triton's interpreter
def test_dropped_non_finite_inputs_propagate_as_in_the_reference(fused_backend):
    """x * keep as nn.Dropout computes it: a NaN or inf that the mask drops still makes NaN (0 * inf), so no backend
    hides a bad activation that the reference would show."""
    layer = list(make_layer(6, 9, 5, 3, torch.float32, device_of(fused_backend)))
    torch.manual_seed(2)
    keep = dropout_keep_mask((6, 9), 0.5, layer[0].device)
    dropped = (~keep).nonzero()
    layer[0] = layer[0].clone()
    layer[0][tuple(dropped[0])], layer[0][tuple(dropped[1])] = float("nan"), float("inf")
    results = [run(layer, b, dropout_p=0.5, seed=2) for b in (fused_backend, "reference")]
    (y, grads), (y_ref, grads_ref) = results
    assert torch.equal(y.isnan(), y_ref.isnan())
    for got, want in zip(grads, grads_ref):
        assert torch.equal(got.isfinite(), want.isfinite())


def test_keep_mask_rate():
    torch.manual_seed(0)
    keep = dropout_keep_mask((400, 500), 0.3, "cpu")
    assert keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.7) < 0.005


# ---------------------------------------------------------------------------------------------------- autograd


def test_fp64_gradcheck(backend):
    layer = make_layer(5, 7, 6, 3, torch.float64, device_of(backend))
    leaves = [t.requires_grad_() for t in layer]

    def layer_output(*tensors):
        torch.manual_seed(0)  # the same dropout mask on every evaluation
        return ff.lora_linear(*tensors, SCALE, 0.3, backend=backend)

    assert torch.autograd.gradcheck(layer_output, leaves)


def test_double_backward_raises(fused_backend):
    """No second derivative: taking one must fail, not silently drop the op's part of it."""
    backend = fused_backend
    layer = [t.requires_grad_() for t in make_layer(5, 7, 6, 3, torch.float64, device_of(backend))]
    x, _, _, lora_A, _ = layer
    y = ff.lora_linear(*layer, SCALE, backend=backend)
    grad_x, grad_A = torch.autograd.grad((y**2).sum(), (x, lora_A), create_graph=True)
    with pytest.raises((RuntimeError, NotImplementedError), match="lora_linear_backward"):
        torch.autograd.grad(grad_x.sum() + grad_A.sum(), layer[:1])

    def loss(x_):
        return (ff.lora_linear(x_, *layer[1:], SCALE, backend=backend) ** 2).sum()

    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.grad(lambda x_: torch.func.grad(loss)(x_).sum())(x.detach())


@pytest.mark.skipif("triton" not in FUSED_BACKENDS or CUDA, reason="the Triton flavour under the interpreter")
def test_double_backward_raises_without_the_extension():
    """The Triton flavour's guard is its own: in an interpreter where fastforget._C cannot load, a second
    derivative through it still raises."""
    code = (
        "import sys; sys.modules['fastforget._C'] = None\n"
        "import torch, fastforget as ff\n"
        "assert not ff.available_backends()['cpu'].available\n"
        "x, A = torch.randn(4, 5, requires_grad=True), torch.randn(2, 5, requires_grad=True)\n"
        "W, B = torch.randn(3, 5), torch.randn(3, 2)\n"
        "y = ff.lora_linear(x, W, None, A, B, 0.5, backend='triton')\n"
        "gx, = torch.autograd.grad((y ** 2).sum(), (x,), create_graph=True)\n"
        "try:\n"
        "    torch.autograd.grad(gx.sum(), (A,))\n"
        "except RuntimeError as e:\n"
        "    assert 'lora_linear_backward_triton has no derivative' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('a second derivative through the Triton flavour did not raise')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def opcheck_samples(device):
    x, weight, bias, lora_A, lora_B = make_layer(20, 24, 18, 4, torch.float32, device)
    keep = dropout_keep_mask(x.shape, 0.4, device)
    x_t = x.t().contiguous().t()  # column-major
    empty = make_layer(0, 24, 18, 4, torch.float32, device)
    for x_, b_, keep_ in ((x, bias, None), (x_t, None, keep), (empty[0], empty[2], None)):
        grad_x = x_.clone().requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (weight, lora_A, lora_B)]
        yield "lora_linear", (grad_x, leaves[0], b_, leaves[1], leaves[2], keep_, SCALE)
        S = SCALE * x_ @ lora_A.t()
        grad_y = torch.randn(x_.shape[0], weight.shape[0], device=device)
        for mask in ([True] * 5, [True, False, False, True, True], [False, True, True, False, False]):
            yield "lora_linear_backward", (grad_y, x_, weight, lora_A, lora_B, keep_, S, SCALE, mask)


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_backward"])
def test_opcheck(fused_backend, op):
    for name, args in opcheck_samples(device_of(fused_backend)):
        if name == op:
            torch.library.opcheck(ff.dispatch.native_op(op, fused_backend), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(fused_backend, compiler):
    layer = make_layer(12, 24, 20, 4, torch.float32, device_of(fused_backend))

    def loss(x, weight, bias, lora_A, lora_B):
        return ff.lora_linear(x, weight, bias, lora_A, lora_B, SCALE, backend=fused_backend).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    got, want = ([t.clone().requires_grad_() for t in layer] for _ in range(2))
    out, expected = compiled(*got), loss(*want)
    out.backward()
    expected.backward()
    assert_close_matmul(out, expected, torch.float32)
    for g, w in zip(got, want):
        assert_close_matmul(g.grad, w.grad, torch.float32)


def test_torch_compile_with_dropout(fused_backend):
    # aot_eager runs the traced ops eagerly, so the compiled graph draws the same mask as eager code
    layer = make_layer(12, 24, 20, 4, torch.float32, device_of(fused_backend))

    def output(*tensors):
        return ff.lora_linear(*tensors, SCALE, 0.5, backend=fused_backend)

    compiled = torch.compile(output, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(*layer)
    torch.manual_seed(5)
    assert torch.equal(got, output(*layer))


# ---------------------------------------------------------------------------------------------------- bad input


def bad_cases():
    x, weight, bias, lora_A, lora_B = make_layer(4, 6, 5, 2, torch.float32, "cpu")
    good = dict(x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B, scale=SCALE, dropout_p=0.1)
    return good, {
        "in_features": (dict(x=torch.randn(4, 7)), ValueError, r"x has shape \(4, 7\) but weight expects 6"),
        "scalar_x": (dict(x=torch.tensor(1.0)), ValueError, r"x has shape \(\)"),
        "weight_1d": (dict(weight=torch.randn(30)), ValueError, r"weight must be 2-D"),
        "bias": (dict(bias=torch.randn(4)), ValueError, r"bias has shape \(4,\); expected \(5,\)"),
        "lora_A_in": (dict(lora_A=torch.randn(2, 5)), ValueError, r"lora_A has shape \(2, 5\); expected \(r, 6\)"),
        "lora_B_out": (dict(lora_B=torch.randn(4, 2)), ValueError, r"lora_B has shape \(4, 2\); expected \(5, 2\)"),
        "lora_B_r": (dict(lora_B=torch.randn(5, 3)), ValueError, r"lora_B has shape \(5, 3\); expected \(5, 2\)"),
        "rank_0": (dict(lora_A=torch.randn(0, 6), lora_B=torch.randn(5, 0)), ValueError, r"r must be >= 1"),
        "dtype": (dict(weight=weight.double()), TypeError, r"weight has dtype torch.float64 but x has dtype torch.f"),
        "adapter_dtype": (dict(lora_B=lora_B.half()), TypeError, r"lora_B has dtype torch.float16"),
        "int_x": (dict(x=x.long()), TypeError, r"x has dtype torch.int64"),
        "not_tensor": (dict(lora_A=[[1.0] * 6] * 2), TypeError, r"lora_A must be a Tensor, not list"),
        "sparse": (dict(weight=weight.to_sparse()), TypeError, r"weight has layout"),
        "device": (dict(bias=bias.to("meta")), ValueError, r"bias is on meta but x is on cpu"),
        "dropout_1": (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\), got 1.0"),
        "dropout_negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        "scale_nan": (dict(scale=float("nan")), ValueError, r"scale must be finite"),
        "training": (dict(training="yes"), TypeError, r"training must be a bool"),
    }


@pytest.mark.parametrize("case", list(bad_cases()[1]), ids=str)
def test_bad_input_is_rejected(backend, case):
    good, cases = bad_cases()
    changes, error, message = cases[case]
    arguments = {**good, **changes}
    before = {  # the dense tensors' values (a sparse or meta case has none to compare)
        k: v.clone()
        for k, v in arguments.items()
        if isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type != "meta"
    }
    rng = torch.get_rng_state()
    with pytest.raises(error, match=message):
        ff.lora_linear(**arguments, backend=backend)
    # rejected before anything ran: the inputs are untouched and no dropout mask was drawn
    assert all(torch.equal(arguments[k], v) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------------------------------------------- torch.func

NAMES = ("x", "weight", "bias", "lora_A", "lora_B")


def per_sample_loop(layer, upstream, backend, truth=False, dropout_p=0.0, seed=None):
    """Outputs and gradients (x, weight, bias, lora_A, lora_B) of each sample on its own with plain autograd,
    stacked: sample i takes the i-th slice of upstream, of x and of the other tensors given with a leading sample
    dim. truth=True: PEFT's formula on fp64 copies instead of ff.lora_linear."""
    unbatched_dims = (None, 2, 1, 2, 2)
    ys, grads = [], []
    for i in range(len(upstream)):
        leaves = [
            (t if n is not None and t.dim() == n else t[i]).detach().clone().requires_grad_()
            for t, n in zip(layer, unbatched_dims)
        ]
        if truth:
            leaves = [t.detach().double().requires_grad_() for t in leaves]
            y = ff.lora_linear_ref(*leaves, SCALE)
        else:
            if seed is not None:
                torch.manual_seed(seed)
            y = ff.lora_linear(*leaves, SCALE, dropout_p, backend=backend)
        y.backward(upstream[i].to(y.dtype))
        ys.append(y.detach())
        grads.append([t.grad for t in leaves])
    return torch.stack(ys), [torch.stack(g) for g in zip(*grads)]


def sample_loss(backend, dropout_p=0.0):
    """(x, weight, bias, lora_A, lora_B, upstream) -> (<y, upstream>, y) for one sample: its gradients are the
    op's backward at that upstream gradient."""

    def loss(x, weight, bias, lora_A, lora_B, upstream):
        y = ff.lora_linear(x, weight, bias, lora_A, lora_B, SCALE, dropout_p, backend=backend)
        return (y * upstream).sum(), y

    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_sample_gradients_under_vmap_of_grad(backend, dtype):
    # torch.func's per-sample gradients (vmap over the samples of grad w.r.t. everything) as fastforget's Fisher
    # computes them: each sample's weight gradients reduce its own rows only; x is (2, 3, in) per sample
    device = device_of(backend)
    x, weight, bias, lora_A, lora_B = make_layer(4 * 6, 9, 7, 3, dtype, device)
    x = x.reshape(4, 2, 3, 9)
    upstream = torch.randn(4, 2, 3, 7, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    grad = torch.func.grad(sample_loss(backend), argnums=(0, 1, 2, 3, 4), has_aux=True)
    grads, y = torch.func.vmap(grad, in_dims=(0, None, None, None, None, 0))(x, weight, bias, lora_A, lora_B, upstream)
    layer = (x, weight, bias, lora_A, lora_B)
    y_true, grads_true = per_sample_loop(layer, upstream, backend, truth=True)
    y_loop, grads_loop = per_sample_loop(layer, upstream, backend)
    assert_close_matmul(y, y_true, dtype)
    for name, got, want, loop in zip(NAMES, grads, grads_true, grads_loop):
        assert got.shape == want.shape and got.dtype == dtype, name
        assert_close_matmul(got, want, dtype)
        assert_close_matmul(got, loop, dtype)  # the same as one sample at a time through the same op


def test_per_sample_weights_under_vmap(backend):
    # a batch of adapters (and base weights) as for an ensemble: the op runs once per sample
    device = device_of(backend)
    x, weight, bias, lora_A, lora_B = make_layer(3 * 5, 8, 6, 2, torch.float32, device)
    x = x.reshape(3, 5, 8)
    batched = [t.expand(3, *t.shape) + 0.1 * torch.randn(3, *t.shape, device=device) for t in (weight, lora_A, lora_B)]
    weights, lora_As, lora_Bs = batched
    upstream = torch.randn(3, 5, 6, device=device)
    in_dims = (0, 0, None, 0, 0, 0)
    grad = torch.func.grad(sample_loss(backend), argnums=(0, 1, 2, 3, 4), has_aux=True)
    grads, y = torch.func.vmap(grad, in_dims=in_dims)(x, weights, bias, lora_As, lora_Bs, upstream)
    y_true, grads_true = per_sample_loop((x, weights, bias, lora_As, lora_Bs), upstream, backend, truth=True)
    assert_close_matmul(y, y_true, torch.float32)
    for got, want in zip(grads, grads_true):
        assert_close_matmul(got, want, torch.float32)
    # the same input for every adapter
    shared = torch.func.vmap(lambda A, B: ff.lora_linear(x[0], weight, bias, A, B, SCALE, backend=backend))
    expected = torch.stack([ff.lora_linear_ref(x[0], weight, bias, A, B, SCALE) for A, B in zip(lora_As, lora_Bs)])
    assert_close_matmul(shared(lora_As, lora_Bs), expected, torch.float32)


def test_jacrev(backend):
    # jacrev vmaps the backward over one-hot upstream gradients: grad_y batched, the saved x and S shared
    device = device_of(backend)
    layer = make_layer(3, 5, 4, 2, torch.float32, device)

    def output(*tensors):
        return ff.lora_linear(*tensors, SCALE, backend=backend)

    got = torch.func.jacrev(output, argnums=(0, 1, 2, 3, 4))(*layer)
    want = torch.autograd.functional.jacobian(
        lambda *t: ff.lora_linear_ref(*t, SCALE), tuple(t.double() for t in layer)
    )  # fmt: skip
    for g, w in zip(got, want):
        assert_close_matmul(g, w, torch.float32)


def test_nested_vmap_and_no_samples(backend):
    device = device_of(backend)
    x, weight, bias, lora_A, lora_B = make_layer(2 * 3 * 4, 6, 5, 2, torch.float32, device)
    x = x.reshape(2, 3, 4, 6)
    upstream = torch.randn(2, 3, 4, 5, device=device)
    grad = torch.func.grad(sample_loss(backend), argnums=3, has_aux=True)
    in_dims = (0, None, None, None, None, 0)
    per_sample = torch.func.vmap(torch.func.vmap(grad, in_dims=in_dims), in_dims=in_dims)
    got, y = per_sample(x, weight, bias, lora_A, lora_B, upstream)
    layer = (x.flatten(0, 1), weight, bias, lora_A, lora_B)
    _, grads_true = per_sample_loop(layer, upstream.flatten(0, 1), backend, truth=True)
    assert_close_matmul(got.flatten(0, 1), grads_true[3], torch.float32)
    assert_close_matmul(y, ff.lora_linear_ref(x, weight, bias, lora_A, lora_B, SCALE), torch.float32)
    none = torch.func.vmap(grad, in_dims=in_dims)(x[0, :0], weight, bias, lora_A, lora_B, upstream[0, :0])
    assert none[0].shape == (0, *lora_A.shape) and none[1].shape == (0, 4, 5)


def test_dropout_under_vmap(backend):
    # the mask is drawn before the op, in x's shape per sample: randomness="same" gives every sample the mask of an
    # unbatched call at that seed; "different" draws one per sample (checked below); "error" refuses
    device = device_of(backend)
    layer = make_layer(3 * 4, 8, 6, 2, torch.float32, device)
    x, weight, bias, lora_A, lora_B = layer
    x = x.reshape(3, 4, 8)
    upstream = torch.randn(3, 4, 6, device=device)
    grad = torch.func.grad(sample_loss(backend, 0.5), argnums=(0, 3, 4), has_aux=True)
    torch.manual_seed(11)
    per_sample = torch.func.vmap(grad, in_dims=(0, None, None, None, None, 0), randomness="same")
    grads, y = per_sample(x, weight, bias, lora_A, lora_B, upstream)
    y_loop, grads_loop = per_sample_loop((x, weight, bias, lora_A, lora_B), upstream, backend, dropout_p=0.5, seed=11)
    assert_close_matmul(y, y_loop, torch.float32)
    for got, want in zip(grads, [grads_loop[i] for i in (0, 3, 4)]):
        assert_close_matmul(got, want, torch.float32)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda x_: sample_loss(backend, 0.5)(x_, *layer[1:], upstream[0]), randomness="error")(x)


def test_dropout_under_vmap_with_different_randomness(backend):
    """A mask per sample: samples with equal inputs get different outputs, and every backend draws the same masks
    at one seed, so the per-sample gradients equal the reference backend's."""
    device = device_of(backend)
    _, weight, bias, lora_A, lora_B = make_layer(4, 8, 6, 2, torch.float32, device)
    x = torch.randn(4, 8, device=device).expand(3, 4, 8)  # three equal samples
    upstream = torch.randn(3, 4, 6, device=device)
    results = {}
    for b in (backend, "reference"):
        grad = torch.func.grad(sample_loss(b, 0.5), argnums=(0, 3, 4), has_aux=True)
        torch.manual_seed(3)
        per_sample = torch.func.vmap(grad, in_dims=(0, None, None, None, None, 0), randomness="different")
        results[b] = per_sample(x, weight, bias, lora_A, lora_B, upstream)
    grads, y = results[backend]
    assert not torch.equal(y[0], y[1]) and not torch.equal(y[1], y[2])
    grads_ref, y_ref = results["reference"]
    assert_close_matmul(y, y_ref, torch.float32)
    for got, want in zip(grads, grads_ref):
        assert_close_matmul(got, want, torch.float32)


# in_dims of (x, weight, bias, lora_A, lora_B, keep) for the forward op and of (grad_y, x, weight, lora_A, lora_B,
# keep, S) for the backward op: rows only (one folded call), one row tensor only, a weight (a call per sample)
OP_IN_DIMS = [
    ((0, None, None, None, None, 0), (0, 0, None, None, None, 0, 0)),
    ((1, None, None, None, None, None), (None, 1, None, None, None, None, None)),
    ((None, None, None, None, None, 0), (0, None, None, None, None, None, None)),
    ((None, None, None, 0, None, None), (None, None, None, 0, None, 0, None)),
    ((0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 0, 0)),
]


@pytest.mark.parametrize("forward_dims, backward_dims", OP_IN_DIMS, ids=str)
def test_ops_under_vmap(fused_backend, forward_dims, backward_dims):
    # the ops' own vmap rules against a loop of the op over the samples, with the dropout mask and every output_mask
    forward, backward = (ff.dispatch.native_op(op, fused_backend) for op in ("lora_linear", "lora_linear_backward"))
    device, samples, g = device_of(fused_backend), 3, torch.Generator().manual_seed(4)
    x, weight, bias, lora_A, lora_B = make_layer(5, 8, 6, 2, torch.float32, device)
    keep = dropout_keep_mask(x.shape, 0.3, device)
    grad_y = torch.randn(5, 6, generator=g).to(device)
    S = SCALE * (x * keep) @ lora_A.t()

    def batch(tensors, in_dims):
        out = []
        for t, d in zip(tensors, in_dims):
            if d is not None:
                t = torch.stack([t + 0.1 * i if t.dtype != torch.bool else t ^ (i % 2 == 1) for i in range(samples)], d)
            out.append(t)
        return out

    def loop(op, tensors, in_dims, *rest):
        results = [
            op(*(t if d is None else t.select(d, i) for t, d in zip(tensors, in_dims)), *rest) for i in range(samples)
        ]
        return [None if r[0] is None else torch.stack(r) for r in zip(*results)]

    args = batch((x, weight, bias, lora_A, lora_B, keep), forward_dims)
    got = torch.vmap(forward, in_dims=(*forward_dims, None))(*args, SCALE)
    for g_, w in zip(got, loop(forward, args, forward_dims, SCALE)):
        assert_close_matmul(g_, w, torch.float32)
    args = batch((grad_y, x, weight, lora_A, lora_B, keep, S), backward_dims)
    for mask in ([True] * 5, [True, False, False, True, True], [False, True, True, False, False]):
        out_dims = tuple(0 if need else None for need in mask)
        got = torch.vmap(backward, in_dims=(*backward_dims, None, None), out_dims=out_dims)(*args, SCALE, mask)
        for g_, w in zip(got, loop(backward, args, backward_dims, SCALE, mask)):
            assert (g_ is None) == (w is None)
            if w is not None:
                assert_close_matmul(g_, w, torch.float32)


# ---------------------------------------------------------------------------------------------------- split-K


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="the Triton backend cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_split_k_matches_one_piece_and_is_deterministic(monkeypatch, dtype):
    """Products with few output tiles and a long K (on a GPU: fewer tiles than SMs) cut K into pieces summed in a
    fixed order: the same values as one piece, and the same bits on every run. The thresholds are lowered or raised
    here so that the interpreter's tiny sizes take both forms (K = 36..48: 3 pieces of 16, the last one partial)."""
    from fastforget.kernels import lora_linear as kernels

    layer = make_layer(40, 48, 36, 4, dtype, device_of("triton"))
    monkeypatch.setattr(kernels, "MIN_K_BLOCKS_PER_SPLIT", 1)
    pieces, split_k = [], kernels._split_k
    monkeypatch.setattr(kernels, "_split_k", lambda *args: pieces.append(split_k(*args)) or pieces[-1])
    monkeypatch.setattr(kernels, "SPLIT_K_BELOW", 0)
    y, grads = run(layer, "triton", dropout_p=0.3, seed=5)
    assert all(n == 1 for n, _ in pieces)
    monkeypatch.setattr(kernels, "SPLIT_K_BELOW", 1 << 20)
    pieces.clear()
    runs = [run(layer, "triton", dropout_p=0.3, seed=5) for _ in range(2)]
    assert len(pieces) == 2 * 5 and all(n > 1 for n, _ in pieces)  # S, dS, dA, dB and dW, twice
    for got, want in zip([runs[0][0], *runs[0][1]], [y, *grads]):
        assert_close_matmul(got, want, dtype)
    for a, b in zip([runs[0][0], *runs[0][1]], [runs[1][0], *runs[1][1]]):
        assert (a is None and b is None) or torch.equal(a, b)
