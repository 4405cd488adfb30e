"""ff.GradientProtector (streaming, exact) against the seed's history-based algorithm."""

import io

import pytest
import torch
from conftest import device_of

import fastforget as ff

# the seed's torch.var of a one-element history warns (and gives NaN), as it does in the seed
pytestmark = pytest.mark.filterwarnings("ignore:var.*degrees of freedom:UserWarning")

SHAPES = [(13, 7), (7,), (1,), (97,), (3, 4, 5)]


def parameters(device="cpu"):
    torch.manual_seed(0)
    return [(f"p{i}", torch.nn.Parameter(torch.randn(s, device=device))) for i, s in enumerate(SHAPES)]


def set_gradients(named, step, generator, skip=True):
    for i, (_, p) in enumerate(named):
        if skip and (step + i) % 5 == 0:  # some parameters have no gradient on some steps
            p.grad = None
        else:
            scale = 0.3 + 0.1 * i
            p.grad = scale * torch.randn(p.shape, generator=generator).to(p.device) + 0.05 * step


@pytest.mark.parametrize("window, threshold", [(7, 0.1), (100, 0.1), (7, 0.999)])
def test_matches_the_seed_step_by_step(backend, window, threshold):
    # 250 steps; 130 under the (slow) Triton interpreter, still past the wrap of the 100-step ring
    ours, theirs = parameters(device_of(backend)), parameters()
    protector = ff.GradientProtector(ours, window=window, threshold=threshold, backend=backend)
    seed = ff.SeedGradientProtector(theirs, importance_threshold=threshold, window=window)
    interpreted = backend == "triton" and not torch.cuda.is_available()
    for step in range(130 if interpreted else 250):
        set_gradients(ours, step, torch.Generator().manual_seed(step))
        set_gradients(theirs, step, torch.Generator().manual_seed(step))
        importance = protector.protect_()
        expected = seed.protect_gradients()
        for i, (name, p) in enumerate(theirs):
            if name in expected:
                torch.testing.assert_close(
                    importance[i].float().cpu(), expected[name].float(), rtol=1e-5, atol=1e-6, equal_nan=True
                )
                torch.testing.assert_close(ours[i][1].grad.cpu(), p.grad, rtol=1e-5, atol=1e-6)
            else:
                assert ours[i][1].grad is None and importance[i].isnan()


def test_normalize_max_and_temperature():
    named = parameters()
    protector = ff.GradientProtector(named, window=5, normalize="max", temperature=0.5, threshold=0.0)
    set_gradients(named, 1, torch.Generator().manual_seed(1), skip=False)
    before = [p.grad.clone() for _, p in named]
    importance = protector.protect_()
    var = torch.tensor(
        [g.double().var().item() if g.numel() > 1 else float("nan") for g in before], dtype=torch.float64
    )
    expected = torch.sigmoid(var / var.nan_to_num(0.0).max() / 0.5)
    torch.testing.assert_close(importance, expected, equal_nan=True)
    for (_, p), g, imp in zip(named, before, expected):
        factor = 1.0 if imp.isnan() else 1 - imp.item()
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-6, atol=1e-7)


def test_non_finite_step_leaves_state_and_gradients_untouched():
    named = parameters()
    protector = ff.GradientProtector(named, window=4)
    for step in range(3):
        set_gradients(named, step, torch.Generator().manual_seed(step), skip=False)
        protector.protect_()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in protector.state_dict().items()}
    set_gradients(named, 9, torch.Generator().manual_seed(9), skip=False)
    named[2][1].grad[0] = float("inf")
    before = [p.grad.clone() for _, p in named]
    protector.protect_()
    assert protector.found_inf.item()
    assert torch.equal(protector.ring, state["ring"]) and torch.equal(protector.head, state["head"])
    assert all(torch.equal(p.grad, g) for (_, p), g in zip(named, before))
    set_gradients(named, 10, torch.Generator().manual_seed(10), skip=False)
    protector.protect_()
    assert not protector.found_inf.item()


def test_inv_scale_undoes_a_grad_scaler():
    plain, scaled = parameters(), parameters()
    a, b = ff.GradientProtector(plain, window=3), ff.GradientProtector(scaled, window=3)
    for step in range(4):
        set_gradients(plain, step, torch.Generator().manual_seed(step), skip=False)
        set_gradients(scaled, step, torch.Generator().manual_seed(step), skip=False)
        for _, p in scaled:
            p.grad *= 1024.0
        torch.testing.assert_close(a.protect_(), b.protect_(inv_scale=torch.tensor(1 / 1024)), equal_nan=True)
        for (_, p), (_, q) in zip(plain, scaled):
            torch.testing.assert_close(q.grad / 1024.0, p.grad)


def assert_state_round_trip_continues_bitwise(**options):
    """9 steps, a state_dict through torch.save / torch.load into a fresh protector on equal parameters, then 11
    more steps on both: the same importances and gradients, bitwise. Returns the first protector."""
    first, second = parameters(), parameters()
    protector = ff.GradientProtector(first, window=6, **options)
    for step in range(9):
        set_gradients(first, step, torch.Generator().manual_seed(step))
        protector.protect_()
    buffer = io.BytesIO()
    torch.save(protector.state_dict(), buffer)
    buffer.seek(0)
    restored = ff.GradientProtector(second, window=6, **options)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(9, 20):
        set_gradients(first, step, torch.Generator().manual_seed(step))
        set_gradients(second, step, torch.Generator().manual_seed(step))
        assert torch.equal(protector.protect_().nan_to_num(-1), restored.protect_().nan_to_num(-1))
        assert all(
            (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad) for (_, p), (_, q) in zip(first, second)
        )
    return protector


def test_state_round_trip_continues_bitwise():
    assert_state_round_trip_continues_bitwise()


