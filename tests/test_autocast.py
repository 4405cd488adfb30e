"""fastforget's ops under torch.autocast against what torch and PEFT compute under the same autocast: outputs in the
autocast dtype, fp32 master weights with fp32 gradients, within that dtype's tolerance; the ops called directly,
opcheck and torch.compile(fullgraph=True) inside autocast regions; a transformers.Trainer(bf16=True) run."""

import pytest
import torch
import torch.nn.functional as F
from conftest import device_of
from test_anchored_lm_loss import make_inputs, sizes
from test_anchored_lm_loss import opcheck_samples as loss_opcheck_samples
from test_lora_linear import make_layer, shapes_for
from test_lora_linear import opcheck_samples as lora_opcheck_samples

import fastforget as ff
from fastforget.ops.lora_linear import dropout_keep_mask
from fastforget.testing import assert_close_matmul

BF16, F32 = torch.bfloat16, torch.float32
SCALE = 1.7


def autocast(backend, dtype=BF16):
    return torch.autocast(device_of(backend).type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- lora_linear


def lora_output_and_grads(fn, layer, input_dtype):
    """fn's output and the fp32 leaves' gradients (x given in `input_dtype`: a previous layer's output)."""
    x, *weights = layer
    leaves = [x.to(input_dtype).requires_grad_()] + [None if t is None else t.clone().requires_grad_() for t in weights]
    y = fn(*leaves)
    y.float().square().sum().backward()
    return y.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("activation", ["fp32", "autocast"])  # x from an fp32 layer, or one that autocast ran
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=str)
def test_lora_linear_equals_the_peft_formula_under_the_same_autocast(backend, dtype, activation):
    input_dtype = F32 if activation == "fp32" else dtype
    m, n_in, n_out, r, _, _ = shapes_for(backend)[1]
    layer = make_layer(m, n_in, n_out, r, F32, device_of(backend))
    with autocast(backend, dtype):
        y, grads = lora_output_and_grads(lambda *t: ff.lora_linear(*t, SCALE, backend=backend), layer, input_dtype)
        y_peft, grads_peft = lora_output_and_grads(lambda *t: ff.lora_linear_ref(*t, SCALE), layer, input_dtype)
    assert y.dtype == y_peft.dtype == dtype
    assert_close_matmul(y, y_peft, dtype)
    for name, got, want in zip(("x", "weight", "bias", "lora_A", "lora_B"), grads, grads_peft):
        assert got.dtype == want.dtype == (input_dtype if name == "x" else F32), name
        assert_close_matmul(got, want, dtype)


def test_lora_linear_outside_autocast_still_requires_one_dtype():
    x, weight, bias, lora_A, lora_B = make_layer(4, 6, 5, 2, F32, "cpu")
    with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has dtype torch.bfloat16"):
        ff.lora_linear(x.bfloat16(), weight, bias, lora_A, lora_B, SCALE)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        with pytest.raises(TypeError, match="they must match"):
            ff.lora_linear(x.bfloat16(), weight, bias, lora_A, lora_B, SCALE)


def test_fp64_is_not_autocast(backend):
    layer = make_layer(5, 6, 7, 2, torch.float64, device_of(backend))
    with autocast(backend):
        y = ff.lora_linear(*layer, SCALE, backend=backend)
    assert y.dtype == torch.float64
    assert_close_matmul(y, ff.lora_linear_ref(*layer, SCALE), torch.float64)


