"""ff.optim.ProtectedAdamW(state_bits=8): bitsandbytes' AdamW8bit state layout and its min_8bit_size rule, the
steps against real bitsandbytes (CPU) and against the 32-bit optimizer with its moments round-tripped through the
quantization, defences attached (EWC with an 8-bit Fisher, protection, SI), MoFO against its formula on the
dequantized moments, state dicts both ways with bitsandbytes, bad input, and the per-parameter memory budget that
docs/optim.md states."""

import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_protected_adamw8bit_step import bnb_nearest_quantizer
from torch import nn

import fastforget as ff
from fastforget.testing import assert_close

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

BLOCK = 256
HP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)


def make_model(dtype=torch.float32, seed=0):
    """48 x 100 = 4,800 weights (8-bit: 19 blocks, the last partial), a bias of 100 and a 3 x 100 head (fp32)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 100), nn.Tanh(), nn.Linear(100, 3)).to(dtype)


def set_grads(model, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 48, generator=g), torch.randint(0, 3, (16,), generator=g)
    model.zero_grad()
    F.cross_entropy(model(x.to(next(model.parameters()).dtype)).float(), y).backward()


def quantize(x, signed):
    """bitsandbytes' quantize_blockwise kernel of its default backend (the rule of its CUDA kernel; its CPU kernel
    rounds values below ~1.5e-5 of a block's absmax through a coarse table, see fastforget/quantize.py)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    code = bnb_functional.create_dynamic_map(signed=signed)
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
        keys, x.float().contiguous(), code, BLOCK
    )
    return codes.reshape(x.shape), absmax


def dequantize(codes, absmax, signed):
    code = bnb_functional.create_dynamic_map(signed=signed)
    return bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=BLOCK).reshape(codes.shape)


def close_codes(actual, expected, most=8):
    """Codes equal but for at most `most` rounding ties (off by one)."""
    diff = (actual.int() - expected.int()).abs()
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= most, (int(diff.max()), int((diff > 0).sum()))


def run_steps(model, opt, steps):
    for step in steps:
        set_grads(model, step)
        opt.step()


def assert_same_run(a, b, opt_a, opt_b, atol=1e-6):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    for p, q in zip(a.parameters(), b.parameters()):
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert int(sa["step"]) == int(sb["step"])
        for key in ("state1", "state2"):
            if sa[key].dtype == torch.uint8:
                close_codes(sa[key], sb[key])
            else:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-8)
        if "absmax1" in sa:
            for key in ("absmax1", "absmax2"):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_layout_is_bitsandbytes(dtype):
    model = make_model(dtype)
    opt = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, **HP)
    run_steps(model, opt, [0])
    weight, bias, head, head_bias = model.parameters()
    state = opt.state[weight]
    assert set(state) == {"step", "state1", "state2", "qmap1", "qmap2", "absmax1", "absmax2"}
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8 and state["state1"].shape == weight.shape
    assert state["absmax1"].dtype == torch.float32 and state["absmax1"].shape == (19,)
    torch.testing.assert_close(state["qmap1"], bnb_functional.create_dynamic_map(signed=True), rtol=0, atol=0)
    torch.testing.assert_close(state["qmap2"], bnb_functional.create_dynamic_map(signed=False), rtol=0, atol=0)
    for p in (bias, head, head_bias):  # below min_8bit_size (4,096): fp32 moments, bitsandbytes' keys
        assert set(opt.state[p]) == {"step", "state1", "state2"}
        assert opt.state[p]["state1"].dtype == torch.float32 and opt.state[p]["state1"].shape == p.shape
    assert int(state["step"]) == 1

    everything = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, min_8bit_size=0, **HP)
    run_steps(model, everything, [1])
    assert all(everything.state[p]["state1"].dtype == torch.uint8 for p in model.parameters())


