"""LoRALinear, apply_lora, lora_state_dict, merge_lora and load_peft_adapter."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import device_of
from safetensors.torch import save_file
from torch import nn

import fastforget as ff
from fastforget.testing import assert_close_matmul

D = 16


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)
        return self.o_proj(weights @ v)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.self_attn(self.norm(x))
        return x + self.mlp(x)


class TinyTransformer(nn.Module):
    def __init__(self, d=D, vocab=50, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return TinyTransformer()


TOKENS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
ADAPTED = {f"layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}


def randomize_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ff.LoRALinear):
                module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g))
    return model


def peft_output(module, x):
    """What PEFT's LoRA Linear computes in eval mode: base(x) + lora_B(lora_A(x)) * scaling."""
    base = module.base_layer
    return F.linear(x, base.weight, base.bias) + F.linear(F.linear(x, module.lora_A), module.lora_B) * module.scale


# ---------------------------------------------------------------------------------------------------- LoRALinear


def test_fresh_adapter_keeps_the_base_output(backend):
    torch.manual_seed(0)
    base = nn.Linear(33, 20).to(device_of(backend))
    layer = ff.LoRALinear(base, r=4, alpha=8, dropout=0.1, backend=backend)
    x = torch.randn(2, 5, 33, device=base.weight.device)
    assert torch.equal(layer.lora_B, torch.zeros(20, 4))
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(33)  # kaiming_uniform(a=sqrt(5)): bound 1 / sqrt(fan_in)
    assert layer.lora_A.std() > 0.5 / math.sqrt(3 * 33)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert_close_matmul(layer(x), base(x), torch.float32)


def test_forward_and_gradients_match_the_peft_formula(backend):
    torch.manual_seed(0)
    layer = randomize_adapters(ff.LoRALinear(nn.Linear(24, 18), r=4, alpha=16, backend=backend))
    layer.to(device_of(backend)).eval()
    x = torch.randn(5, 24, device=layer.lora_A.device)
    y = layer(x)
    expected = peft_output(layer, x)
    assert_close_matmul(y, expected, torch.float32)
    grads = torch.autograd.grad(y.square().sum(), [layer.lora_A, layer.lora_B])
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), [layer.lora_A, layer.lora_B])):
        assert_close_matmul(got, want, torch.float32)


def test_scale_and_rslora():
    base = nn.Linear(8, 8)
    assert ff.LoRALinear(base, r=4, alpha=16).scale == 4.0
    assert ff.LoRALinear(nn.Linear(8, 8), r=4, alpha=16, use_rslora=True).scale == 8.0


def test_backend_is_a_settable_attribute():
    torch.manual_seed(0)
    layer = randomize_adapters(ff.LoRALinear(nn.Linear(12, 10), r=2))
    x = torch.randn(4, 12)
    fused = layer(x)
    layer.backend = "reference"
    assert_close_matmul(layer(x), fused, torch.float32)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        layer.backend = "gpu"


def test_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    layer = randomize_adapters(ff.LoRALinear(nn.Linear(12, 10), r=2, dropout=0.5))
    x = torch.randn(4, 12)
    torch.manual_seed(3)
    first = layer(x)
    torch.manual_seed(3)
    assert torch.equal(layer(x), first)  # reproducible under the seed
    layer.eval()
    assert_close_matmul(layer(x), peft_output(layer, x), torch.float32)
    assert not torch.allclose(first, layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_and_unmerge(dtype):
    torch.manual_seed(0)
    layer = randomize_adapters(ff.LoRALinear(nn.Linear(40, 24), r=8, alpha=16)).to(dtype)
    weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 40).to(dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    assert_close_matmul(layer(x), unmerged, dtype)
    expected = weight.double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double()
    assert_close_matmul(layer.base_layer.weight, expected.to(dtype), dtype)  # rounded once
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    merged = layer.base_layer.weight.double()
    layer.unmerge()
    assert not layer.merged
    # two roundings, each within half an ulp of the weight then held: at most eps * (|W| + |W + scale B A|)
    error = (layer.base_layer.weight.double() - weight.double()).abs()
    assert (error <= torch.finfo(dtype).eps * (weight.double().abs() + merged.abs())).all()
    assert_close_matmul(layer(x), unmerged, dtype)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_extra_repr():
    text = repr(ff.LoRALinear(nn.Linear(8, 6), r=2, alpha=4, dropout=0.1, use_rslora=True))
    for part in ("in_features=8", "out_features=6", "r=2", "alpha=4", "scale=2.82843", "dropout=0.1",
                 "use_rslora=True", "merged=False", "backend='auto'", "(base_layer): Linear"):  # fmt: skip
        assert part in text


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(base=nn.Conv1d(3, 3, 1)), TypeError, "LoRALinear adapts an nn.Linear, not a Conv1d"),
        (dict(r=0), ValueError, "r must be an integer >= 1, got 0"),
        (dict(r=-2), ValueError, "r must be an integer >= 1"),
        (dict(r=2.5), ValueError, "r must be an integer >= 1"),
        (dict(dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\), got 1.0"),
        (dict(dropout=-0.5), ValueError, "dropout must be a number"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (dict(backend="fastest"), ValueError, "unknown backend 'fastest'"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        ff.LoRALinear(**{"base": nn.Linear(4, 4), **kwargs})


# ---------------------------------------------------------------------------------------------------- apply_lora


def test_apply_lora_on_a_transformer():
    model = tiny_model()
    expected = model(TOKENS)
    assert ff.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8) is model
    adapted = {name for name, m in model.named_modules() if isinstance(m, ff.LoRALinear)}
    assert adapted == ADAPTED
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name in ADAPTED for p in ("lora_A", "lora_B")}
    assert_close_matmul(model(TOKENS), expected, torch.float32)  # fresh adapters change nothing

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(TOKENS).flatten(0, 1), TOKENS.flatten()).backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    assert not torch.allclose(model(TOKENS), expected)