def test_lora_ops_called_directly_cast_as_autocast_does(fused_backend):
    """The ops' own Autocast kernels: the forward casts its float inputs to the autocast dtype (the keep-mask stays
    bool), the backward runs in the dtypes it is given; each equals the op on inputs cast by hand."""
    forward = ff.dispatch.native_op("lora_linear", fused_backend)
    backward = ff.dispatch.native_op("lora_linear_backward", fused_backend)
    x, weight, bias, lora_A, lora_B = make_layer(9, 12, 10, 3, F32, device_of(fused_backend))
    keep = dropout_keep_mask(x.shape, 0.3, x.device)
    with autocast(fused_backend):
        y, S = forward(x, weight, bias, lora_A, lora_B, keep, SCALE)
    y_cast, S_cast = forward(*(t.to(BF16) for t in (x, weight, bias, lora_A, lora_B)), keep, SCALE)
    assert y.dtype == S.dtype == BF16 and torch.equal(y, y_cast) and torch.equal(S, S_cast)
    args = (torch.randn(9, 10, dtype=BF16), x.to(BF16), weight.to(BF16), lora_A.to(BF16), lora_B.to(BF16), keep, S)
    with autocast(fused_backend):
        grads = backward(*args, SCALE, [True] * 5)
    for got, want in zip(grads, backward(*args, SCALE, [True] * 5)):
        assert got.dtype == BF16 and torch.equal(got, want)


@pytest.mark.parametrize("op", ["lora_linear", "lora_linear_backward"])
def test_lora_opcheck_under_autocast(fused_backend, op):
    for name, args in lora_opcheck_samples(device_of(fused_backend)):
        if name == op:
            with autocast(fused_backend):
                torch.library.opcheck(ff.dispatch.native_op(op, fused_backend), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_lora_linear_compiles_under_autocast(fused_backend, compiler):
    layer = make_layer(12, 24, 20, 4, F32, device_of(fused_backend))

    def loss(x, weight, bias, lora_A, lora_B):
        with autocast(fused_backend):
            y = ff.lora_linear(x, weight, bias, lora_A, lora_B, SCALE, backend=fused_backend)
        return y.float().square().sum(), y.dtype

    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    got, want = ([t.clone().requires_grad_() for t in layer] for _ in range(2))
    (out, out_dtype), (expected, expected_dtype) = compiled(*got), loss(*want)
    out.backward()
    expected.backward()
    assert out_dtype == expected_dtype == BF16
    assert_close_matmul(out, expected, BF16)
    for g, w in zip(got, want):
        assert g.grad.dtype == F32
        assert_close_matmul(g.grad, w.grad, BF16)


# ---------------------------------------------------------------------------------------------------- anchored_lm_loss


def unfused_lm_loss(hidden, weight, labels, *, bias, ref_hidden, token_weights, kl_weight, temperature, kl):
    """What a user writes in torch (HF's loss: logits upcast to fp32 before the cross-entropy), with the KL anchor."""
    logits = F.linear(hidden, weight, bias)
    with torch.no_grad():
        ref_logits = F.linear(ref_hidden, weight, bias)
    counted = labels != -100
    ce = F.cross_entropy(logits.float(), labels, reduction="none") * token_weights
    log_q = F.log_softmax(logits.float() / temperature, dim=-1)
    log_r = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    pair = (log_q, log_r) if kl == "forward" else (log_r, log_q)
    kl_t = F.kl_div(*pair, reduction="none", log_target=True).sum(-1)
    per_token = torch.where(counted, ce + kl_weight * temperature**2 * kl_t, 0)
    return per_token.sum() / counted.sum()


def lm_loss_and_grads(fn, inputs, **kwargs):
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    args = {**inputs, **leaves, **kwargs}
    loss = fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
    loss.backward()
    return loss.detach(), [leaves[k].grad for k in ("hidden", "weight", "bias")]


@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=str)
def test_anchored_lm_loss_equals_the_unfused_formula_under_the_same_autocast(backend, dtype, kl):
    n, h, v, chunk = sizes(backend)
    inputs = make_inputs(n, h, v, F32, device_of(backend))
    options = dict(kl_weight=0.5, temperature=1.5, kl=kl)
    with autocast(backend, dtype):
        got, grads = lm_loss_and_grads(
            lambda *a, **k: ff.anchored_lm_loss(*a, **k, chunk_size=chunk, backend=backend), inputs, **options
        )  # fmt: skip
        want, want_grads = lm_loss_and_grads(unfused_lm_loss, inputs, **options)
    assert got.dtype == want.dtype == F32
    assert_close_matmul(got, want, dtype)
    for got_grad, want_grad in zip(grads, want_grads):
        assert got_grad.dtype == F32
        assert_close_matmul(got_grad, want_grad, dtype)