def test_plain_steps_match_bitsandbytes_adamw8bit():
    """No defences: bitsandbytes' AdamW8bit (its CPU ops, with its nearest-code quantizer: the rule of its CUDA
    kernel and ours; its stock CPU quantizer's coarse table is covered in test_protected_adamw8bit_step.py)."""
    a, b = make_model(), make_model()
    ours = ff.optim.ProtectedAdamW(a.parameters(), state_bits=8, **HP)
    theirs = bnb.optim.AdamW8bit(b.parameters(), **HP)
    with bnb_nearest_quantizer():
        for step in range(6):
            set_grads(a, step)
            set_grads(b, step)
            ours.step()
            theirs.step()
    assert_same_run(a, b, ours, theirs)


# --------------------------------------------------------------------------------- the step with the defences


def eight_bit_ewc(model):
    ewc = ff.EWC(model, lam=50.0, fisher_bits=8)
    g = torch.Generator().manual_seed(3)
    ewc.load_importance(
        [p.detach().float() + 0.05 * torch.randn(p.shape, generator=g) for p in model.parameters()],
        [torch.rand(p.shape, generator=g) for p in model.parameters()],
    )
    return ewc


@pytest.mark.parametrize("protect", ["tensor", "element"])
def test_step_with_defences_equals_the_32bit_step_on_round_tripped_moments(protect):
    """state_bits=8 with an 8-bit-Fisher EWC, protection and SI == the 32-bit optimizer with the same (dequantized)
    Fisher whose 8-bit-sized moments are quantized and dequantized after every step (the param update reads the
    new moments before they are quantized, as bitsandbytes' does)."""
    a, b = make_model(), make_model()
    ewc_a = eight_bit_ewc(a)
    ewc_b = ff.EWC(b, lam=50.0)
    ewc_b.load_importance([t.float() for t in ewc_a.anchors], ewc_a.fisher_tensors())
    parts = [
        dict(
            ewc=e,
            protector=ff.GradientProtector(m, window=3, threshold=0.5, mode=protect),
            si=ff.SynapticIntelligence(m),
        )
        for e, m in ((ewc_a, a), (ewc_b, b))
    ]
    opt_a = ff.optim.ProtectedAdamW(a.parameters(), state_bits=8, **HP, **parts[0])
    opt_b = ff.optim.ProtectedAdamW(b.parameters(), state_bits=32, **HP, **parts[1])
    for step in range(5):
        set_grads(a, step)
        set_grads(b, step)
        opt_a.found_inf = torch.tensor(float(step == 2))  # a GradScaler's skipped step: nothing changes
        before = [t.clone() for p in a.parameters() for t in (p, *opt_a.state[p].values())]
        opt_a.step()
        del opt_a.found_inf
        if step == 2:
            after = [t for p in a.parameters() for t in (p, *opt_a.state[p].values())]
            assert all(torch.equal(x, y) for x, y in zip(before, after))
            continue
        opt_b.step()
        for p in b.parameters():
            if p.numel() >= 4096:
                state = opt_b.state[p]
                state["exp_avg"].copy_(dequantize(*quantize(state["exp_avg"], True), True))
                state["exp_avg_sq"].copy_(dequantize(*quantize(state["exp_avg_sq"], False), False))
        assert_close(opt_a.penalty, opt_b.penalty, torch.float32)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        state_a, state_b = opt_a.state[p], opt_b.state[q]
        if state_a["state1"].dtype == torch.uint8:
            close_codes(state_a["state1"], quantize(state_b["exp_avg"], True)[0])
            close_codes(state_a["state2"], quantize(state_b["exp_avg_sq"], False)[0])
        else:
            torch.testing.assert_close(state_a["state1"], state_b["exp_avg"], rtol=1e-5, atol=1e-7)
    for x, y in zip(parts[0]["si"].omega, parts[1]["si"].omega):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-7)


