"""fastforget's LoRA against the real peft package on Hugging Face models built from small configs (no download):
LLaMA (GQA, no bias), GPT-2 (Conv1D, bias) and a bitsandbytes-quantized LLaMA."""

import copy
import json
import warnings

import pytest
import torch
from conftest import device_of
from torch import nn

import fastforget as ff
from fastforget.lora import all_linear_names
from fastforget.testing import assert_close_matmul

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
F32 = torch.float32
VOCAB, SEQ = 64, 7


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bnb_llama(quant, seed=0):
    """tiny_llama with every linear layer but the head replaced by a bitsandbytes one holding its weights."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama(seed)
    for name in all_linear_names(model):
        dense = model.get_submodule(name)
        if quant == "int8":
            layer = bnb.nn.Linear8bitLt(dense.in_features, dense.out_features, bias=False, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(dense.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            quant_type, double = quant.split("-") if "-" in quant else (quant, "")
            kwargs = dict(quant_type=quant_type, compress_statistics=double == "dq")
            layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=F32, **kwargs)
            layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, **kwargs)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("cpu"))  # .to quantizes
    return model


TOKENS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))


def peft_twin(base, **config):
    """PEFT's LoRA model on a copy of `base` with random B (PEFT's init leaves it zero) and fastforget's on another
    copy with the same A and B."""
    config = dict(dict(r=4, lora_alpha=8, target_modules="all-linear"), **config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(5)
    ours = ff.apply_lora(
        copy.deepcopy(base), config["target_modules"], r=config["r"], alpha=config["lora_alpha"],
        dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False),
    )  # fmt: skip
    with torch.no_grad():
        for name, module in ff.lora.lora_modules(ours):
            twin = theirs.base_model.model.get_submodule(name)
            twin.lora_B["default"].weight.copy_(torch.randn(twin.lora_B["default"].weight.shape, generator=g) / 4)
            module.lora_A.copy_(twin.lora_A["default"].weight)
            module.lora_B.copy_(twin.lora_B["default"].weight)
    return ours, theirs


def adapter_grads(model):
    """{module name: (dA, dB)} of fastforget's or PEFT's model."""
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, ff.LoRALinear):
            grads[name] = (module.lora_A.grad, module.lora_B.grad)
        elif isinstance(module, peft.tuners.lora.LoraLayer):
            name = name.removeprefix("base_model.model.")
            grads[name] = (module.lora_A["default"].weight.grad, module.lora_B["default"].weight.grad)
    return grads


def run(model, embeds):
    """Logits and the gradients of the adapters and of the input embeddings for one loss."""
    embeds = embeds.clone().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    logits.square().mean().backward()
    return logits, adapter_grads(model), embeds.grad


def assert_same_step(ours, theirs, tolerance_dtype=F32):
    embeds = ours.get_input_embeddings()(TOKENS).detach()
    logits, grads, d_embeds = run(ours, embeds)
    peft_logits, peft_grads, peft_d_embeds = run(theirs, embeds)
    assert_close_matmul(logits, peft_logits, tolerance_dtype)
    assert_close_matmul(d_embeds, peft_d_embeds, tolerance_dtype)
    assert grads.keys() == peft_grads.keys() and grads
    for name, (dA, dB) in grads.items():
        assert_close_matmul(dA, peft_grads[name][0], tolerance_dtype)
        assert_close_matmul(dB, peft_grads[name][1], tolerance_dtype)


def adapted(model):
    return {name for name, _ in ff.lora.lora_modules(model)}


# ---------------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_all_linear_selects_what_peft_selects(make):
    ours, theirs = peft_twin(make())
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if isinstance(m, peft.tuners.lora.LoraLayer)}  # fmt: skip
    assert adapted(ours) == peft_names and "lm_head" not in peft_names
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))  # not a transformers model: the head counts
    assert adapted(ff.apply_lora(plain, "all-linear", r=2)) == {"0", "2"}


# ---------------------------------------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize(
    "make, use_rslora", [(tiny_llama, False), (tiny_gpt2, False), (tiny_gpt2, True)], ids=["llama", "gpt2", "rslora"]
)
def test_logits_and_gradients_equal_peft(make, use_rslora):
    ours, theirs = peft_twin(make(), use_rslora=use_rslora)
    assert_same_step(ours, theirs)


def test_dropout_with_a_fixed_mask_equals_peft():
    """PEFT's nn.Dropout replaced by the mask fastforget draws (torch.rand(shape) >= p, in module order)."""
    p = 0.25
    ours, theirs = peft_twin(tiny_gpt2(), lora_dropout=p)
    ours.train(), theirs.train()
    masks = iter([])

    class FixedDropout(nn.Module):
        def forward(self, x):
            return x * next(masks).view(x.shape) / (1 - p)

    for module in theirs.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.lora_dropout["default"] = FixedDropout()
    embeds = ours.get_input_embeddings()(TOKENS).detach()
    torch.manual_seed(11)
    logits, grads, d_embeds = run(ours, embeds)
    torch.manual_seed(11)  # the same draws, in the same order
    masks = iter([torch.rand(TOKENS.numel(), module.in_features) >= p for _, module in ff.lora.lora_modules(ours)])
    peft_logits, peft_grads, peft_d_embeds = run(theirs, embeds)
    assert_close_matmul(logits, peft_logits, F32)
    assert_close_matmul(d_embeds, peft_d_embeds, F32)
    for name, (dA, dB) in grads.items():
        assert_close_matmul(dA, peft_grads[name][0], F32)
        assert_close_matmul(dB, peft_grads[name][1], F32)


