"""ff.protected_adamw_step on every backend against its reference (the existing ops' references + AdamW math)."""

import pytest
import torch
from conftest import device_of

import fastforget as ff
from fastforget.testing import assert_close

SHAPES = [(0,), (1,), (33, 7), (1025,)]
PARTS = {
    "plain": (),
    "ewc": ("ewc",),
    "tensor": ("tensor",),
    "element": ("element",),
    "si": ("si",),
    "all_tensor": ("ewc", "tensor", "si"),
    "all_element": ("ewc", "element", "si"),
}
HYPER = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, threshold=0.55)


def make_case(shapes, param_dtype, parts, device, seed=0):
    """(positional lists and per-tensor tensors, keyword arguments) of one call."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, dtype=torch.float32, positive=False):
        x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        return x.to(device, dtype)

    count = len(shapes)
    kw = dict(
        params=[rand(s, param_dtype) for s in shapes],
        grads=[rand(s, param_dtype) for s in shapes],
        exp_avg=[0.1 * rand(s) for s in shapes],
        exp_avg_sq=[0.1 * rand(s, positive=True) for s in shapes],
        steps=[torch.tensor(float(3 * i), device=device) for i in range(count)],
    )
    if "ewc" in parts:
        kw.update(anchors=[rand(s) for s in shapes], fisher=[rand(s, positive=True) for s in shapes], lam=0.7)
    if "tensor" in parts:
        kw.update(factors=rand(count, positive=True))
    if "element" in parts:
        kw.update(
            ema_mean=[rand(s) for s in shapes],
            ema_var=[rand(s, positive=True) for s in shapes],
            alpha=torch.linspace(0.1, 1.0, count, device=device),
            var_scale=torch.full((count,), 2.0, device=device),
        )
    if "si" in parts:
        kw.update(omega=[rand(s) for s in shapes])
    return kw


def clone(kw):
    return {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in kw.items()}


WRITTEN = ("params", "exp_avg", "exp_avg_sq", "steps", "ema_mean", "ema_var", "omega")


def run(kw, backend, **extra):
    return ff.protected_adamw_step(**kw, **HYPER, **extra, backend=backend)


def assert_state_close(got, want, param_dtype, grad_factor=1.0):
    for key in WRITTEN:
        for g, w in zip(got.get(key, []), want.get(key, [])):
            assert g.dtype == w.dtype and g.shape == w.shape
            if key != "omega" or param_dtype == torch.float32:
                assert_close(g, w, param_dtype if key == "params" else torch.float32)
    if param_dtype in (torch.bfloat16, torch.float16):
        # omega -= g (theta_new - theta_old) with theta_new rounded to 16 bits: where the two sides round a new
        # theta differently (they differ in the last fp32 bits), omega differs by |g| times one ulp of theta
        for w_got, w_want, g, p in zip(got.get("omega", []), want.get("omega", []), got["grads"], want["params"]):
            ulp = torch.finfo(param_dtype).eps * p.double().abs()
            bound = (g.double() * grad_factor).abs() * ulp + 1e-6 + 1e-5 * w_want.double().abs()
            assert bool(((w_got.double() - w_want.double()).abs() <= bound).all())


@pytest.mark.parametrize("parts", PARTS, ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, parts, param_dtype):
    kw = make_case(SHAPES, param_dtype, PARTS[parts], device_of(backend))
    want = clone(kw)
    penalty = run(kw, backend)
    expected = run(want, "reference")
    assert penalty.shape == () and penalty.dtype == torch.float32
    assert_close(penalty, expected, torch.float32)
    assert_state_close(kw, want, param_dtype)
    assert all(float(s) == 3 * i + 1 for i, s in enumerate(kw["steps"]))


def test_grad_scale_and_maximize(backend):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.float16, PARTS["all_element"], device)
    want = clone(kw)
    extra = dict(grad_scale=torch.tensor(64.0, device=device), found_inf=torch.zeros((), device=device))
    assert_close(run(kw, backend, maximize=True, **extra), run(want, "reference", maximize=True, **extra))
    assert_state_close(kw, want, torch.float16, grad_factor=1 / 64)


@pytest.mark.parametrize("parts", ["plain", "all_tensor", "all_element"])
def test_skipped_step_changes_nothing(backend, parts):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.bfloat16, PARTS[parts], device)
    before = clone(kw)
    penalty = run(kw, backend, found_inf=torch.ones((), device=device), grad_scale=torch.tensor(2.0, device=device))
    assert float(penalty) == 0.0
    for key in (*WRITTEN, "grads"):
        assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), before.get(key, [])))


def test_grads_are_not_written(backend):
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], device_of(backend))
    grads = [g.clone() for g in kw["grads"]]
    run(kw, backend)
    assert all(torch.equal(a, b) for a, b in zip(kw["grads"], grads))


def _bad_cases(kw, device):
    n = len(kw["params"])
    return [
        (dict(grads=kw["grads"][:-1]), ValueError, "grads has"),
        (dict(exp_avg=[t.bfloat16() for t in kw["exp_avg"]]), TypeError, r"exp_avg\[0\] has dtype"),
        (dict(exp_avg_sq=[t.t() if t.dim() == 2 else t for t in kw["exp_avg_sq"]]), ValueError, "shape|contiguous"),
        (dict(steps=kw["steps"][:-1]), ValueError, "steps has"),
        (dict(anchors=kw["anchors"], fisher=[]), ValueError, "fisher has 0"),
        (dict(fisher=[f.int() for f in kw["fisher"]]), TypeError, r"fisher\[0\] has dtype"),
        (dict(factors=torch.ones(n + 1, device=device)), ValueError, "factors must be"),
        (dict(factors=torch.ones(n, device=device)), ValueError, "not both"),
        (dict(alpha=None), ValueError, "come together"),
        (dict(omega=kw["omega"][1:]), ValueError, "omega has"),
        (dict(grad_scale=torch.ones(2, device=device)), ValueError, "grad_scale"),
        (dict(params=[kw["params"][0]] * n), ValueError, "same tensor"),
        (dict(lr=-1.0), ValueError, "lr must be >= 0"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
    ]


def test_rejects_bad_input_and_changes_nothing(backend):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], device)
    kw.pop("factors", None)
    before = clone(kw)
    for change, error, match in _bad_cases(kw, device):
        args = {**kw, **HYPER, **change}
        with pytest.raises(error, match=match):
            ff.protected_adamw_step(**args, backend=backend)
        for key in WRITTEN:
            assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), before.get(key, []))), (change, key)


def _op_args(kw, device, found_inf=0.0):
    return (
        kw["params"], kw["grads"], kw["exp_avg"], kw["exp_avg_sq"], kw["steps"], kw["anchors"], kw["fisher"], None,
        kw["ema_mean"], kw["ema_var"], kw["alpha"], kw["var_scale"], kw["omega"], torch.tensor(2.0, device=device),
        torch.tensor(found_inf, device=device), 0.01, 0.9, 0.99, 1e-8, 0.01, 0.5, 0.55, False,
    )  # fmt: skip


def test_native_op_checks_lengths_before_writing(fused_backend):
    device = device_of(fused_backend)
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], device)
    before = clone(kw)
    op = ff.dispatch.native_op("protected_adamw_step", fused_backend)
    for key in ("grads", "exp_avg", "omega", "ema_var", "fisher"):
        bad = clone(kw)
        bad[key] = bad[key][:-1]
        bad["params"] = kw["params"]
        with pytest.raises(RuntimeError):
            op(*_op_args(bad, device))
        assert all(torch.equal(a, b) for a, b in zip(kw["params"], before["params"])), key


def test_opcheck(fused_backend):
    device = device_of(fused_backend)
    kw = make_case([(4, 3), (0,), (9,)], torch.float32, PARTS["all_element"], device)
    op = ff.dispatch.native_op("protected_adamw_step", fused_backend)
    for found_inf in (0.0, 1.0):
        torch.library.opcheck(op, _op_args(clone(kw), device, found_inf))


def test_torch_compile_fullgraph():
    kw = make_case([(33, 7), (1025,)], torch.float32, PARTS["all_element"], torch.device("cpu"))
    want = clone(kw)

    def step(kw):
        return ff.protected_adamw_step(**kw, **HYPER, backend="cpu")

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(kw)
    assert torch.equal(got, step(want))
    for key in WRITTEN:
        assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), want.get(key, []))), key


def test_empty_list():
    assert float(ff.protected_adamw_step([], [], [], [], [], lr=0.1)) == 0.0