def test_mofo_selects_on_the_dequantized_moments():
    """MoFO (fraction 0.1): per filtered tensor, the update of the top-k |exp_avg| elements as they are stored
    (dequantized), the decay on every element; the formula written out here."""
    model = make_model()
    opt = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, mofo_fraction=0.1, **HP)
    run_steps(model, opt, [0, 1])
    weight = next(model.parameters())
    state = opt.state[weight]
    old, step = weight.detach().clone(), int(state["step"]) + 1
    m1_old = dequantize(state["state1"], state["absmax1"], True)
    m2_old = dequantize(state["state2"], state["absmax2"], False)
    set_grads(model, 2)
    g = weight.grad.clone()
    opt.step()
    (beta1, beta2), lr, wd, eps = HP["betas"], HP["lr"], HP["weight_decay"], HP["eps"]
    m1 = dequantize(*quantize(beta1 * m1_old + (1 - beta1) * g, True), True)
    m2 = dequantize(*quantize(beta2 * m2_old + (1 - beta2) * g * g, False), False)
    k = int(weight.numel() * 0.1)
    mask = m1.abs() >= m1.abs().flatten().kthvalue(weight.numel() - k + 1).values
    assert int(mask.sum()) == k  # no ties at the threshold in this draw
    denominator = m2.sqrt() / (1 - beta2**step) ** 0.5 + eps
    expected = old * (1 - lr * wd) - lr / (1 - beta1**step) * torch.where(mask, m1, 0) / denominator
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-5, atol=1e-7)
    close_codes(state["state1"], quantize(beta1 * m1_old + (1 - beta1) * g, True)[0])


# -------------------------------------------------------------------------------------------------- state dicts


OPTIMIZERS = {
    "ours": lambda m: ff.optim.ProtectedAdamW(m.parameters(), state_bits=8, **HP),
    "bitsandbytes": lambda m: bnb.optim.AdamW8bit(m.parameters(), **HP),
}


@pytest.mark.parametrize("direction", ["bitsandbytes into ours", "ours into bitsandbytes"])
def test_state_dicts_go_both_ways_with_bitsandbytes(direction):
    """Train 3 steps with one, load its model and optimizer state into the other, continue both 3 steps alike
    (bitsandbytes with its nearest-code quantizer, as above)."""
    first, second = make_model(), make_model()
    source, target = direction.split(" into ")
    opt = OPTIMIZERS[source](first)
    with bnb_nearest_quantizer():
        run_steps(first, opt, range(3))
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)  # as a checkpoint holds it
        second.load_state_dict(first.state_dict())
        loaded = OPTIMIZERS[target](second)
        loaded.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
        run_steps(first, opt, range(3, 6))
        run_steps(second, loaded, range(3, 6))
    assert_same_run(first, second, opt, loaded)


@pytest.mark.parametrize("direction", ["bitsandbytes into ours", "ours into bitsandbytes"])
def test_stock_bitsandbytes_state_dicts_carry_over_exactly(direction):
    """Stock bitsandbytes (its CPU quantizer): a loaded state holds exactly the saved tensors and step, and saves
    them back unchanged."""
    model = make_model()
    source, target = direction.split(" into ")
    opt = OPTIMIZERS[source](model)
    run_steps(model, opt, range(2))
    saved = opt.state_dict()
    loaded = OPTIMIZERS[target](model)
    loaded.load_state_dict(saved)
    again = loaded.state_dict()
    for i, p in enumerate(model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(loaded.state[p][key]).float(), torch.as_tensor(value).float()), key
        theirs, ours = saved["state"][i], again["state"][i]
        assert theirs["step"] == ours["step"] == 2
        wrapped = "__bnb_optimizer_quant_state__"
        assert set(theirs[wrapped]) == set(ours[wrapped])
        assert all(torch.equal(theirs[wrapped][k], ours[wrapped][k]) for k in theirs[wrapped])


def test_own_round_trip_continues_bitwise():
    a, b = make_model(), make_model()
    opt = ff.optim.ProtectedAdamW(a.parameters(), state_bits=8, **HP)
    run_steps(a, opt, range(3))
    state = opt.state_dict()
    assert all(isinstance(entry["step"], int) for entry in state["state"].values())
    b.load_state_dict(a.state_dict())
    again = ff.optim.ProtectedAdamW(b.parameters(), state_bits=8, **HP)
    again.load_state_dict(state)
    run_steps(a, opt, range(3, 5))
    run_steps(b, again, range(3, 5))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(again.state[q][key])), key