def test_target_names_match_as_in_peft():
    sequential = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
    ff.apply_lora(sequential, ["0"], r=2)
    assert isinstance(sequential[0], ff.LoRALinear) and isinstance(sequential[2], nn.Linear)
    model = ff.apply_lora(tiny_model(), ["layers.1.self_attn.k_proj", "mlp.0"], r=2)
    adapted = {name for name, m in model.named_modules() if isinstance(m, ff.LoRALinear)}
    assert adapted == {"layers.1.self_attn.k_proj", "layers.0.mlp.0", "layers.1.mlp.0"}
    with pytest.raises(ValueError, match="no submodule of the model matches"):
        ff.apply_lora(tiny_model(), ["proj"])  # a suffix counts only at a dot


def test_apply_lora_with_a_predicate():
    model = ff.apply_lora(tiny_model(), lambda name, m: isinstance(m, nn.Linear) and name.startswith("layers.0"), r=2)
    adapted = {name for name, m in model.named_modules() if isinstance(m, ff.LoRALinear)}
    assert adapted == {f"layers.0.self_attn.{p}_proj" for p in "qkvo"} | {"layers.0.mlp.0", "layers.0.mlp.2"}
    # adapting again: the existing adapters' base layers are not candidates, the adapters themselves are refused
    ff.apply_lora(model, lambda name, m: isinstance(m, nn.Linear) and name == "head", r=2)
    with pytest.raises(ValueError, match="'layers.0.mlp.0' already has a LoRA adapter"):
        ff.apply_lora(model, ["mlp.0"])


