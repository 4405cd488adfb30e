"""ff.EWC(fisher_bits=8): the Fisher stored block-wise quantized (checked against bitsandbytes' own quantize /
dequantize on the same tensors), the penalty paths against fp64 formulas on the dequantized Fisher, consolidation,
state dicts both ways with the 32-bit EWC, bad input."""

import io

import pytest
import torch
from conftest import FUSED_BACKENDS
from torch import nn

import fastforget as ff
from fastforget.testing import assert_close

bnb_functional = pytest.importorskip("bitsandbytes.functional")

BLOCK = 256


def model(dtype=torch.float32, seed=0):
    """Odd sizes: 37 x 300 = 11,100 weights (a partial last block), a 300 bias, a 3 x 300 head, a 3 bias."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(37, 300), nn.Linear(300, 3)).to(dtype)


def task(m, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = [p.detach().float() + 0.01 * torch.randn(p.shape, generator=g) for p in m.parameters()]
    fisher = [torch.rand(p.shape, generator=g) ** 3 * 10 for p in m.parameters()]  # a Fisher's long tail
    return anchors, fisher


def bnb_quantize(x):
    """bitsandbytes' quantize_blockwise kernel of its default backend (the rule of its CUDA kernel; its CPU kernel
    rounds values below ~1.5e-5 of a block's absmax through a coarse table, see fastforget/quantize.py)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = bnb_functional.create_dynamic_map(signed=False)
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        keys, x.float().contiguous(), code, BLOCK
    )
    return codes.reshape(x.shape), absmax


def bnb_dequantize(codes, absmax):
    code = bnb_functional.create_dynamic_map(signed=False)
    return bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK).reshape(codes.shape)


def close_codes(actual, expected, most=4):
    """Codes equal but for at most `most` exact rounding ties (off by one)."""
    diff = (actual.int() - expected.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= most


def shifted(m, scale=0.02, seed=5):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn_like(p))