def test_anchored_lm_loss_computes_the_logits_in_the_autocast_dtype(fused_backend):
    """Not fp32 logits in disguise: under autocast the loss equals the fp32 computation on bf16-rounded logits'
    inputs, and differs from the plain fp32 loss."""
    n, h, v, chunk = sizes(fused_backend)
    x = make_inputs(n, h, v, F32, device_of(fused_backend))
    args = dict(bias=x["bias"], ref_hidden=x["ref_hidden"], kl_weight=0.5, chunk_size=chunk, backend=fused_backend)
    with autocast(fused_backend):
        got = ff.anchored_lm_loss(x["hidden"], x["weight"], x["labels"], **args)
    hidden, weight, bias, ref_hidden = (x[k].to(BF16) for k in ("hidden", "weight", "bias", "ref_hidden"))
    bf16 = ff.anchored_lm_loss(hidden, weight, x["labels"], **{**args, "bias": bias, "ref_hidden": ref_hidden})
    assert torch.equal(got, bf16)
    assert not torch.equal(got, ff.anchored_lm_loss(x["hidden"], x["weight"], x["labels"], **args))


def test_loss_ops_called_directly_cast_as_autocast_does(fused_backend):
    """The fused op casts the GEMMs' inputs to the autocast dtype and keeps token_weights fp32; the row op
    (softmax, CE, KL) takes fp32 logits, as log_softmax does under autocast."""
    device = device_of(fused_backend)
    fused = ff.dispatch.native_op("anchored_lm_loss", fused_backend)
    rows = ff.dispatch.native_op("anchored_lm_loss_rows", fused_backend)
    x = make_inputs(6, 8, 21, F32, device)
    heads = (x["hidden"], x["weight"], x["bias"])
    tail = (x["token_weights"], 0.5, 1.5, False, -100, 4, [True] * 3)
    with autocast(fused_backend):
        got = fused(*heads, x["labels"], x["ref_hidden"], x["weight"], x["bias"], *tail)
    cast = [t.to(BF16) for t in (*heads, x["ref_hidden"])]
    want = fused(*cast[:3], x["labels"], cast[3], cast[1], cast[2], *tail)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    logits = torch.randn(6, 21, dtype=BF16)
    scale = torch.tensor([0.25])
    row_args = (x["labels"], None, scale, 0.5, 1.0, True, -100)
    with autocast(fused_backend):
        loss_rows, d_logits = rows(logits, torch.randn(6, 21), *row_args)
    assert loss_rows.dtype == d_logits.dtype == F32


@pytest.mark.parametrize("op", ["anchored_lm_loss_rows", "anchored_lm_loss"])
def test_loss_opcheck_under_autocast(fused_backend, op):
    for name, args in loss_opcheck_samples(device_of(fused_backend)):
        if name == op:
            with autocast(fused_backend):
                torch.library.opcheck(ff.dispatch.native_op(op, fused_backend), args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_anchored_lm_loss_compiles_under_autocast(fused_backend, compiler):
    n, h, v, chunk = sizes(fused_backend)
    x = make_inputs(n, h, v, F32, device_of(fused_backend))

    def loss(hidden, weight, bias):
        with autocast(fused_backend):
            return ff.anchored_lm_loss(
                hidden, weight, x["labels"], bias=bias, ref_hidden=x["ref_hidden"], kl_weight=0.5, shift=True,
                token_weights=x["token_weights"], chunk_size=chunk, backend=fused_backend,
            )  # fmt: skip

    compiled = torch.compile(loss, fullgraph=True, backend=compiler)
    got, want = ([x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")] for _ in range(2))
    out, expected = compiled(*got), loss(*want)
    out.backward()
    expected.backward()
    assert_close_matmul(out, expected, BF16)
    for g, w in zip(got, want):
        assert_close_matmul(g.grad, w.grad, BF16)
