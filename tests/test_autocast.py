"""fastforget's ops under torch.autocast against what torch and PEFT compute under the same autocast: outputs in the
autocast dtype, fp32 master weights with fp32 gradients, within that dtype's tolerance; the ops called directly,
opcheck and torch.compile(fullgraph=True) inside autocast regions; a transformers.Trainer(bf16=True) run."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, FUSED_BACKENDS, device_of
from test_anchored_lm_loss import make_inputs, sizes
from test_anchored_lm_loss import opcheck_samples as loss_opcheck_samples
from test_lora_linear import make_layer, shapes_for
from test_lora_linear import opcheck_samples as lora_opcheck_samples

import fastforget as ff
from fastforget.ops.lora_linear import dropout_keep_mask
from fastforget.testing import TOLERANCES, assert_close_matmul

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


def test_per_sample_gradients_under_autocast(backend):
    """torch.func's path (vmap of grad, as the per-sample Fisher runs it) inside an autocast region: each sample's
    fp32 adapter gradients equal those of a loop of ordinary backward passes under the same autocast."""
    torch.manual_seed(0)
    layer = ff.LoRALinear(torch.nn.Linear(8, 6), r=2, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    params = {name: p.detach() for name, p in layer.named_parameters() if p.requires_grad}
    samples = torch.randn(5, 3, 8)

    def loss(params, x):
        with autocast(backend):
            return torch.func.functional_call(layer, params, (x,)).float().square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, samples)
    for i, x in enumerate(samples):
        leaves = {name: p.clone().requires_grad_() for name, p in params.items()}
        loop = torch.autograd.grad(loss(leaves, x), list(leaves.values()))
        for got, want in zip(per_sample.values(), loop):
            assert got.dtype == want.dtype == F32
            assert_close_matmul(got[i], want, BF16)


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


@pytest.mark.parametrize("weighting", ["dft", "eaft"])
def test_token_weighting_equals_the_unfused_formula_under_the_same_autocast(backend, weighting):
    """DFT / EAFT (with the KL anchor) under bf16 autocast: the gate from the bf16 GEMM's logits upcast to fp32, as
    the unfused formula computes it there; loss and fp32 gradients."""
    n, h, v, chunk = sizes(backend)
    inputs = make_inputs(n, h, v, F32, device_of(backend))
    options = dict(kl_weight=0.5, temperature=1.5, token_weighting=weighting, eaft_alpha=0.8)
    with autocast(backend, BF16):
        got, grads = lm_loss_and_grads(
            lambda *a, **k: ff.anchored_lm_loss(*a, **k, chunk_size=chunk, backend=backend), inputs, **options
        )  # fmt: skip
        want, want_grads = lm_loss_and_grads(ff.anchored_lm_loss_ref, inputs, **options)
    assert got.dtype == want.dtype == F32
    assert_close_matmul(got, want, BF16)
    for got_grad, want_grad in zip(grads, want_grads):
        assert got_grad.dtype == F32
        assert_close_matmul(got_grad, want_grad, BF16)


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


# ---------------------------------------------------------------------------------------------------- models


def adapter_weights(model):
    """{module name: (A, B)} of fastforget's or PEFT's LoRA model, copied."""
    from peft.tuners.lora import LoraLayer

    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, ff.LoRALinear):
            weights[name] = (module.lora_A.detach().clone(), module.lora_B.detach().clone())
        elif isinstance(module, LoraLayer):
            pair = (module.lora_A["default"].weight, module.lora_B["default"].weight)
            weights[name.removeprefix("base_model.model.")] = tuple(w.detach().clone() for w in pair)
    return weights


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_within_autocast_noise(ours, peft, peft_fp32, name=""):
    """Whole models, where bf16 roundings compound through the layers: fastforget's result is as close to PEFT's
    under the same autocast as the noise of bf16 autocast itself, |ours - peft| <= 2 |peft - peft in fp32|
    (norm-wise; two runs with independent roundings of that size differ by ~sqrt(2) of it). A wrong formula or a
    missing term is far outside; tests above pin the dtypes and single ops to bf16 tolerance."""
    noise = relative_error(peft, peft_fp32)
    assert 0 < noise < 0.25, name  # autocast did round, and the models agree at all
    assert relative_error(ours, peft) <= 2 * noise, f"{name}: {relative_error(ours, peft):.3g} vs noise {noise:.3g}"


def assert_adapters_within_autocast_noise(ours, peft, peft_fp32):
    """The same, per adapter (A and B), over {module name: (A, B)} dicts (gradients or updates)."""
    assert ours.keys() == peft.keys() == peft_fp32.keys() and ours
    for name, pair in ours.items():
        for which, got, want, want_fp32 in zip("AB", pair, peft[name], peft_fp32[name]):
            assert got.dtype == want.dtype == F32, name
            assert_within_autocast_noise(got, want, want_fp32, f"{name}.lora_{which}")


# Triton's bf16 GEMMs under the interpreter carry about twice the rounding error of the C++ kernels (relative error
# ~6e-3 against ~2.5e-3 on the same bf16 inputs, autocast or not): within the per-op bf16 tolerance its tests above
# check, but over a whole model above the bound below. Its autocast behaviour is tested per op.
@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton" or CUDA] + ["reference"])
@pytest.mark.parametrize("model", ["llama", "gpt2", "nf4"])  # nn.Linear, Conv1D, bitsandbytes Linear4bit bases
def test_lora_models_equal_peft_under_autocast(backend, model):
    """Logits, input-embedding gradients and adapter gradients of fastforget's LoRA model under CPU bf16 autocast,
    against PEFT's on the same model with the same adapters under the same autocast. Train mode: bitsandbytes
    computes Linear4bit exactly there (eval under no_grad repacks it); no dropout."""
    from test_lora_peft import TOKENS, peft_twin, run, tiny_bnb_llama, tiny_gpt2, tiny_llama

    make = {"llama": tiny_llama, "gpt2": tiny_gpt2, "nf4": lambda: tiny_bnb_llama("nf4")}[model]
    ours, theirs = peft_twin(make())
    for _, module in ff.lora.lora_modules(ours):
        module.backend = backend
    ours.train(), theirs.train()
    embeds = ours.get_input_embeddings()(TOKENS).detach()
    with torch.autocast("cpu", dtype=BF16):
        logits, grads, d_embeds = run(ours, embeds)
        peft_logits, peft_grads, peft_d_embeds = run(theirs, embeds)
    theirs.zero_grad(set_to_none=True)
    fp32_logits, fp32_grads, fp32_d_embeds = run(theirs, embeds)
    assert logits.dtype == peft_logits.dtype == BF16 and d_embeds.dtype == F32
    assert_within_autocast_noise(logits, peft_logits, fp32_logits, "logits")
    assert_within_autocast_noise(d_embeds, peft_d_embeds, fp32_d_embeds, "d inputs_embeds")
    assert_adapters_within_autocast_noise(grads, peft_grads, fp32_grads)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])  # TRL's default: on
def test_trainer_bf16_run_equals_peft(tmp_path, checkpointing):
    """transformers.Trainer(bf16=True, use_cpu=True) -- accelerate's autocast around the forward -- on a LLaMA with
    ff.apply_lora(model, "all-linear") and on the same LLaMA made by peft.get_peft_model with the same adapters, with
    and without gradient checkpointing: the same losses (to bf16 tolerance) and adapter updates (within the noise of
    bf16 autocast, which PEFT's fp32 run gives). SGD with a small step: an update proportional to the gradient
    (Adam's first steps are ~lr * sign(g), which a sign flip of a near-zero gradient element turns by 2 lr), and
    trajectories that the steps do not pull apart (at lr 0.5 four steps amplify the per-step rounding differences
    several times, PEFT's own fp32-vs-bf16 ones too)."""
    transformers = pytest.importorskip("transformers")
    from test_lora_peft import VOCAB, peft_twin, tiny_llama

    ours, theirs = peft_twin(tiny_llama())
    theirs_fp32 = copy.deepcopy(theirs)
    tokens = torch.randint(0, VOCAB, (8, 7), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": row, "labels": row} for row in tokens]
    layer_dtypes = []
    first_adapter = ff.lora.lora_modules(ours)[0][1]
    first_adapter.register_forward_hook(lambda module, args, out: layer_dtypes.append(out.dtype))

    def train(model, name, bf16=True):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), bf16=bf16, use_cpu=True, per_device_train_batch_size=2, max_steps=4,
            optim="sgd", learning_rate=0.05, lr_scheduler_type="constant", logging_steps=1, report_to="none",
            save_strategy="no", seed=0, disable_tqdm=True, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        before = adapter_weights(model)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        after = adapter_weights(model)
        updates = {k: tuple(a - b for a, b in zip(after[k], before[k])) for k in before}
        losses = torch.tensor([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
        return losses, updates

    losses, updates = train(ours, "fastforget")
    peft_losses, peft_updates = train(theirs, "peft")
    fp32_losses, fp32_updates = train(theirs_fp32, "peft-fp32", bf16=False)
    assert layer_dtypes and set(layer_dtypes) == {BF16}  # the Trainer ran the adapters under bf16 autocast
    assert len(losses) == len(peft_losses) == 4
    torch.testing.assert_close(losses, peft_losses, **TOLERANCES[BF16])  # fp32 losses of bf16 logits
    assert not torch.equal(losses, fp32_losses)
    assert_adapters_within_autocast_noise(updates, peft_updates, fp32_updates)