def penalty_fp64(m, anchors, fisher, lam, constant=0.0):
    total = sum(
        (f.double() * (p.detach().double() - a.double()).square()).sum()
        for p, a, f in zip(m.parameters(), anchors, fisher)
    )
    return lam * (total + constant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_bitsandbytes_blockwise_codes_and_a_bf16_anchor(dtype):
    m = model(dtype)
    ewc = ff.EWC(m, lam=1.0, fisher_bits=8)
    anchors, fisher = task(m, 1)
    ewc.load_importance(anchors, fisher)
    assert ewc.state_dtype == torch.bfloat16
    for p, f, codes, absmax in zip(m.parameters(), fisher, ewc.fisher, ewc.fisher_absmax):
        assert codes.dtype == torch.uint8 and codes.shape == p.shape
        assert absmax.dtype == torch.float32 and absmax.shape == (-(-p.numel() // BLOCK),)
        expected_codes, expected_absmax = bnb_quantize(f)
        close_codes(codes, expected_codes)
        torch.testing.assert_close(absmax, expected_absmax, rtol=0, atol=0)
    for i, a in enumerate(anchors):
        assert ewc.anchors[i].dtype == torch.bfloat16
        torch.testing.assert_close(ewc.anchors[i], a.to(torch.bfloat16), rtol=0, atol=0)
        torch.testing.assert_close(
            ewc.fisher_tensor(i), bnb_dequantize(ewc.fisher[i], ewc.fisher_absmax[i]), rtol=0, atol=0
        )


def test_explicit_state_dtype_sets_the_anchor():
    m = model()
    ewc = ff.EWC(m, fisher_bits=8, state_dtype=torch.float32)
    ewc.load_importance(*task(m, 1))
    assert all(a.dtype == torch.float32 for a in ewc.anchors)
    assert all(f.dtype == torch.uint8 for f in ewc.fisher)
    assert ff.EWC(m).state_dtype == torch.float32  # the 32-bit default is unchanged


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_penalty_and_apply_match_the_dequantized_fisher(backend, dtype):
    m = model(dtype)
    ewc = ff.EWC(m, lam=3.0, fisher_bits=8, backend=backend)
    ewc.load_importance(*task(m, 1))
    shifted(m)
    fisher = ewc.fisher_tensors()
    expected = penalty_fp64(m, ewc.anchors, fisher, 3.0)
    expected_grads = [
        (6.0 * f.double() * (p.detach().double() - a.double())) for p, a, f in zip(m.parameters(), ewc.anchors, fisher)
    ]
    value = ewc.penalty()
    assert value.dtype == torch.float32
    value.backward()
    assert_close(value.double(), expected, torch.float32)
    for p, g in zip(m.parameters(), expected_grads):
        assert p.grad.dtype == dtype
        assert_close(p.grad.double(), g, dtype)
    m.zero_grad(set_to_none=True)
    assert_close(ewc.apply_().double(), expected, torch.float32)
    for p, g in zip(m.parameters(), expected_grads):
        assert_close(p.grad.double(), g, dtype)


def test_penalty_autograd_keeps_no_dequantized_fisher():
    m = model()
    ewc = ff.EWC(m, lam=1.0, fisher_bits=8)
    ewc.load_importance(*task(m, 1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = ewc.penalty()
    params = {p.data_ptr() for p in m.parameters()}
    assert saved and all(t.data_ptr() in params for t in saved)  # the parameters themselves, nothing else
    value.backward()


def test_penalty_is_close_to_the_fp32_state():
    """The error the 8-bit Fisher and bf16 anchor add, on this toy: well under 1 % of the penalty."""
    m = model()
    exact, small = ff.EWC(m, lam=1.0), ff.EWC(m, lam=1.0, fisher_bits=8)
    anchors, fisher = task(m, 1)
    exact.load_importance(anchors, fisher)
    small.load_importance(anchors, fisher)
    shifted(m)
    assert abs(float(small.penalty().detach()) / float(exact.penalty().detach()) - 1) < 1e-2


def test_online_consolidation_requantizes_the_decayed_sum():
    m = model()
    ewc = ff.EWC(m, lam=1.0, mode="online", decay=0.5, fisher_bits=8)
    (a1, f1), (a2, f2) = task(m, 1), task(m, 2)
    ewc.load_importance(a1, f1)
    first = [(c.clone(), s.clone()) for c, s in zip(ewc.fisher, ewc.fisher_absmax)]
    ewc.load_importance(a2, f2)
    for (c, s), f, codes, absmax, anchor, a in zip(first, f2, ewc.fisher, ewc.fisher_absmax, ewc.anchors, a2):
        expected_codes, expected_absmax = bnb_quantize(0.5 * bnb_dequantize(c, s) + f)
        close_codes(codes, expected_codes)
        torch.testing.assert_close(absmax, expected_absmax)
        torch.testing.assert_close(anchor, a.to(torch.bfloat16), rtol=0, atol=0)


def test_separate_mode_keeps_the_per_task_sum():
    m = model()
    ewc = ff.EWC(m, lam=2.0, mode="separate", fisher_bits=8, state_dtype=torch.float32)
    tasks = [task(m, 1), task(m, 2), task(m, 3)]
    for anchors, fisher in tasks:
        ewc.load_importance(anchors, fisher)
    shifted(m, scale=0.05)
    expected = sum(penalty_fp64(m, a, f, 2.0) for a, f in tasks)
    assert ewc.constant > 0
    assert abs(float(ewc.penalty().detach()) / float(expected) - 1) < 2e-2  # the quantization of each merged Fisher


def test_state_dict_round_trips_and_converts_between_bit_widths():
    m = model()
    small = ff.EWC(m, lam=1.0, fisher_bits=8)
    small.load_importance(*task(m, 1))
    shifted(m)
    buffer = io.BytesIO()
    torch.save(small.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert set(state) == {"mode", "tasks", "constant", "names", "anchors", "fisher", "fisher_absmax"}

    again = ff.EWC(m, lam=1.0, fisher_bits=8)
    again.load_state_dict(state)
    for mine, theirs in ((again.fisher, small.fisher), (again.fisher_absmax, small.fisher_absmax)):
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs))
    assert float(again.penalty()) == float(small.penalty())

    wide = ff.EWC(m, lam=1.0)  # 8-bit into 32-bit: dequantized
    wide.load_state_dict(state)
    assert all(f.dtype == torch.float32 for f in wide.fisher)
    for f, g in zip(wide.fisher, small.fisher_tensors()):
        torch.testing.assert_close(f, g, rtol=0, atol=0)

    narrow = ff.EWC(m, lam=1.0, fisher_bits=8)  # 32-bit into 8-bit: quantized
    narrow.load_state_dict(wide.state_dict())
    for codes, absmax, f in zip(narrow.fisher, narrow.fisher_absmax, wide.fisher):
        expected_codes, expected_absmax = bnb_quantize(f)
        close_codes(codes, expected_codes)
        torch.testing.assert_close(absmax, expected_absmax)


def test_template_before_the_first_task_loads():
    m = model()
    template = ff.EWC(m, fisher_bits=8).state_dict()
    assert all(f.dtype == torch.uint8 for f in template["fisher"])
    assert [t.shape[0] for t in template["fisher_absmax"]] == [-(-p.numel() // BLOCK) for p in m.parameters()]
    ewc = ff.EWC(m, fisher_bits=8)
    ewc.load_state_dict(template)
    assert ewc.tasks == 0 and float(ewc.penalty()) == 0.0


def corrupt(state, key, i, value):
    state = {**state, key: list(state[key])}
    state[key][i] = value
    return state


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda s: {k: v for k, v in s.items() if k != "fisher_absmax"}, ValueError, "fisher_absmax tensors"),
        (lambda s: corrupt(s, "fisher_absmax", 0, torch.zeros(3)), ValueError, "fisher_absmax of '0.weight'"),
        (lambda s: corrupt(s, "fisher_absmax", 1, s["fisher_absmax"][1].double()), ValueError, "float32 of shape"),
        (lambda s: corrupt(s, "fisher_absmax", 2, -s["fisher_absmax"][2]), ValueError, "not finite and >= 0"),
        (lambda s: corrupt(s, "fisher_absmax", 3, s["fisher_absmax"][3] * float("nan")), ValueError, "not finite"),
        (lambda s: corrupt(s, "fisher", 0, s["fisher"][0][:5]), ValueError, "shape"),
        (lambda s: corrupt(s, "fisher", 1, s["fisher"][1].to(torch.int32)), TypeError, "fisher of '0.bias'"),
    ],
)
def test_bad_state_changes_nothing(change, error, message):
    m = model()
    ewc = ff.EWC(m, lam=1.0, fisher_bits=8)
    ewc.load_importance(*task(m, 1))
    state = ewc.state_dict()
    other = ff.EWC(m, lam=1.0, fisher_bits=8)
    other.load_importance(*task(m, 7))
    before = [t.clone() for t in (*other.fisher, *other.fisher_absmax, *other.anchors)]
    with pytest.raises(error, match=message):
        other.load_state_dict(change(state))
    after = (*other.fisher, *other.fisher_absmax, *other.anchors)
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize("bits", [4, 16, 8.0, "8", True])
def test_fisher_bits_other_than_8_or_32_is_refused(bits):
    with pytest.raises(ValueError, match="fisher_bits must be one of 32, 8"):
        ff.EWC(model(), fisher_bits=bits)


def test_fisher_merge_uses_the_dequantized_fisher():
    """ff.fisher_merge with 8-bit EWC sources equals the merge with their Fisher dequantized by bitsandbytes."""
    sources, dicts = [], []
    for seed in (1, 2):
        m = model(seed=seed)
        ewc = ff.EWC(m, lam=1.0, fisher_bits=8, state_dtype=torch.float32)
        ewc.load_importance([p.detach() for p in m.parameters()], task(m, seed)[1])
        sources.append(ewc)
        fisher = [bnb_dequantize(c, s) for c, s in zip(ewc.fisher, ewc.fisher_absmax)]
        dicts.append(dict(zip(ewc.names, fisher)))
    merged, expected = model(seed=3), model(seed=3)
    ff.merge.fisher_merge(merged, sources)
    ff.merge.fisher_merge(expected, [dict(zip(e.names, e.anchors)) for e in sources], fishers=dicts)
    for p, q in zip(merged.parameters(), expected.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_protection_arguments_expose_fisher_bits():
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(ff.ProtectionArguments)
    (args,) = parser.parse_args_into_dataclasses(["--ewc_lambda", "5", "--ewc_fisher_bits", "8"])
    ewc = args.build(model())["ewc"]
    assert (ewc.fisher_bits, ewc.state_dtype) == (8, torch.bfloat16)
    (args,) = parser.parse_args_into_dataclasses(["--ewc_lambda", "5"])
    ewc = args.build(model())["ewc"]
    assert (ewc.fisher_bits, ewc.state_dtype) == (32, torch.float32)
    with pytest.raises(ValueError, match="ewc_fisher_bits must be one of 32, 8"):
        ff.ProtectionArguments(ewc_lambda=1.0, ewc_fisher_bits=4)