def test_conv1d_reads_the_weight_transposed_without_copying_it():
    model = tiny_gpt2()
    layer = ff.LoRALinear(model.transformer.h[0].attn.c_attn, r=4)
    weight = layer.linear_weight()
    assert layer.fan_in_fan_out and weight.shape == (96, 32) and not weight.is_contiguous()
    assert weight.data_ptr() == layer.base_layer.weight.data_ptr()
    x = torch.randn(3, 32)
    with torch.profiler.profile(record_shapes=True) as prof:
        layer(x).sum().backward()
    copied = [event.input_shapes for event in prof.events() if event.name in ("aten::copy_", "aten::clone")]
    assert copied and not any([96, 32] in shapes or [32, 96] in shapes for shapes in copied), copied


def test_conv1d_on_every_backend(backend):
    """The transposed weight view on each backend of the op, against PEFT's formula in fp64."""
    torch.manual_seed(0)
    conv = transformers.pytorch_utils.Conv1D(24, 20).to(device_of(backend))  # weight (20, 24): in 20, out 24
    layer = ff.LoRALinear(conv, r=4, alpha=8, backend=backend)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 20, device=conv.weight.device, requires_grad=True)
    y = layer(x)
    double = [t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B)]
    base = double[0] @ conv.weight.double() + conv.bias.double()  # Conv1D: x W + b, W stored (in, out)
    expected = base + double[0] @ double[1].T @ double[2].T * layer.scale
    assert_close_matmul(y, expected, F32)
    grads = torch.autograd.grad(y.square().sum(), [x, layer.lora_A, layer.lora_B])
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), double)):
        assert_close_matmul(got, want, F32)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_and_unmerge_equal_peft(make):
    ours, theirs = peft_twin(make())
    embeds = ours.get_input_embeddings()(TOKENS).detach()
    base = copy.deepcopy(ours)
    for _, module in ff.lora.lora_modules(ours):
        module.merge()
    theirs.merge_adapter()
    with torch.no_grad():
        assert_close_matmul(ours(inputs_embeds=embeds).logits, theirs(inputs_embeds=embeds).logits, F32)
        for name, module in ff.lora.lora_modules(ours):
            twin = theirs.base_model.model.get_submodule(name).base_layer
            assert_close_matmul(module.base_layer.weight, twin.weight, F32)
        for _, module in ff.lora.lora_modules(ours):
            module.unmerge()
        for (_, module), (_, original) in zip(ff.lora.lora_modules(ours), ff.lora.lora_modules(base)):
            assert_close_matmul(module.base_layer.weight, original.base_layer.weight, F32)


