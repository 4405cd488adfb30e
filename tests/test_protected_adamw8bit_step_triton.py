"""The Triton kernel of protected_adamw8bit_step (kernels/protected_adamw8bit_step.py) against its reference
(dequantize -> the 32-bit step's reference -> quantize back): odd sizes around the 256-element quantization block,
fp32 and bf16 params, EWC with a float or an 8-bit Fisher, both protections, SI, a skipped step. Tiny sizes: on a
CPU-only machine the kernel runs in Triton's interpreter."""

import pytest
import torch
from conftest import device_of

from fastforget.ops.protected_adamw8bit_step import protected_adamw8bit_step, protected_adamw8bit_step_ref
from fastforget.quantize import dynamic_map, quantize_blockwise
from fastforget.testing import assert_close

SIZES = [1, 255, 257, 600]
CASES = {
    # name: (ewc: None / "float" / "8bit", protection: None / "tensor" / "element", si, maximize)
    "plain": (None, None, False, False),
    "ewc-float-si": ("float", None, True, False),
    "ewc-8bit-tensor": ("8bit", "tensor", False, True),
    "element-si": (None, "element", True, False),
    "ewc-8bit-element-si": ("8bit", "element", True, False),
}
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, threshold=0.55)


def make_case(sizes, dtype, ewc, protection, si, seed=0):
    """Keyword arguments of one call on the Triton backend's device: 8-bit moments quantized from random fp32 ones
    (a zero block included)."""
    gen = torch.Generator().manual_seed(seed)  # the same numbers on every machine, moved to the device
    device = device_of("triton")

    def randn(n, scale=1.0, dtype=torch.float32):
        return (scale * torch.randn(n, generator=gen)).to(device, dtype)

    def rand(n, scale=1.0):
        return scale * torch.rand(n, generator=gen).to(device)

    signed, unsigned = dynamic_map(True, device), dynamic_map(False, device)
    m1 = [randn(n, 1e-2) for n in sizes]
    m2 = [rand(n, 1e-4) for n in sizes]
    m1[-1][:256] = 0  # an all-zero block: absmax 0
    q1, q2 = [quantize_blockwise(m, signed) for m in m1], [quantize_blockwise(m, unsigned) for m in m2]
    count = len(sizes)
    kw = dict(
        params=[randn(n, dtype=dtype) for n in sizes],
        grads=[randn(n, 0.1, dtype=dtype if i % 2 else torch.float32) for i, n in enumerate(sizes)],
        exp_avg=[c for c, _ in q1],
        exp_avg_sq=[c for c, _ in q2],
        exp_avg_absmax=[a for _, a in q1],
        exp_avg_sq_absmax=[a for _, a in q2],
        steps=[torch.tensor(float(2 + i)) for i in range(count)],
        qmap_signed=signed,
        qmap_unsigned=unsigned,
    )
    if ewc:
        anchors = [(p.float() + randn(n, 0.1)).to(torch.bfloat16) for p, n in zip(kw["params"], sizes)]
        fisher = [rand(n) for n in sizes]
        kw.update(anchors=anchors, lam=0.7)
        if ewc == "8bit":
            quantized = [quantize_blockwise(f, unsigned) for f in fisher]
            kw.update(fisher=[c for c, _ in quantized], fisher_absmax=[a for _, a in quantized])
        else:
            kw.update(fisher=fisher)
    if protection == "tensor":
        kw.update(factors=rand(count) + 0.5)
    if protection == "element":
        kw.update(ema_mean=[randn(n, 0.1) for n in sizes], ema_var=[rand(n, 0.02) for n in sizes],
                  alpha=torch.full((count,), 0.3), var_scale=torch.full((count,), 50.0))  # fmt: skip
    if si:
        kw.update(omega=[randn(n) for n in sizes])
    return kw


WRITTEN = ("params", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "steps", "ema_mean", "ema_var",
           "omega")  # fmt: skip

POSITIONAL = ("params", "grads", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "steps")


def clone(kw):
    return {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in kw.items()}


def reference(kw, **extra):
    """protected_adamw8bit_step_ref with the public function's defaults and argument order."""
    beta1, beta2 = HYPER["betas"]
    args = [kw[k] for k in POSITIONAL[:-1]]
    args += [kw["qmap_signed"], kw["qmap_unsigned"], kw["steps"], kw.get("anchors", []), kw.get("fisher", [])]
    args += [kw.get("fisher_absmax", []), kw.get("factors"), kw.get("ema_mean", []), kw.get("ema_var", [])]
    args += [kw.get("alpha"), kw.get("var_scale"), kw.get("omega", []), extra.get("grad_scale")]
    args += [extra.get("found_inf"), HYPER["lr"], beta1, beta2, HYPER["eps"], HYPER["weight_decay"], kw.get("lam", 0.0)]
    return protected_adamw8bit_step_ref(*args, HYPER["threshold"], extra.get("maximize", False))


