"""Every public op validates before it writes (docs/ops.md, "Edge cases and bad input"), the same on every backend.

A property suite: hypothesis draws a valid call of an op (a list of odd shapes, mixed dtypes where the op allows
them), then one corruption of one argument -- a non-tensor, a tensor of the wrong shape, dtype or device, a length
mismatch, a NaN / inf / bool / out-of-range scalar, an output aliasing an input -- and asserts a ValueError or
TypeError that names the argument, with every tensor the call could touch bitwise unchanged. The valid edge cases
(empty lists, zero-size, non-contiguous and 1,000 tiny tensors) give the reference backend's answer on every backend.
"""

import math

import pytest
import torch
from conftest import FUSED_BACKENDS
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import fastforget as ff

BACKENDS = [*FUSED_BACKENDS, "reference"]
SHAPES = [(), (1,), (3,), (5, 7), (2, 3, 4), (0,), (4, 0)]


def _snapshot(tensors):
    return [(t, t.detach().clone()) for t in tensors]


def _unchanged(snapshot):
    # bitwise: NaNs equal themselves, -0.0 differs from 0.0
    return all(
        t.shape == c.shape and t.dtype == c.dtype and torch.equal(t.detach().view(-1).view(torch.uint8)
        if t.is_contiguous() else t.detach().contiguous().view(-1).view(torch.uint8), c.view(-1).view(torch.uint8))
        for t, c in snapshot
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- valid calls by op
#
# Each maker returns (kwargs of a valid call, the names of the list arguments it writes, the names it reads).


def _ewc(shapes, dtype):
    params = [torch.randn(s, dtype=dtype).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    anchors = [torch.randn_like(p, dtype=torch.float32) for p in params]
    fisher = [torch.rand_like(p, dtype=torch.float32) for p in params]
    return {"params": params, "anchors": anchors, "fisher": fisher, "lam": 0.5}


def _fisher(shapes, dtype):
    return {
        "fisher": [torch.rand(s) for s in shapes],
        "grads": [torch.randn(s, dtype=dtype) for s in shapes],
        "decay": 0.9,
        "scale": 1.0,
    }


def _moments(shapes, dtype):
    return {"grads": [torch.randn(s, dtype=dtype) for s in shapes], "inv_scale": 0.5}


def _scale(shapes, dtype):
    return {"grads": [torch.randn(s, dtype=dtype) for s in shapes], "factors": torch.rand(len(shapes))}


def _ema(shapes, dtype):
    return {
        "grads": [torch.randn(s, dtype=dtype) for s in shapes],
        "mean": [torch.zeros(s) for s in shapes],
        "var": [torch.rand(s) for s in shapes],
        "alpha": 0.5,
        "threshold": 0.1,
        "temperature": 1.0,
        "inv_scale": 1.0,
    }


def _adamw(shapes, dtype):
    params = [torch.randn(s, dtype=dtype) for s in shapes]
    return {
        "params": params,
        "grads": [torch.randn_like(p) for p in params],
        "exp_avg": [torch.zeros(s) for s in shapes],
        "exp_avg_sq": [torch.zeros(s) for s in shapes],
        "steps": [torch.zeros(()) for _ in shapes],
        "anchors": [torch.randn(s) for s in shapes],
        "fisher": [torch.rand(s) for s in shapes],
        "lam": 0.1,
        "lr": 1e-3,
        "eps": 1e-8,
        "weight_decay": 0.01,
    }


OPS = {
    "ewc_penalty": (ff.ewc_penalty, _ewc, (), ("params", "anchors", "fisher")),
    "ewc_penalty_": (ff.ewc_penalty_, _ewc, ("grads",), ("params", "anchors", "fisher")),
    "fisher_update_": (ff.fisher_update_, _fisher, ("fisher",), ("grads",)),
    "grad_moments": (ff.grad_moments, _moments, (), ("grads",)),
    "scale_grads_": (ff.scale_grads_, _scale, ("grads",), ()),
    "grad_ema_protect_": (ff.grad_ema_protect_, _ema, ("grads", "mean", "var"), ()),
    "protected_adamw_step": (
        ff.protected_adamw_step, _adamw, ("params", "exp_avg", "exp_avg_sq", "steps"), ("grads", "anchors", "fisher"),
    ),
}  # fmt: skip
SCALARS = {  # scalar argument -> a value out of its range (besides NaN, inf, a bool and a string)
    "lam": -1.0, "decay": -0.5, "scale": -1.0, "inv_scale": None, "alpha": 1.5, "threshold": None,
    "temperature": 0.0, "lr": -1.0, "eps": -1e-8, "weight_decay": -0.1,
}  # fmt: skip


def _lists(kwargs):
    return [k for k, v in kwargs.items() if isinstance(v, list)]


def _touched(kwargs):
    """Every tensor a call could write or read, with the params' gradients."""
    out = []
    for v in kwargs.values():
        for t in v if isinstance(v, list) else [v]:
            if isinstance(t, torch.Tensor):
                out.append(t)
                if t.grad is not None:
                    out.append(t.grad)
    return out


def _corruptions(kwargs, written, read):
    """(description, the argument's name, new kwargs) for each corruption of a valid call."""
    out = []
    for name in _lists(kwargs):
        tensors = kwargs[name]
        out.append((f"{name} not a list", name, {**kwargs, name: 3}))
        out.append((f"{name} holds a list", name, {**kwargs, name: [[1.0, 2.0], *tensors[1:]]}))
        paired = len(_lists(kwargs)) > 1 or "factors" in kwargs  # its length is fixed by another argument
        if len(tensors) > 1 and name != "steps" and paired:
            out.append((f"{name} too short", name, {**kwargs, name: tensors[:-1]}))
        first = tensors[0]
        out.append((f"{name}[0] int", name, {**kwargs, name: [first.to(torch.int32), *tensors[1:]]}))
        if len(tensors) > 1:  # a list on mixed devices (a list all on one device is a valid call there)
            out.append((f"{name}[-1] meta", name, {**kwargs, name: [*tensors[:-1], tensors[-1].to("meta")]}))
        if name != "steps" and len(_lists(kwargs)) > 1:  # shaped unlike its partner in another list
            out.append((f"{name}[0] shape", name, {**kwargs, name: [torch.zeros(9, 2), *tensors[1:]]}))
    for name, bad in SCALARS.items():
        if name in kwargs:
            for value in (math.nan, math.inf, True, "1", *([bad] if bad is not None else [])):
                out.append((f"{name}={value!r}", name, {**kwargs, name: value}))
    # an output aliasing an input: a read (or another written) list's first tensor replaced by a written one's
    sources = {"grads": [p.grad for p in kwargs["params"]]} if "grads" in written and "params" in kwargs else kwargs
    for out_name in written:
        target = sources[out_name][0]
        for in_name in [*read, *written]:
            if in_name == out_name or in_name not in kwargs or kwargs[in_name][0].shape != target.shape:
                continue
            if in_name == "params" and "grads" not in kwargs:  # a param replaced by a gradient gets its own .grad
                continue
            if kwargs[in_name][0].dtype != target.dtype and in_name in ("params", "grads", "mean", "var", "steps"):
                continue  # rejected for its dtype before the aliasing check: covered above
            out.append(
                (f"{in_name}[0] aliases {out_name}[0]", in_name, {**kwargs, in_name: [target, *kwargs[in_name][1:]]})
            )
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    op=st.sampled_from(sorted(OPS)),
    shapes=st.lists(st.sampled_from(SHAPES[:5]), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    pick=st.integers(0, 10**6),
)
def test_bad_input_is_rejected_and_changes_nothing(backend, op, shapes, dtype, pick):
    fn, make, written, read = OPS[op]
    kwargs = make(shapes, dtype)
    corruptions = _corruptions(kwargs, written, read)
    what, name, bad = corruptions[pick % len(corruptions)]
    snapshot = _snapshot(_touched(kwargs))
    note(what)
    with pytest.raises((ValueError, TypeError)) as error:
        fn(**bad, backend=backend)
    assert _unchanged(snapshot), f"{op}: {what} changed a tensor before raising"
    message = str(error.value)
    assert name.split("[")[0] in message or name == "steps" and "steps" in message, f"{op}: {what}: {message!r}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_corruption_of_each_op(backend, op):
    """The property above, exhaustively over the corruptions of one mixed-dtype call (the draws are random)."""
    fn, make, written, read = OPS[op]
    kwargs = make([(3,), (5, 7), ()], torch.float32)
    for i, p in enumerate(kwargs.get("params", [])[:1]):  # one bf16 param among fp32 ones, where params mix
        if op != "protected_adamw_step":
            kwargs["params"][i] = p.detach().bfloat16().requires_grad_()
            kwargs["params"][i].grad = p.grad.bfloat16() if p.grad is not None else None
    corruptions = _corruptions(kwargs, written, read)
    assert len(corruptions) >= 5
    for what, name, bad in corruptions:
        snapshot = _snapshot(_touched(kwargs))
        with pytest.raises((ValueError, TypeError)) as error:
            fn(**bad, backend=backend)
        assert _unchanged(snapshot), f"{op}: {what} changed a tensor before raising"
        assert name in str(error.value), f"{op}: {what}: {error.value}"


# ------------------------------------------------------------------------------------------- valid edge cases


def _edge_shapes():
    """1,000 tiny tensors: zero-size, scalars and odd sizes."""
    return [SHAPES[i % len(SHAPES)] for i in range(1000)]


def _transposed(t):
    out = t.detach().t().contiguous().t().requires_grad_(t.requires_grad)
    out.grad = None if t.grad is None else _transposed(t.grad)
    return out


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("case", ["empty", "many", "strided"])
def test_edge_cases_match_reference(op, case):
    fn, make, written, _ = OPS[op]
    shapes = {"empty": [], "many": _edge_shapes(), "strided": [(6, 5)]}[case]
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        if case == "empty":
            kwargs = make([(1,)], torch.float32)
            kwargs = {k: ([] if isinstance(v, list) else v) for k, v in kwargs.items()}
            if op == "scale_grads_":
                kwargs["factors"] = torch.zeros(0)
        else:
            kwargs = make(shapes, torch.float32)
        if case == "strided":  # the same values in transposed memory
            for name in set(_lists(kwargs)) - set(written) - {"steps"}:
                kwargs[name] = [_transposed(t) for t in kwargs[name]]
        if backend == "triton" and case == "many":
            continue  # 1,000 launch-table rows under the interpreter take minutes; tests/test_multi_tensor.py covers it
        value = fn(**kwargs, backend=backend)
        outputs = [kwargs[n] if n != "grads" or "params" not in kwargs else [p.grad for p in kwargs["params"]]
                   for n in written]  # fmt: skip
        results[backend] = (value, outputs)
    expected_value, expected_outputs = results["reference"]
    for backend, (value, outputs) in results.items():
        if isinstance(expected_value, tuple):
            for v, e in zip(value, expected_value):
                torch.testing.assert_close(v, e, equal_nan=True, check_device=False, atol=1e-5, rtol=1e-5)
        elif expected_value is not None:
            torch.testing.assert_close(value, expected_value, equal_nan=True, atol=1e-5, rtol=1e-5, check_dtype=False)
        for got, want in zip(outputs, expected_outputs):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=lambda m, b=backend: f"{b}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_moments_overflow_is_nan_on_every_backend(backend):
    rows = ff.grad_moments([torch.tensor([3e38, -3e38, 3e38, -3e38]), torch.ones(3)], backend=backend)
    assert rows[0, 0] == 4 and rows[0, 1:].isnan().all()
    torch.testing.assert_close(rows[1], torch.tensor([3.0, 1.0, 0.0]))


# ------------------------------------------------------------------------------------------- objects and states


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def _state_equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def _stepped_protector(mode):
    model = _model()
    protector = ff.GradientProtector(model, window=3, mode=mode)
    for _ in range(2):
        model(torch.randn(5, 4)).sum().backward()
        protector.protect_()
    return protector


def _clone_state(state):
    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        return [clone(t) for t in v] if isinstance(v, list) else v

    return {k: clone(v) for k, v in state.items()}


PROTECTOR_CORRUPTIONS = {
    "tensor": [
        ("missing names", lambda s: {k: v for k, v in s.items() if k != "names"}, ValueError, r"lacks \['names'\]"),
        ("head >= window", lambda s: {**s, "head": s["head"] + 3}, ValueError, r"head holds a slot outside \[0, 3\)"),
        ("negative head", lambda s: {**s, "head": s["head"] - 3}, ValueError, "head holds a slot"),
        ("NaN ring", lambda s: {**s, "ring": s["ring"].clone().fill_(math.nan)}, ValueError, "non-finite"),
        ("negative count", lambda s: {**s, "ring": s["ring"] * -1}, ValueError, "negative count"),
        ("float head", lambda s: {**s, "head": s["head"].double()}, TypeError, "head is not a integer tensor"),
        ("ring shape", lambda s: {**s, "ring": s["ring"][:, :2]}, ValueError, "ring has the wrong shape"),
        ("not a dict", lambda s: [s], TypeError, "must be a dict"),
    ],
    "element": [
        ("negative var", lambda s: {**s, "var": [-(v + 1) for v in s["var"]]}, ValueError, "var.0. holds"),
        ("NaN mean", lambda s: {**s, "mean": [m + math.nan for m in s["mean"]]}, ValueError, "mean.0. holds"),
        ("negative steps", lambda s: {**s, "steps": s["steps"] - 5}, ValueError, "negative count"),
        ("short var", lambda s: {**s, "var": s["var"][:1]}, ValueError, "var has the wrong shapes"),
        ("missing steps", lambda s: {k: v for k, v in s.items() if k != "steps"}, ValueError, r"lacks \['steps'\]"),
    ],
}  # fmt: skip


@pytest.mark.parametrize("mode", ["tensor", "element"])
def test_protector_state_loads_are_validated_as_a_whole(mode):
    protector = _stepped_protector(mode)
    good = _clone_state(protector.state_dict())
    for what, corrupt, error, match in PROTECTOR_CORRUPTIONS[mode]:
        with pytest.raises(error, match=match):
            protector.load_state_dict(corrupt(_clone_state(good)))
        assert _state_equal(protector.state_dict(), good), what
    protector.load_state_dict(good)  # the uncorrupted state still loads


def test_protector_window_that_cannot_fit_is_refused_before_allocating():
    with pytest.raises(ValueError, match=r"window 1000000000000 would need [\d.]+ GiB but cpu has [\d.]+ GiB free"):
        ff.GradientProtector(_model(), window=10**12)


def test_si_state_loads_reject_impossible_values():
    model = _model()
    si = ff.SynapticIntelligence(model)
    good = _clone_state(si.state_dict())
    for state, match in (
        ({**good, "xi": 0.0}, "xi must be > 0"),
        ({**good, "xi": -1.0}, "xi must be > 0"),
        ({**good, "omega": [w + math.nan for w in good["omega"]]}, "omega of '0.weight' is not finite"),
        ({k: v for k, v in good.items() if k != "xi"}, r"lacks \['xi'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            si.load_state_dict(state)
        assert _state_equal(si.state_dict(), good)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [(dict(r=0), ValueError, "r must be"), (dict(alpha=math.nan), ValueError, "alpha must be a finite"),
     (dict(dropout=1.0), ValueError, "dropout must be"), (dict(use_rslora="yes"), TypeError, "use_rslora must be"),
     (dict(backend="gpu"), ValueError, "unknown backend")],
)  # fmt: skip
def test_rejected_apply_lora_leaves_the_model_as_it_was(kwargs, error, match):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        ff.apply_lora(model, ["0", "2"], **kwargs)
    assert all(p.requires_grad for p in model.parameters())
    assert all(type(m) is torch.nn.Linear for m in (model[0], model[2]))
    assert _state_equal(model.state_dict(), before)


def _adamw_pair():
    model = _model()
    opt = ff.optim.ProtectedAdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    return model, opt


@pytest.mark.parametrize(
    ("make_state", "error", "match"),
    [
        (lambda m: torch.optim.AdamW(m.parameters(), amsgrad=True).state_dict(), ValueError, "amsgrad"),
        (lambda m: _stepped(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m).state_dict(), ValueError,
         "not an AdamW state"),
        (lambda m: _other_adamw_state(), ValueError, "another model's"),
        (lambda m: {"state": {}, "param_groups": [{**g, "lr": math.nan} for g in
                    torch.optim.AdamW(m.parameters()).state_dict()["param_groups"]]}, ValueError, "lr must be finite"),
        (lambda m: {"state": {}}, ValueError, r"lacks \['param_groups'\]"),
    ],
)  # fmt: skip
def test_protected_adamw_state_loads_are_validated_as_a_whole(make_state, error, match):
    model, opt = _adamw_pair()
    before = _clone_state(opt.state_dict()["state"][0]), [dict(g) for g in opt.param_groups]
    with pytest.raises(error, match=match):
        opt.load_state_dict(make_state(model))
    assert _state_equal(opt.state_dict()["state"][0], before[0])
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == [
        {k: v for k, v in g.items() if k != "params"} for g in before[1]
    ]
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # still steps


def _other_adamw_state():
    """The state of an AdamW over a model with the same number of tensors, other shapes."""
    other = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    return _stepped(torch.optim.AdamW(other.parameters()), other).state_dict()


def _stepped(optimizer, model):
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("lr", math.nan, "lr must be finite"), ("lr", -1.0, "lr must be >= 0"), ("betas", (1.0, 0.999), "betas must be"),
     ("betas", (0.9,), r"betas must be a pair"), ("eps", math.inf, "eps must be finite")],
)  # fmt: skip
def test_protected_adamw_rechecks_groups_at_step_time(key, value, match):
    model, opt = _adamw_pair()
    model(torch.randn(5, 4)).sum().backward()
    weights, state = _clone_state(dict(model.state_dict())), _clone_state(opt.state_dict()["state"][0])
    opt.param_groups[0][key] = value  # by hand, a scheduler or a loaded state
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert _state_equal(dict(model.state_dict()), weights) and _state_equal(opt.state_dict()["state"][0], state)


def test_ewc_refuses_a_nan_fisher_and_stays_unchanged():
    model = _model()
    ewc = ff.EWC(model, lam=1.0)
    data = [(torch.full((4, 4), math.nan), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="non-finite or negative elements"):
        ewc.consolidate(data, torch.nn.functional.cross_entropy, progress=False)
    assert ewc.tasks == 0 and ewc.anchors == [] and float(ewc.penalty()) == 0.0
    with pytest.raises(ValueError, match=r"EWC state lacks \['tasks'"):
        ewc.load_state_dict({"mode": "online"})


def test_protected_trainer_refuses_an_ewc_over_another_model():
    model, other = _model(), _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="EWC"):
        ff.ProtectedTrainer(model, optimizer, torch.nn.functional.cross_entropy, ewc=ff.EWC(other))


# ------------------------------------------------------------------------------------------- activation ops
#
# Ops over a few tensors (not lists): each corruption replaces one tensor argument by a non-tensor, an integer
# tensor, a tensor of another shape or on another device, or one scalar by NaN / inf / a bool / an out-of-range value.


def _lora_call():
    x = torch.randn(3, 5, 8)
    return {"x": x, "weight": torch.randn(6, 8), "bias": torch.randn(6), "lora_A": torch.randn(4, 8),
            "lora_B": torch.randn(6, 4), "scale": 2.0, "dropout_p": 0.0}  # fmt: skip


def _anchored_call():
    return {"hidden": torch.randn(2, 5, 8), "weight": torch.randn(11, 8), "labels": torch.randint(0, 11, (2, 5)),
            "ref_hidden": torch.randn(2, 5, 8), "kl_weight": 0.5, "temperature": 1.0}  # fmt: skip


def _merge_call():
    out = [torch.randn(3, 4), torch.randn(5)]
    models = [[torch.randn_like(t) for t in out] for _ in range(2)]
    fisher = [[torch.rand_like(t) for t in out] for _ in range(2)]
    return {"out": out, "models": models, "weights": [0.5, 0.5], "fisher": fisher}


TENSOR_OPS = {
    "lora_linear": (ff.lora_linear, _lora_call, {"scale": None, "dropout_p": 1.0}),
    "anchored_lm_loss": (ff.anchored_lm_loss, _anchored_call, {"kl_weight": -1.0, "temperature": 0.0}),
}


def _tensor_corruptions(kwargs, scalars):
    out = []
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            out.append((f"{name} a list", name, {**kwargs, name: value.tolist()}))
            if value.is_floating_point():
                out.append((f"{name} int", name, {**kwargs, name: value.to(torch.int32)}))
            out.append((f"{name} shape", name, {**kwargs, name: value.reshape(-1)[: max(1, value.numel() - 1)]}))
            out.append((f"{name} meta", name, {**kwargs, name: value.to("meta")}))
    for name, bad in scalars.items():
        for value in (math.nan, math.inf, True, "1", *([bad] if bad is not None else [])):
            out.append((f"{name}={value!r}", name, {**kwargs, name: value}))
    return out


@pytest.mark.parametrize("op", sorted(TENSOR_OPS))
def test_every_corruption_of_each_activation_op(backend, op):
    fn, make, scalars = TENSOR_OPS[op]
    kwargs = make()
    for what, name, bad in _tensor_corruptions(kwargs, scalars):
        snapshot = _snapshot([v for v in kwargs.values() if isinstance(v, torch.Tensor)])
        with pytest.raises((ValueError, TypeError)) as error:
            fn(**bad, backend=backend)
        assert _unchanged(snapshot), f"{op}: {what} changed a tensor"
        assert name in str(error.value) or name == "labels" and "label" in str(error.value), (
            f"{op}: {what}: {error.value}"
        )


def test_every_corruption_of_weight_merge(backend):
    kwargs = _merge_call()
    buffer = torch.randn(13)  # out[0] and a Fisher one element apart in the same memory (the same tensor is allowed)
    kwargs["out"][0] = buffer[:12].view(3, 4)
    shifted = buffer[1:].view(3, 4)
    corruptions = [
        ("out holds a list", {**kwargs, "out": [[1.0], kwargs["out"][1]]}),
        ("a model too short", {**kwargs, "models": [kwargs["models"][0][:1], kwargs["models"][1]]}),
        ("a model's shape", {**kwargs, "models": [[torch.zeros(9), kwargs["models"][0][1]], kwargs["models"][1]]}),
        ("weights length", {**kwargs, "weights": [1.0]}),
        ("weight NaN", {**kwargs, "weights": [math.nan, 0.5]}),
        ("weight negative", {**kwargs, "weights": [-1.0, 0.5]}),
        ("fisher length", {**kwargs, "fisher": kwargs["fisher"][:1]}),
        ("fisher overlaps out", {**kwargs, "fisher": [[shifted, kwargs["fisher"][0][1]], kwargs["fisher"][1]]}),
        ("out int", {**kwargs, "out": [kwargs["out"][0].int(), kwargs["out"][1]]}),
    ]  # fmt: skip
    for what, bad in corruptions:
        tensors = [*kwargs["out"], *(t for m in kwargs["models"] for t in m), *(t for f in kwargs["fisher"] for t in f)]
        snapshot = _snapshot(tensors)
        with pytest.raises((ValueError, TypeError)):
            ff.weight_merge_(**bad, backend=backend)
        assert _unchanged(snapshot), what