def test_state_is_o_window_scalars_per_tensor():
    named = parameters()
    protector = ff.GradientProtector(named, window=100)
    assert protector.state_bytes() == len(SHAPES) * (100 * 3 * 8 + 8)


def test_bad_input_changes_nothing():
    named = parameters()
    for kwargs, error in [
        (dict(window=0), "window must be an integer >= 1"),
        (dict(threshold=float("nan")), "threshold must be finite"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(normalize="sum"), "unknown normalize"),
        (dict(mode="row"), "unknown mode 'row'"),
        (dict(beta=0.9), "beta belongs to mode='element'"),
        (dict(mode="element", beta=1.0), r"beta must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=error):
            ff.GradientProtector(named, **kwargs)
    before = [p.detach().clone() for _, p in named]
    protector = ff.GradientProtector(named, window=3)
    for mode in ("tensor", "element"):
        target = ff.GradientProtector(named, window=4, mode=mode)
        set_gradients(named, 1, torch.Generator().manual_seed(1), skip=False)
        target.protect_()
        saved = io.BytesIO()
        torch.save(target.state_dict(), saved)
        corrupt = target.state_dict()
        key = "ring" if mode == "tensor" else "mean"
        corrupt[key] = corrupt[key][:1] if mode == "tensor" else corrupt[key][:-1]
        for state, error in [
            (protector.state_dict(), "window 3 but this protector 4" if mode == "tensor" else "of mode 'tensor'"),
            (corrupt, f"{key} has the wrong shape"),
        ]:
            with pytest.raises(ValueError, match=error):
                target.load_state_dict(state)
        saved.seek(0)
        expected = torch.load(saved, weights_only=True)
        for key, value in target.state_dict().items():  # the rejected loads changed nothing
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, expected[key]), key
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                assert all(torch.equal(a, b) for a, b in zip(value, expected[key])), key
    with pytest.raises(ValueError, match="names differ"):
        ff.GradientProtector(named[:2], window=3).load_state_dict(protector.state_dict())
    assert all(torch.equal(p, b) for (_, p), b in zip(named, before))


def element_truth(history, window, threshold, normalize="none", temperature=1.0):
    """mode="element" in float64, written from the formulas: per element, alpha = max(1/t, 1/window),
    m += alpha d, v = (1 - alpha)(v + alpha d^2); importance = sigmoid(v [/ max v] / T); returns the last step's
    scaled gradient and the largest importance."""
    m = v = None
    for t, g in enumerate(history, start=1):
        x = g.double()
        alpha = max(1 / t, 1 / window)
        d = x - (m if m is not None else 0)
        m = (m if m is not None else 0) + alpha * d
        v = (1 - alpha) * ((v if v is not None else 0) + alpha * d * d)
    z = v / v.max() if normalize == "max" and v.max() > 0 else (v * 0 if normalize == "max" else v)
    importance = torch.sigmoid(z / temperature)
    scaled = torch.where(importance > threshold, (1 - importance) * history[-1].double(), history[-1].double())
    return scaled, importance.max()


@pytest.mark.parametrize("normalize, threshold", [("none", 0.1), ("max", 0.6), ("none", 0.999)])
def test_element_mode_matches_float64_formulas(backend, normalize, threshold):
    ours = parameters(device_of(backend))
    protector = ff.GradientProtector(
        ours, window=5, threshold=threshold, mode="element", normalize=normalize, temperature=0.7, backend=backend
    )
    history = {name: [] for name, _ in ours}
    for step in range(12):  # past the 5 exact steps into the EMA; some parameters skip some steps
        set_gradients(ours, step, torch.Generator().manual_seed(step))
        for name, p in ours:
            if p.grad is not None:
                history[name].append(p.grad.cpu().clone())
        importance = protector.protect_()
        for i, (name, p) in enumerate(ours):
            if p.grad is None:
                assert importance[i].isnan()
                continue
            scaled, top = element_truth(history[name], 5, threshold, normalize, 0.7)
            torch.testing.assert_close(p.grad.cpu().double(), scaled, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(importance[i].cpu(), top, rtol=1e-5, atol=1e-6)


def test_element_mode_non_finite_step_and_state_size():
    named = parameters()
    protector = ff.GradientProtector(named, window=4, mode="element")
    numel = sum(p.numel() for _, p in named)
    assert protector.state_bytes() == 2 * 4 * numel + 8 * len(named)  # two fp32 per element, a step count per tensor
    for step in range(3):
        set_gradients(named, step, torch.Generator().manual_seed(step), skip=False)
        protector.protect_()
    state = protector.state_dict()
    state = {"mean": [t.clone() for t in state["mean"]], "var": [t.clone() for t in state["var"]]} | {
        "steps": state["steps"].clone()
    }
    set_gradients(named, 9, torch.Generator().manual_seed(9), skip=False)
    named[2][1].grad[0] = float("nan")
    before = [p.grad.clone() for _, p in named]
    assert protector.protect_().isnan().all() and protector.found_inf.item()
    assert all(torch.equal(a, b) for a, b in zip(protector.mean + protector.var, state["mean"] + state["var"]))
    assert torch.equal(protector.steps, state["steps"])
    for (_, p), g in zip(named, before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0, equal_nan=True)
    set_gradients(named, 10, torch.Generator().manual_seed(10), skip=False)
    assert protector.protect_().isfinite().all() and not protector.found_inf.item()


def test_element_mode_state_round_trip_continues_bitwise():
    protector = assert_state_round_trip_continues_bitwise(mode="element", normalize="max")
    with pytest.raises(ValueError, match="the state is of mode 'element' but this protector 'tensor'"):
        ff.GradientProtector(parameters(), window=6).load_state_dict(protector.state_dict())