# ---------------------------------------------------------------------------------------------------- lora_disabled


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lora_disabled_gives_the_base_model(make):
    base = make()
    ours, theirs = peft_twin(base)
    with torch.no_grad():
        expected = base(TOKENS).logits
        adapted_logits = ours(TOKENS).logits
        with ff.lora_disabled(ours) as model:
            assert model is ours
            assert torch.equal(ours(TOKENS).logits, expected)
            with theirs.disable_adapter():
                assert torch.equal(theirs(TOKENS).logits, expected)
        assert torch.equal(ours(TOKENS).logits, adapted_logits)  # back on, adapters untouched
    embeds = ours.get_input_embeddings()(TOKENS).detach().requires_grad_()
    with ff.lora_disabled(ours):  # no gradient reaches the adapters
        ours(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None
    assert all(g is None for pair in adapter_grads(ours).values() for g in pair)


def test_lora_disabled_errors_change_nothing():
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        with ff.lora_disabled(tiny_llama()):
            pass
    ours, _ = peft_twin(tiny_llama())
    layer = ours.model.layers[1].mlp.down_proj
    layer.merge()
    with pytest.raises(ValueError, match="'model.layers.1.mlp.down_proj' is merged into its base weight; unmerge"):
        with ff.lora_disabled(ours):
            pass
    assert not any(m.disabled for _, m in ff.lora.lora_modules(ours))
    layer.unmerge()
    with ff.lora_disabled(ours), pytest.raises(RuntimeError, match="disabled"):
        layer.merge()
    with ff.lora_disabled(ours), pytest.raises(RuntimeError, match="merge_lora: the adapters are disabled"):
        ff.merge_lora(ours)
    assert not any(m.merged for _, m in ff.lora.lora_modules(ours))


# ---------------------------------------------------------------------------------------------------- adapter files


def no_warnings(fn, *args, **kwargs):
    """fn's result, asserting that it warned of nothing but deprecations (transformers 5 deprecates an attribute
    that peft 0.21 reads)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    unexpected = [w for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not unexpected, [str(w.message) for w in unexpected]
    return result


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_loads_in_peft_with_identical_logits(make, tmp_path):
    base = make()
    ours, _ = peft_twin(base, use_rslora=True, lora_dropout=0.1)
    ff.lora.lora_modules(ours)[0][1].alpha = 3  # an alpha_pattern entry
    path = ff.save_peft_adapter(ours, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["use_rslora"] and config["lora_dropout"] == 0.1
    assert config["fan_in_fan_out"] == (make is tiny_gpt2) and len(config["alpha_pattern"]) == 1
    theirs = no_warnings(peft.PeftModel.from_pretrained, copy.deepcopy(base), path)
    with torch.no_grad():
        ours.eval(), theirs.eval()
        assert torch.equal(theirs(TOKENS).logits, theirs(TOKENS).logits)
        assert_close_matmul(ours(TOKENS).logits, theirs(TOKENS).logits, F32)
        loaded = ff.load_peft_adapter(ff.apply_lora(copy.deepcopy(base), "all-linear", r=4), path)
        assert torch.equal(loaded(TOKENS).logits, ours(TOKENS).logits)  # bitwise


def test_rank_pattern_round_trip(tmp_path):
    base = tiny_llama()
    ours = ff.apply_lora(copy.deepcopy(base), ["q_proj", "v_proj"], r=4, alpha=8)
    ff.apply_lora(ours, ["o_proj"], r=2, alpha=8)
    for _, module in ff.lora.lora_modules(ours):
        nn.init.normal_(module.lora_B)
    path = ff.save_peft_adapter(ours, tmp_path / "adapter")
    assert json.loads((path / "adapter_config.json").read_text())["rank_pattern"] == {
        rf"model\.layers\.{i}\.self_attn\.o_proj": 2 for i in range(2)
    }
    theirs = no_warnings(peft.PeftModel.from_pretrained, copy.deepcopy(base), path)
    with torch.no_grad():
        assert_close_matmul(ours(TOKENS).logits, theirs(TOKENS).logits, F32)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, lambda: tiny_bnb_llama("nf4")], ids=["llama", "gpt2", "nf4"])
def test_peft_save_pretrained_loads_into_fastforget(make, tmp_path):
    base = make()
    ours, theirs = peft_twin(base, lora_alpha=12)
    theirs.save_pretrained(tmp_path / "peft")
    fresh = ff.apply_lora(copy.deepcopy(base), "all-linear", r=4)
    loaded = ff.load_peft_adapter(fresh, tmp_path / "peft")
    with torch.no_grad():
        assert_close_matmul(loaded(TOKENS).logits, theirs(TOKENS).logits, F32)
        assert torch.equal(loaded(TOKENS).logits, ours(TOKENS).logits)


def test_bad_saves_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="has no LoRA adapter"):
        ff.save_peft_adapter(tiny_llama(), tmp_path / "none")
    assert not (tmp_path / "none").exists()
    ours, _ = peft_twin(tiny_llama())
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        ff.save_peft_adapter(ours, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    ours.model.layers[0].mlp.up_proj.dropout = 0.5
    with pytest.raises(ValueError, match="differ in dropout"):
        ff.save_peft_adapter(ours, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()


# ---------------------------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("quant", ["nf4", "fp4-dq", "int8"])  # nf4 and fp4, without and with double quantization
def test_quantized_llama_equals_peft(quant):
    ours, theirs = peft_twin(tiny_bnb_llama(quant))
    assert all(module.quantized for _, module in ff.lora.lora_modules(ours))
    assert_same_step(ours, theirs)


def test_quantized_dropout_and_merge_refused():
    ours, theirs = peft_twin(tiny_bnb_llama("nf4"), lora_dropout=0.2)
    ours.train()
    torch.manual_seed(3)
    first = ours(TOKENS).logits
    torch.manual_seed(3)
    assert torch.equal(ours(TOKENS).logits, first)
    layer = ours.model.layers[0].self_attn.q_proj
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="cannot merge a LoRA adapter into a quantized Linear4bit: dequantize"):
        layer.merge()
    with pytest.raises(RuntimeError, match="quantized base layer"):
        ff.merge_lora(ours)
    assert not layer.merged and torch.equal(layer.base_layer.weight, weight)


def test_dequantized_linear_merges():
    model = tiny_bnb_llama("nf4")
    quantized = model.model.layers[0].self_attn.q_proj
    dense = ff.lora_quantized.dequantized_linear(quantized)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert_close_matmul(dense(x), quantized(x), F32)


def test_unsupported_quantized_and_no_linear_layers():
    class Int8Linear(nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    model = nn.Sequential(Int8Linear(), nn.ReLU())
    with pytest.raises(TypeError, match="'0': Int8Linear .* quantized linear layer that fastforget's LoRA does not"):
        ff.apply_lora(model, "all-linear")
    assert isinstance(model[0], Int8Linear) and model[0].bias.requires_grad  # untouched
    no_linear = nn.Sequential(nn.ReLU(), nn.LayerNorm(3))
    state = {k: v.clone() for k, v in no_linear.state_dict().items()}
    with pytest.raises(ValueError, match="'all-linear' found no linear layer"):
        ff.apply_lora(no_linear, "all-linear")
    assert all(p.requires_grad for p in no_linear.parameters())  # untouched: nothing frozen
    assert all(torch.equal(v, state[k]) for k, v in no_linear.state_dict().items())
    with pytest.raises(TypeError, match="not a str"):
        ff.apply_lora(tiny_llama(), "q_proj")


def test_fastforget_imports_none_of_the_hugging_face_stack():
    import subprocess
    import sys

    code = "import sys, fastforget; print(sorted({'transformers', 'peft', 'bitsandbytes'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