def triton_step(kw, **extra):
    keywords = {k: v for k, v in kw.items() if k not in POSITIONAL}
    return protected_adamw8bit_step(*[kw[k] for k in POSITIONAL], **keywords, **HYPER, **extra, backend="triton")


def assert_codes_close(got, want):
    """Equal codes except where the two sides' fp32 moments straddle a midpoint (then one apart): a handful."""
    differ = got != want
    assert int(differ.sum()) <= max(2, got.numel() // 200), f"{int(differ.sum())} of {got.numel()} codes differ"
    assert int((got.int() - want.int()).abs().max()) <= 1


def assert_step_close(got, want, dtype):
    for key in WRITTEN:
        for g, w in zip(got.get(key, []), want.get(key, [])):
            assert g.dtype == w.dtype and g.shape == w.shape, key
            if g.dtype == torch.uint8:
                assert_codes_close(g, w)
            elif key != "omega" or dtype == torch.float32:
                assert_close(g, w, dtype if key == "params" else torch.float32)
    if dtype == torch.bfloat16:
        # omega -= g_task (theta_new - theta_old) with theta_new rounded to bf16: where the two sides round a new
        # theta differently (Triton's interpreter truncates), omega differs by |g_task| times one ulp of theta
        for w_got, w_want, g, p in zip(got.get("omega", []), want.get("omega", []), got["grads"], want["params"]):
            bound = g.double().abs() * torch.finfo(dtype).eps * p.double().abs() + 1e-6 + 1e-5 * w_want.double().abs()
            assert bool(((w_got.double() - w_want.double()).abs() <= bound).all())


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference(backend, case, dtype):
    ewc, protection, si, maximize = CASES[case]
    kw = make_case(SIZES, dtype, ewc, protection, si)
    extra = dict(grad_scale=torch.tensor(2.0), maximize=maximize)
    got, want = clone(kw), clone(kw)
    penalty = triton_step(got, **extra)
    expected = reference(want, **extra)
    assert_close(penalty, expected, torch.float32)
    assert_step_close(got, want, dtype)


@pytest.mark.parametrize("backend", ["triton"])
@pytest.mark.parametrize("size", SIZES)
def test_one_tensor(backend, size):
    """One tensor per launch: a program whose rows run past the tensor's end, or a single partial block."""
    kw = make_case([size], torch.float32, "8bit", None, True, seed=size)
    got, want = clone(kw), clone(kw)
    assert_close(triton_step(got), reference(want), torch.float32)
    assert_step_close(got, want, torch.float32)


@pytest.mark.parametrize("backend", ["triton"])
def test_skipped_step_writes_nothing(backend):
    kw = make_case(SIZES, torch.bfloat16, "8bit", "element", True)
    got = clone(kw)
    penalty = triton_step(got, found_inf=torch.tensor(1.0))
    assert penalty.item() == 0.0
    for key in WRITTEN:
        for g, w in zip(got.get(key, []), kw.get(key, [])):
            assert torch.equal(g, w), key


def strided(t):
    """t's values in a non-contiguous view (every other element of a buffer)."""
    buffer = torch.zeros(t.numel(), 2, dtype=t.dtype)
    buffer[:, 0] = t
    return buffer[:, 0]


@pytest.mark.parametrize("backend", ["triton"])
def test_mixed_dtypes_and_a_strided_param(backend):
    """fp32 and bf16 params in one list (two launch groups), one of them a strided view updated through a copy."""
    kw = make_case(SIZES, torch.float32, "float", "tensor", False, seed=3)
    kw["params"][1] = kw["params"][1].to(torch.bfloat16)
    got, want = clone(kw), clone(kw)
    got["params"][2] = strided(got["params"][2])
    assert_close(triton_step(got), reference(want), torch.float32)
    assert_step_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton"])
def test_two_steps_from_zero_state(backend):
    """From bitsandbytes' initial state (all codes of 0, absmax 0), two steps: the second dequantizes the first's."""
    sizes = [300, 40]
    kw = make_case(sizes, torch.float32, None, None, False, seed=5)
    for key, qmap in (("exp_avg", kw["qmap_signed"]), ("exp_avg_sq", kw["qmap_unsigned"])):
        zero = int(torch.nonzero(qmap == 0)[0])
        kw[key] = [torch.full((n,), zero, dtype=torch.uint8) for n in sizes]
        kw[key + "_absmax"] = [torch.zeros(-(-n // 256)) for n in sizes]
    got, want = clone(kw), clone(kw)
    for _ in range(2):
        triton_step(got)
        reference(want)
        assert_step_close(got, want, torch.float32)