@pytest.mark.parametrize("source", ["torch", "ours 32", "bitsandbytes 32"])
def test_float_states_load_quantized_and_back(source):
    """A 32-bit state (torch's AdamW, ours, bitsandbytes' 32-bit AdamW) loads into state_bits=8 quantized; that
    state loads into state_bits=32 dequantized."""
    model = make_model()
    opt = {
        "torch": lambda: torch.optim.AdamW(model.parameters(), **HP),
        "ours 32": lambda: ff.optim.ProtectedAdamW(model.parameters(), **HP),
        "bitsandbytes 32": lambda: bnb.optim.AdamW(model.parameters(), **HP),
    }[source]()
    run_steps(model, opt, range(2))
    moments = {}
    for p in model.parameters():
        state = opt.state[p]
        moments[p] = (state.get("exp_avg", state.get("state1")), state.get("exp_avg_sq", state.get("state2")))
    eight = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, **HP)
    eight.load_state_dict(opt.state_dict())
    for p, (m1, m2) in moments.items():
        state = eight.state[p]
        assert int(state["step"]) == 2
        if p.numel() >= 4096:
            close_codes(state["state1"], quantize(m1, True)[0])
            torch.testing.assert_close(state["absmax2"], quantize(m2, False)[1])
        else:
            assert torch.equal(state["state1"], m1) and torch.equal(state["state2"], m2)
    wide = ff.optim.ProtectedAdamW(model.parameters(), **HP)
    wide.load_state_dict(eight.state_dict())
    for p in model.parameters():
        expected = eight.state[p]["state1"]
        if expected.dtype == torch.uint8:
            expected = dequantize(expected, eight.state[p]["absmax1"], True)
        assert torch.equal(wide.state[p]["exp_avg"], expected)


def bnb_state(model=None):
    """bitsandbytes' AdamW8bit state after two steps on random gradients."""
    model = model or make_model()
    opt = bnb.optim.AdamW8bit(model.parameters(), **HP)
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        opt.step()
    return opt.state_dict()


def edit(state, change):
    state = {**state, "state": {i: dict(entry) for i, entry in state["state"].items()}}
    for entry in state["state"].values():
        entry["__bnb_optimizer_quant_state__"] = dict(entry["__bnb_optimizer_quant_state__"])
    change(state["state"][0]["__bnb_optimizer_quant_state__"], state["state"][0])
    return state


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda q, e: q.update(state1=q["state1"][:, :25]), ValueError, r"state1 of param 0 .* shape \(100, 25\)"),
        (lambda q, e: q.update(absmax1=q["absmax1"][:-1]), ValueError, r"absmax1 of param 0 .* shape \(19,\)"),
        (lambda q, e: q.update(absmax2=-q["absmax2"]), ValueError, "absmax2 of param 0 in the state is not finite"),
        (lambda q, e: q.update(state1=q["state1"].to(torch.int8)), ValueError, "8 bits .* or 32 bits"),
        (lambda q, e: q.update(state1=q["state1"].half(), state2=q["state2"].half()), ValueError, "8 bits"),
        (lambda q, e: q.update(qmap1=q["qmap2"]), ValueError, "qmap1 of param 0 .* signed dynamic map"),
        (lambda q, e: q.pop("state2"), ValueError, "not AdamW's"),
        (lambda q, e: e.update(step=float("nan")), ValueError, "step of param 0"),
    ],
)
def test_bad_bitsandbytes_state_changes_nothing(change, error, message):
    model = make_model()
    opt = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, **HP)
    run_steps(model, opt, range(2))
    before = [torch.as_tensor(v).clone() for p in model.parameters() for v in opt.state[p].values()]
    groups = [dict(g) for g in opt.param_groups]
    with pytest.raises(error, match=message):
        opt.load_state_dict(edit(bnb_state(), change))
    after = [torch.as_tensor(v) for p in model.parameters() for v in opt.state[p].values()]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert [dict(g) for g in opt.param_groups] == groups


def test_bitsandbytes_state_of_another_model_is_refused():
    other = nn.Sequential(nn.Linear(50, 100), nn.Tanh(), nn.Linear(100, 3))
    opt = ff.optim.ProtectedAdamW(make_model().parameters(), state_bits=8, **HP)
    with pytest.raises(ValueError, match=r"state1 of param 0 in the state has shape \(100, 50\) but the param"):
        opt.load_state_dict(bnb_state(other))
    assert not opt.state


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bits", [16, 4, 8.0, "8", True, None])
def test_state_bits_other_than_8_or_32_is_refused(bits):
    with pytest.raises(ValueError, match="state_bits must be one of 32, 8"):
        ff.optim.ProtectedAdamW(make_model().parameters(), state_bits=bits)