@pytest.mark.parametrize(
    "targets, error, message",
    [
        (["self_attn"], TypeError, "'layers.0.self_attn' is a Attention, not an nn.Linear"),
        (["norm"], TypeError, "'layers.0.norm' is a LayerNorm, not an nn.Linear"),
        (["nothing"], ValueError, r"no submodule of the model matches target_modules \['nothing'\]"),
        ("q_proj", TypeError, "not a str"),
    ],
)
def test_apply_lora_errors_leave_the_model_alone(targets, error, message):
    model = tiny_model()
    with pytest.raises(error, match=message):
        ff.apply_lora(model, targets)
    assert not any(isinstance(m, ff.LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_lora_state_dict_round_trip():
    model = randomize_adapters(ff.apply_lora(tiny_model(), r=4))
    state = ff.lora_state_dict(model)
    assert set(state) == {f"{name}.{p}" for name in ADAPTED for p in ("lora_A", "lora_B")}
    fresh = ff.apply_lora(tiny_model(), r=4)
    result = fresh.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert torch.equal(fresh(TOKENS), model(TOKENS))


def test_merge_lora_gives_plain_linear_layers():
    model = randomize_adapters(ff.apply_lora(tiny_model(), r=4)).eval()
    expected = model(TOKENS)
    merged = ff.merge_lora(model)
    assert merged is model and not any(isinstance(m, ff.LoRALinear) for m in model.modules())
    assert type(model.layers[0].self_attn.q_proj) is nn.Linear
    assert_close_matmul(model(TOKENS), expected, torch.float32)
    layer = randomize_adapters(ff.LoRALinear(nn.Linear(6, 5), r=2))
    x = torch.randn(3, 6)
    expected = layer(x)
    plain = ff.merge_lora(layer)
    assert type(plain) is nn.Linear
    assert_close_matmul(plain(x), expected, torch.float32)


# ---------------------------------------------------------------------------------------------------- PEFT adapters


def write_peft_adapter(path, tensors, fmt="safetensors", **config):
    """An adapter directory as PEFT's save_pretrained writes it (keys base_model.model.<module>.lora_X.weight)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "bias": "none",
              "target_modules": ["q_proj", "v_proj"], "use_rslora": False, **config}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    weights = {f"base_model.model.{key}.weight": t.contiguous() for key, t in tensors.items()}
    if fmt == "safetensors":
        save_file(weights, path / "adapter_model.safetensors")
    else:
        torch.save(weights, path / "adapter_model.bin")
    return path


def random_adapter(r=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in sorted(ADAPTED):
        tensors[f"{name}.lora_A"] = torch.randn(r, D, generator=g) / 4
        tensors[f"{name}.lora_B"] = torch.randn(D, r, generator=g) / 4
    return tensors


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_peft_adapter_gives_peft_outputs(tmp_path, fmt):
    tensors = random_adapter()
    path = write_peft_adapter(tmp_path / "adapter", tensors, fmt, alpha_pattern={"layers.1.self_attn.v_proj": 32})
    model = ff.load_peft_adapter(ff.apply_lora(tiny_model(), r=4, alpha=1), path).eval()
    x = torch.randn(5, D)
    for name, module in model.named_modules():
        if isinstance(module, ff.LoRALinear):
            assert torch.equal(module.lora_A, tensors[f"{name}.lora_A"]) and module.dropout == 0.05
            assert module.scale == (32 / 4 if name == "layers.1.self_attn.v_proj" else 8 / 4)
            base = module.base_layer
            peft = F.linear(x, base.weight, base.bias)
            peft = peft + F.linear(F.linear(x, tensors[f"{name}.lora_A"]), tensors[f"{name}.lora_B"]) * module.scale
            assert_close_matmul(module(x), peft, torch.float32)


def test_peft_adapter_round_trip(tmp_path):
    trained = randomize_adapters(ff.apply_lora(tiny_model(), r=4, alpha=8, use_rslora=True)).eval()
    path = write_peft_adapter(tmp_path / "adapter", ff.lora_state_dict(trained), lora_alpha=8, use_rslora=True)
    loaded = ff.load_peft_adapter(ff.apply_lora(tiny_model(), r=4), path).eval()
    assert torch.equal(loaded(TOKENS), trained(TOKENS))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t, c: (dict(t, **{"head.lora_A": torch.zeros(4, D)}), c), "'head', which is not a LoRALinear"),
        (lambda t, c: ({k: v for k, v in t.items() if "layers.1.self_attn.q" not in k}, c), "no weights for layers.1"),
        (lambda t, c: (dict(t, **{"layers.0.self_attn.q_proj.lora_A": torch.zeros(8, D)}), c), r"shape \(8, 16\)"),
        (lambda t, c: (t, dict(c, use_dora=True)), "use_dora=True"),
        (lambda t, c: (t, dict(c, bias="lora_only")), "bias='lora_only'"),
        (lambda t, c: (t, dict(c, peft_type="IA3")), "holds a IA3 adapter"),
    ],
)
def test_bad_peft_adapters_load_nothing(tmp_path, change, message):
    tensors, config = change(random_adapter(), {})
    path = write_peft_adapter(tmp_path / "adapter", tensors, **config)
    model = ff.apply_lora(tiny_model(), r=4)
    before = {k: v.clone() for k, v in ff.lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=message):
        ff.load_peft_adapter(model, path)
    assert all(torch.equal(v, before[k]) for k, v in ff.lora_state_dict(model).items())


def test_unsupported_adapter_key(tmp_path):
    path = write_peft_adapter(tmp_path / "adapter", random_adapter())
    weights = {"base_model.model.head.modules_to_save.weight": torch.zeros(50, D)}
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="unsupported adapter key 'base_model.model.head.modules_to_save.weight'"):
        ff.load_peft_adapter(ff.apply_lora(tiny_model(), r=4), path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        ff.load_peft_adapter(ff.apply_lora(tiny_model(), r=4), path)
