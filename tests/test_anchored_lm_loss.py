"""ff.anchored_lm_loss on every backend against its reference (unfused torch on the full logits)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CUDA, FUSED_BACKENDS, device_of

import fastforget as ff
from fastforget.testing import assert_close_matmul

INTERPRETED = {"triton"} if not CUDA else set()


def sizes(backend):
    """(tokens, hidden, vocab, chunk): a vocabulary that is no multiple of any block; chunks that split rows
    unevenly. Triton's interpreter runs numpy per block: tiny sizes there."""
    return (9, 8, 37, 4) if backend in INTERPRETED else (37, 16, 101, 16)


def make_inputs(n, h, v, dtype, device, seed=0, ref_shift=0.5):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device, dtype)

    hidden = rand(n, h)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::5] = -100
    return dict(
        hidden=hidden,
        weight=rand(v, h, std=2 * h**-0.5),
        labels=labels,
        bias=rand(v, std=0.5),
        ref_hidden=(hidden.float() + ref_shift * torch.randn(n, h, generator=g).to(device)).to(dtype),
        token_weights=torch.rand(n, generator=g).to(device) + 0.5,
    )


def loss_and_grads(fn, inputs, **kwargs):
    leaves = {k: inputs[k].detach().clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    args = {**inputs, **leaves, **kwargs}
    loss = fn(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)
    loss.backward()
    return loss.detach(), [leaves[k].grad for k in ("hidden", "weight", "bias")]


def fused(backend):
    return lambda *a, **k: ff.anchored_lm_loss(*a, backend=backend, **k)


def check_matches_reference(backend, inputs, dtype, **kwargs):
    got, got_grads = loss_and_grads(fused(backend), inputs, **kwargs)
    kwargs.pop("chunk_size", None)
    want, want_grads = loss_and_grads(ff.anchored_lm_loss_ref, inputs, **kwargs)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_matmul(got, want, dtype)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == dtype and g.shape == w.shape
        assert_close_matmul(g, w, dtype)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kl", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, dtype, kl, temperature):
    n, h, v, chunk = sizes(backend)
    inputs = make_inputs(n, h, v, dtype, device_of(backend))
    check_matches_reference(
        backend, inputs, dtype, kl_weight=0.7, temperature=temperature, kl=kl, chunk_size=chunk
    )  # fmt: skip


def test_reference_is_the_formula():
    """The oracle itself against the formula written out in fp64: KL(r || q) forward, KL(q || r) reverse."""
    x = make_inputs(6, 5, 11, torch.float64, "cpu")
    z = x["hidden"] @ x["weight"].t() + x["bias"]
    a = x["ref_hidden"] @ x["weight"].t() + x["bias"]
    y, w, t = x["labels"], x["token_weights"], 1.7
    c = y != -100
    ce = torch.logsumexp(z, -1) - z.gather(1, y.clamp(min=0)[:, None])[:, 0]
    log_q, log_r = (u / t - torch.logsumexp(u / t, -1, keepdim=True) for u in (z, a))
    kls = {"forward": (log_r.exp() * (log_r - log_q)).sum(-1), "reverse": (log_q.exp() * (log_q - log_r)).sum(-1)}
    for kl, kl_t in kls.items():
        want = (c * (w * ce + 0.3 * t * t * kl_t)).sum() / c.sum()
        got = ff.anchored_lm_loss_ref(**x, kl_weight=0.3, temperature=t, kl=kl)
        torch.testing.assert_close(got, want)


def test_kl_weight_zero_is_cross_entropy(backend):
    n, h, v, chunk = sizes(backend)
    x = make_inputs(n, h, v, torch.float32, device_of(backend))
    labels = x["labels"].int()  # any integer dtype
    got = ff.anchored_lm_loss(x["hidden"], x["weight"], labels, bias=x["bias"], chunk_size=chunk, backend=backend)
    want = F.cross_entropy(F.linear(x["hidden"], x["weight"], x["bias"]), x["labels"])
    assert_close_matmul(got, want, torch.float32)


def test_token_weights_scale_the_cross_entropy_only(backend):
    n, h, v, chunk = sizes(backend)
    x = make_inputs(n, h, v, torch.float32, device_of(backend))
    common = dict(bias=x["bias"], ref_hidden=x["ref_hidden"], kl_weight=0.5, chunk_size=chunk, backend=backend)
    plain = ff.anchored_lm_loss(x["hidden"], x["weight"], x["labels"], **common)
    ce = ff.anchored_lm_loss(x["hidden"], x["weight"], x["labels"], bias=x["bias"], chunk_size=chunk, backend=backend)
    doubled = ff.anchored_lm_loss(
        x["hidden"], x["weight"], x["labels"], token_weights=torch.full_like(x["token_weights"], 2.0), **common
    )
    assert_close_matmul(doubled, plain + ce, torch.float32)


def test_all_tokens_ignored(backend):
    n, h, v, chunk = sizes(backend)
    x = make_inputs(n, h, v, torch.float32, device_of(backend))
    x["labels"] = torch.full_like(x["labels"], -100)
    loss, grads = loss_and_grads(fused(backend), x, kl_weight=1.0, chunk_size=chunk)
    assert loss.item() == 0
    for g in grads:
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("shape", [(3, 8, 32001), (2, 4, 50257)], ids=str)
def test_vocabulary_no_multiple_of_a_block(fused_backend, shape):
    n, h, v = shape
    if fused_backend in INTERPRETED and v > 40000:  # 1024-wide blocks there: 32001 leaves a partial one
        pytest.skip("one odd vocabulary of this size is enough under the interpreter")
    x = make_inputs(n, h, v, torch.float32, device_of(fused_backend))
    for kl in ("forward", "reverse"):
        check_matches_reference(fused_backend, x, torch.float32, kl_weight=0.5, temperature=2.0, kl=kl, chunk_size=2)


def test_chunks_that_split_sequences_and_shift(backend):
    _, h, v, _ = sizes(backend)
    device = device_of(backend)
    x = make_inputs(14, h, v, torch.float32, device)
    batch = {k: t.reshape(2, 7, *t.shape[1:]) for k, t in x.items() if k not in ("weight", "bias")}
    batch.update(weight=x["weight"], bias=x["bias"])
    common = dict(kl_weight=0.4, shift=True)
    results = [loss_and_grads(fused(backend), batch, chunk_size=c, **common) for c in (1, 5, None)]
    want, want_grads = loss_and_grads(ff.anchored_lm_loss_ref, batch, **common)
    for got, grads in results:
        assert_close_matmul(got, want, torch.float32)
        for g, w in zip(grads, want_grads):
            assert g.shape == w.shape
            assert_close_matmul(g, w, torch.float32)
    # the shift by hand: position t predicts label t + 1, the last position nothing
    manual = {k: batch[k][:, :-1] for k in ("hidden", "ref_hidden")}
    manual.update({k: batch[k][:, 1:] for k in ("labels", "token_weights")}, weight=x["weight"], bias=x["bias"])
    unshifted, _ = loss_and_grads(ff.anchored_lm_loss_ref, manual, kl_weight=0.4)
    assert_close_matmul(want, unshifted, torch.float32)


def test_separate_reference_head(fused_backend):
    device = device_of(fused_backend)
    x = make_inputs(9, 8, 37, torch.float32, device)
    x.update(ref_hidden=torch.randn(9, 6, device=device), ref_weight=torch.randn(37, 6, device=device))
    check_matches_reference(fused_backend, x, torch.float32, kl_weight=0.9, kl="reverse", chunk_size=4)


def test_frozen_head_and_no_grad(fused_backend):
    """A LoRA model's head is frozen: only d hidden is computed (and nothing under no_grad)."""
    x = make_inputs(9, 8, 37, torch.float32, device_of(fused_backend))
    hidden = x["hidden"].clone().requires_grad_()
    common = dict(ref_hidden=x["ref_hidden"], kl_weight=0.5, token_weights=x["token_weights"])
    loss = ff.anchored_lm_loss(hidden, x["weight"], x["labels"], chunk_size=4, backend=fused_backend, **common)
    (grad,) = torch.autograd.grad(loss, [hidden])
    want_hidden = x["hidden"].clone().requires_grad_()
    want = ff.anchored_lm_loss_ref(want_hidden, x["weight"], x["labels"], **common)
    (want_grad,) = torch.autograd.grad(want, [want_hidden])
    assert_close_matmul(loss, want, torch.float32)
    assert_close_matmul(grad, want_grad, torch.float32)
    with torch.no_grad():
        quiet = ff.anchored_lm_loss(hidden, x["weight"], x["labels"], backend=fused_backend, **common)
    assert not quiet.requires_grad
    assert_close_matmul(quiet, want, torch.float32)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_gradcheck_float64(kl):
    x = make_inputs(5, 4, 13, torch.float64, "cpu")
    # a separate reference head: the default (weight itself) would move with the numerical perturbations of weight
    ref_weight = x["weight"].clone()

    def loss(hidden, weight, bias):
        return ff.anchored_lm_loss(
            hidden, weight, x["labels"], bias=bias, ref_hidden=x["ref_hidden"], ref_weight=ref_weight,
            kl_weight=0.6, temperature=1.5, kl=kl, token_weights=x["token_weights"], chunk_size=2, backend="cpu",
        )  # fmt: skip

    leaves = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    assert torch.autograd.gradcheck(loss, leaves)


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="the C++ extension is not built")
def test_torch_compile_fullgraph():
    x = make_inputs(9, 8, 37, torch.float32, "cpu")

    def loss(hidden, weight, bias):
        return ff.anchored_lm_loss(
            hidden, weight, x["labels"], bias=bias, ref_hidden=x["ref_hidden"], kl_weight=0.5, shift=True,
            token_weights=x["token_weights"], chunk_size=4, backend="cpu",
        )  # fmt: skip

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, want = ([x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")] for _ in range(2))
    out, expected = compiled(*got), loss(*want)
    out.backward()
    expected.backward()
    assert_close_matmul(out, expected, torch.float32)
    for g, w in zip(got, want):
        assert_close_matmul(g.grad, w.grad, torch.float32)


def opcheck_samples(device):
    x = make_inputs(6, 8, 21, torch.float32, device)
    logits = F.linear(x["hidden"], x["weight"], x["bias"])
    ref_logits = F.linear(x["ref_hidden"], x["weight"], x["bias"])
    scale = torch.tensor([0.25], device=device)
    yield "anchored_lm_loss_rows", (logits, ref_logits, x["labels"], x["token_weights"], scale, 0.5, 2.0, False, -100)
    yield "anchored_lm_loss_rows", (logits, None, x["labels"], None, scale, 0.0, 1.0, True, -100)
    yield "anchored_lm_loss_rows", (logits, ref_logits, x["labels"], x["token_weights"], scale, 0.5, 2.0, False, -100,
                                    True)  # fmt: skip
    leaves = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    for mask in ([True] * 3, [True, False, False]):
        yield "anchored_lm_loss", (
            *leaves, x["labels"], x["ref_hidden"], x["weight"], x["bias"], x["token_weights"], 0.5, 1.5, True, -100,
            4, mask,
        )  # fmt: skip
    dft_and_eaft = (True, 0.7), (False, 1.0)  # DFT with the anchor (ASFT); EAFT
    for extra in dft_and_eaft:
        yield "anchored_lm_loss", (
            *leaves, x["labels"], x["ref_hidden"], x["weight"], x["bias"], x["token_weights"], 0.5, 1.5, False, -100,
            4, [True] * 3, *extra,
        )  # fmt: skip


@pytest.mark.parametrize("op", ["anchored_lm_loss_rows", "anchored_lm_loss"])
def test_opcheck(fused_backend, op):
    for name, args in opcheck_samples(device_of(fused_backend)):
        if name == op:
            torch.library.opcheck(ff.dispatch.native_op(op, fused_backend), args)


# ---------------------------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    (dict(labels=torch.tensor([0, 3, 37, 2, 40, 1, 0, 0, 0])), ValueError, r"labels\[2\] = 37"),
    (dict(labels=torch.tensor([0, 3, -2, 2, 4, 1, 0, 0, 0])), ValueError, r"labels\[2\] = -2"),
    (dict(labels=torch.zeros(9)), TypeError, "labels has dtype"),
    (dict(labels=torch.zeros(8, dtype=torch.long)), ValueError, "labels has shape"),
    (dict(weight=torch.randn(37, 8, dtype=torch.float64)), TypeError, "weight has dtype"),
    (dict(weight=torch.randn(37, 7)), ValueError, "hidden has shape"),
    (dict(bias=torch.randn(36)), ValueError, "bias has shape"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(kl_weight=-1.0), ValueError, "kl_weight must be >= 0"),
    (dict(kl_weight=float("inf")), ValueError, "kl_weight must be finite"),
    (dict(token_weights=torch.tensor([1.0] * 8 + [float("nan")])), ValueError, "token_weights has a non-finite"),
    (dict(kl="sideways"), ValueError, "kl must be one of"),
    (dict(ref_hidden=None), ValueError, "needs ref_hidden"),
    (dict(ref_hidden=torch.randn(9, 5)), ValueError, "ref_hidden has shape"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(shift=1), TypeError, "shift must be a bool"),
]


@pytest.mark.parametrize("bad, error, match", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_bad_inputs_are_rejected_before_any_work(backend, bad, error, match):
    x = make_inputs(9, 8, 37, torch.float32, device_of(backend))
    x["labels"] = x["labels"].clamp(min=0)
    leaves = {k: x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    args = {**x, **leaves, "kl_weight": 0.5, **bad}
    with pytest.raises(error, match=match):
        ff.anchored_lm_loss(args.pop("hidden"), args.pop("weight"), args.pop("labels"), backend=backend, **args)
    assert all(t.grad is None for t in leaves.values())


def test_native_binding_checks_sizes(fused_backend):
    x = make_inputs(6, 8, 21, torch.float32, device_of(fused_backend))
    logits = F.linear(x["hidden"], x["weight"])
    op = ff.dispatch.native_op("anchored_lm_loss_rows", fused_backend)
    scale = torch.ones(1, device=logits.device)
    with pytest.raises((RuntimeError, ValueError), match="labels"):
        op(logits, None, x["labels"][:5], None, scale, 0.0, 1.0, False, -100)
    with pytest.raises((RuntimeError, ValueError), match="ref_logits"):
        op(logits, logits[:5], x["labels"], None, scale, 0.5, 1.0, False, -100)
    with pytest.raises((RuntimeError, ValueError), match="token_weights"):
        op(logits, None, x["labels"], x["token_weights"][:5], scale, 0.0, 1.0, False, -100)


# ---------------------------------------------------------------------------------------------------- ProtectedTrainer


class TinyLM(torch.nn.Module):
    def __init__(self, vocab=29, width=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.body = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)


def lm_batch_loss(model, batch):
    (tokens,) = batch
    return ff.trainer.LMHeadInputs(torch.tanh(model.body(model.embed(tokens))), model.head.weight, tokens)


def test_trainer_kl_to_base():
    import copy

    torch.manual_seed(0)
    model = TinyLM()
    base = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # the model has moved away from the base: the KL is not 0
        model.body.weight.add_(0.3 * torch.randn_like(model.body.weight))
    tokens = torch.randint(0, 29, (3, 7))
    out, ref = lm_batch_loss(model, (tokens,)), lm_batch_loss(base, (tokens,))
    want = ff.anchored_lm_loss_ref(
        out.hidden, out.weight, tokens, ref_hidden=ref.hidden, ref_weight=ref.weight, kl_weight=0.5, shift=True
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ff.ProtectedTrainer(model, optimizer, batch_loss=lm_batch_loss, kl_to_base=0.5, base_model=base)
    before = model.body.weight.detach().clone()
    stats = trainer.step((tokens,))
    assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert not torch.equal(model.body.weight, before) and base.head.weight.grad is None
    # without the anchor, the same batch_loss gives the plain shifted cross-entropy
    out = lm_batch_loss(model, (tokens,))
    logits = out.hidden[:, :-1] @ out.weight.t()
    want = F.cross_entropy(logits.reshape(-1, 29), tokens[:, 1:].reshape(-1))
    plain = ff.ProtectedTrainer(model, optimizer, batch_loss=lm_batch_loss).step((tokens,))["loss"]
    assert plain == pytest.approx(want.item(), rel=1e-5)


def test_trainer_kl_to_base_needs_hidden_states():
    model = TinyLM()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="kl_to_base needs"):
        ff.ProtectedTrainer(model, optimizer, batch_loss=lm_batch_loss, kl_to_base=0.5)
    with pytest.raises(ValueError, match="kl_to_base must be"):
        ff.ProtectedTrainer(model, optimizer, batch_loss=lm_batch_loss, kl_to_base=-1, base_model=model)
    trainer = ff.ProtectedTrainer(
        model, optimizer, batch_loss=lambda m, b: m.head.weight.sum(), kl_to_base=0.5, base_model=model
    )
    with pytest.raises(TypeError, match="LMHeadInputs"):
        trainer.step((torch.zeros(2, 3, dtype=torch.long),))


# ---------------------------------------------------------------------------------------------------- token weighting


def dft_formula(z, labels, ignore_index=-100):
    """DFT written out: mean over counted tokens of sg(p_y) CE (TRL's per_token_loss * log_probs.exp().detach())."""
    counted = labels != ignore_index
    log_p = torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(counted, -log_p * log_p.exp().detach(), 0).sum() / counted.sum().clamp(min=1)


def eaft_plain(z, labels, alpha=1.0, ignore_index=-100):
    """EAFT as LLaMA-Factory's _eaft_cross_entropy computes it (k = 20, the entropy divided by 3, a mean over the
    counted tokens), written out on the full logits; fewer than 20 logits: all of them (Axolotl's min(k, V))."""
    counted = labels != ignore_index
    ce = F.cross_entropy(z[counted], labels[counted], reduction="none")
    with torch.no_grad():
        top = torch.topk(z[counted].detach(), k=min(20, z.shape[-1]), dim=-1).values
        log_p = top - torch.logsumexp(top, dim=-1, keepdim=True)
        entropy = -(log_p.exp() * log_p).sum(-1)
        gate = (entropy / 3.0) ** alpha
    return (ce * gate).mean()


@pytest.mark.parametrize("vocab", [11, 37])  # fewer and more than EAFT's 20
def test_reference_token_weighting_is_the_formula(vocab):
    x = make_inputs(9, 5, vocab, torch.float64, "cpu")
    z = F.linear(x["hidden"], x["weight"], x["bias"])
    y = x["labels"]
    for weighting, want in (("dft", dft_formula(z, y)), ("eaft", eaft_plain(z, y, alpha=1.3))):
        got = ff.anchored_lm_loss_ref(x["hidden"], x["weight"], y, bias=x["bias"], token_weighting=weighting,
                                      eaft_alpha=1.3)  # fmt: skip
        torch.testing.assert_close(got, want)
    # ASFT = DFT + kl_weight KL(p_ref || p_theta): the KL part is the plain anchor's
    anchor = dict(bias=x["bias"], ref_hidden=x["ref_hidden"], kl_weight=0.4)
    asft = ff.anchored_lm_loss_ref(x["hidden"], x["weight"], y, token_weighting="dft", **anchor)
    kl_only = ff.anchored_lm_loss_ref(x["hidden"], x["weight"], y, **anchor) - F.cross_entropy(z, y)
    torch.testing.assert_close(asft, dft_formula(z, y) + kl_only)


@pytest.mark.parametrize("kl_weight", [0.0, 0.6], ids=["alone", "with-kl"])
@pytest.mark.parametrize("weighting", ["dft", "eaft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_weighting_matches_reference(backend, dtype, weighting, kl_weight):
    n, h, v, chunk = sizes(backend)
    inputs = make_inputs(n, h, v, dtype, device_of(backend))
    check_matches_reference(
        backend, inputs, dtype, kl_weight=kl_weight, temperature=1.5, token_weighting=weighting, eaft_alpha=0.7,
        chunk_size=chunk,
    )  # fmt: skip


@pytest.mark.parametrize("weighting", ["dft", "eaft"])
def test_token_weighting_equals_the_plain_formula_on_every_backend(backend, weighting):
    """Independently of the reference: the fused loss and its gradients against DFT / EAFT written out on the
    full logits (fp64 inputs: the fused backends agree to rounding)."""
    n, h, v, chunk = sizes(backend)
    x = make_inputs(n, h, v, torch.float32, device_of(backend))
    leaves = [x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    got = ff.anchored_lm_loss(*leaves[:2], x["labels"], bias=leaves[2], token_weighting=weighting, chunk_size=chunk,
                              backend=backend)  # fmt: skip
    got_grads = torch.autograd.grad(got, leaves)
    plain = dft_formula if weighting == "dft" else eaft_plain
    want = plain(F.linear(leaves[0], leaves[1], leaves[2]), x["labels"])
    want_grads = torch.autograd.grad(want, leaves)
    assert_close_matmul(got, want, torch.float32)
    for g, w in zip(got_grads, want_grads):
        assert_close_matmul(g, w, torch.float32)


def sft_trainer(tmp_path, trainer_class=None, config_loss_type="dft", **extra):
    """A TRL SFTTrainer (or trainer_class) on a 1-layer LLaMA and 3 texts of unequal lengths (its collator pads with
    -100), and one batch of its dataloader."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {f"t{i}": i for i in range(40)} | {"<pad>": 40, "<unk>": 41, "<eos>": 42}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(0, 40, (n,), generator=g)) for n in (5, 8, 3)]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(vocab), max_position_embeddings=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=1, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, max_length=16, loss_type=config_loss_type, bf16=False,
    )  # fmt: skip
    data = datasets.Dataset.from_list([{"text": t} for t in texts])
    trainer = (trainer_class or trl.SFTTrainer)(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, **extra
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any()
    return trainer, batch


def loss_and_param_grads(loss_fn, model):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn()
    return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)


def assert_same_loss_and_grads(got, want):
    torch.testing.assert_close(got[0], want[0].float(), rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1], want[1]):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_dft_equals_trl_sft_trainer_loss_type_dft(backend, tmp_path):
    """TRL's own SFTTrainer(loss_type="dft").compute_loss on a batch of its collator, against ff.anchored_lm_loss on
    the same model's final hidden states: the loss and every parameter's gradient."""
    trainer, batch = sft_trainer(tmp_path)
    model = trainer.model
    want = loss_and_param_grads(lambda: trainer.compute_loss(model, batch), model)

    def fused():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        head = model.get_output_embeddings()
        return ff.anchored_lm_loss(
            hidden, head.weight, batch["labels"], shift=True, token_weighting="dft", backend=backend
        )  # fmt: skip

    assert_same_loss_and_grads(loss_and_param_grads(fused, model), want)


def test_protection_mixin_takes_trls_loss_type(tmp_path):
    """ProtectionMixin in front of SFTTrainer reads SFTConfig(loss_type="dft") and computes it in the fused loss:
    the same loss and gradients as TRL's own; loss_type="eaft" gives the plain EAFT; unknown names are refused."""
    trl = pytest.importorskip("trl")
    from fastforget.transformers import ProtectionMixin

    class Protected(ProtectionMixin, trl.SFTTrainer):
        pass

    trainer, batch = sft_trainer(tmp_path)
    want = loss_and_param_grads(lambda: trainer.compute_loss(trainer.model, batch), trainer.model)
    protected, _ = sft_trainer(tmp_path, Protected)
    assert protected.token_weighting == "dft"
    protected.model.train()
    got = loss_and_param_grads(lambda: protected.compute_loss(protected.model, batch), protected.model)
    assert_same_loss_and_grads(got, want)

    eaft, _ = sft_trainer(tmp_path, Protected, config_loss_type="nll", loss_type="eaft")
    eaft.model.train()
    got = eaft.compute_loss(eaft.model, batch)
    logits = eaft.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    want = eaft_plain(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="loss_type must be one of 'nll', 'chunked_nll', 'dft', 'eaft'"):
        sft_trainer(tmp_path, Protected, loss_type="focal")


def test_token_weighting_under_torch_compile():
    if "cpu" not in FUSED_BACKENDS:
        pytest.skip("the C++ extension is not built")
    x = make_inputs(9, 8, 37, torch.float32, "cpu")

    def loss(hidden, weight, bias, weighting):
        return ff.anchored_lm_loss(
            hidden, weight, x["labels"], bias=bias, ref_hidden=x["ref_hidden"], kl_weight=0.5,
            token_weighting=weighting, chunk_size=4, backend="cpu",
        )  # fmt: skip

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for weighting in ("dft", "eaft"):
        got, want = ([x[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")] for _ in range(2))
        out, expected = compiled(*got, weighting), loss(*want, weighting)
        out.backward()
        expected.backward()
        assert_close_matmul(out, expected, torch.float32)
        for g, w in zip(got, want):
            assert_close_matmul(g.grad, w.grad, torch.float32)


BAD_WEIGHTING = [
    (dict(token_weighting="focal"), ValueError, "token_weighting must be one of 'dft', 'eaft'"),
    (dict(token_weighting="DFT"), ValueError, "token_weighting must be one of"),
    (dict(token_weighting="eaft", eaft_alpha=-0.5), ValueError, "eaft_alpha must be >= 0"),
    (dict(token_weighting="eaft", eaft_alpha=float("nan")), ValueError, "eaft_alpha must be finite"),
]


@pytest.mark.parametrize("bad, error, match", BAD_WEIGHTING, ids=[m for _, _, m in BAD_WEIGHTING])
def test_bad_token_weighting_is_rejected_before_any_work(backend, bad, error, match):
    test_bad_inputs_are_rejected_before_any_work(backend, bad, error, match)