def test_min_8bit_size_is_checked():
    with pytest.raises(ValueError, match="min_8bit_size must be >= 0"):
        ff.optim.ProtectedAdamW(make_model().parameters(), state_bits=8, min_8bit_size=-1)
    with pytest.raises(TypeError, match="min_8bit_size must be an integer"):
        ff.optim.ProtectedAdamW(make_model().parameters(), state_bits=8, min_8bit_size=4096.0)


def test_8bit_fisher_needs_8bit_moments():
    model = make_model()
    with pytest.raises(ValueError, match=r"fisher_bits=8.*state_bits=8"):
        ff.optim.ProtectedAdamW(model.parameters(), ewc=eight_bit_ewc(model), **HP)


def refused_under_fsdp(rank, world_size):
    from test_distributed import sharded_mlp

    model = sharded_mlp()
    messages = []
    for build in (
        lambda: ff.optim.ProtectedAdamW(model.parameters(), state_bits=8),
        lambda: ff.EWC(model, fisher_bits=8),
    ):
        try:
            build()
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_fsdp2_refuses_8bit_state(tmp_path):
    from distributed_utils import run_ranks

    (messages,) = run_ranks(refused_under_fsdp, tmp_path, world_size=1)
    assert len(messages) == 2
    assert "state_bits=8 is not supported with sharded (FSDP2) parameters" in messages[0]
    assert "fisher_bits=8 is not supported with sharded (FSDP2) parameters" in messages[1]


# ------------------------------------------------------------------------------------------------- the budget


CONFIGURATIONS = {  # docs/optim.md's table rows: (state_bits, EWC keywords)
    "fp32 AdamW + fp32 EWC": (32, dict()),
    "fp32 AdamW + bf16 EWC": (32, dict(state_dtype=torch.bfloat16)),
    "8-bit AdamW + bf16 EWC": (8, dict(state_dtype=torch.bfloat16)),
    "8-bit AdamW + 8-bit Fisher, bf16 anchor": (8, dict(fisher_bits=8)),
}


def state_bytes_per_parameter(state_bits, ewc_kw):
    """Optimizer + EWC state bytes over one 4096 x 1024 fp32 matrix, from the tensors they hold (the two 256-entry
    maps, shared by every tensor of a model, are not counted)."""
    model = nn.Linear(1024, 4096, bias=False)
    ewc = ff.EWC(model, lam=1.0, **ewc_kw)
    ewc.load_importance([model.weight.detach()], [torch.rand_like(model.weight)])
    opt = ff.optim.ProtectedAdamW(model.parameters(), ewc=ewc, state_bits=state_bits)
    model.weight.grad = torch.randn_like(model.weight)
    opt.step()
    tensors = [v for key, v in opt.state[model.weight].items() if key not in ("step", "qmap1", "qmap2")]
    tensors += [*ewc.anchors, *ewc.fisher, *ewc.fisher_absmax]
    return sum(t.numel() * t.element_size() for t in tensors) / model.weight.numel()


def test_docs_state_the_measured_budget():
    text = (Path(__file__).parents[1] / "docs" / "optim.md").read_text()
    for row, (bits, kw) in CONFIGURATIONS.items():
        found = re.search(rf"^\| {re.escape(row)} \| ([0-9.]+) B \|", text, re.MULTILINE)
        assert found, f"docs/optim.md has no budget row for {row!r}"
        assert float(found.group(1)) == round(state_bytes_per_parameter(bits, kw), 3), row


def test_fp64_tensors_keep_fp64_moments():
    model = make_model(torch.float64)
    opt = ff.optim.ProtectedAdamW(model.parameters(), state_bits=8, **HP)
    run_steps(model, opt, [0])
    assert all(opt.state[p]["state1"].dtype == torch.float64 for p in model.parameters())
