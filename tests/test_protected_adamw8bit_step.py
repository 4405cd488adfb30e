"""ff.protected_adamw8bit_step on every backend against its reference (dequantize -> the 32-bit step's reference ->
quantize), and the reference against bitsandbytes' 8-bit AdamW (CPU)."""

import contextlib
import warnings

import pytest
import torch
from conftest import device_of

import fastforget as ff
from fastforget.quantize import BLOCKSIZE, dequantize_blockwise, dynamic_map, quantize_blockwise
from fastforget.testing import assert_close

SHAPES = [(0,), (1,), (255,), (256,), (257,), (33, 7), (4097,)]
PARTS = {
    "plain": (),
    "ewc": ("ewc",),
    "ewc8": ("ewc", "fisher8"),
    "tensor": ("tensor",),
    "element": ("element",),
    "si": ("si",),
    "all_tensor": ("ewc", "tensor", "si"),
    "all_element": ("ewc", "fisher8", "element", "si"),
}
HYPER = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, threshold=0.55)
WRITTEN = ("params", "exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax", "steps", "ema_mean", "ema_var",
           "omega")  # fmt: skip


def quantized_state(values, signed):
    """(codes, absmax) lists of fp32 values."""
    pairs = [quantize_blockwise(v, dynamic_map(signed, v.device)) for v in values]
    return [c for c, _ in pairs], [a for _, a in pairs]


def make_case(shapes, param_dtype, parts, device, seed=0, anchor_dtype=torch.float32):
    """The keyword arguments of one call (moments drawn over decades, as trained moments are)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, dtype=torch.float32, positive=False):
        x = torch.rand(shape, generator=gen) if positive else torch.randn(shape, generator=gen)
        return x.to(device, dtype)

    def moment(shape, positive=False):
        spread = 10 ** (-4 * torch.rand(shape, generator=gen)).to(device)
        return 0.1 * rand(shape, positive=positive) * spread

    count = len(shapes)
    exp_avg, exp_avg_absmax = quantized_state([moment(s) for s in shapes], signed=True)
    exp_avg_sq, exp_avg_sq_absmax = quantized_state([moment(s, positive=True) ** 2 for s in shapes], signed=False)
    kw = dict(
        params=[rand(s, param_dtype) for s in shapes],
        grads=[rand(s, param_dtype) for s in shapes],
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_absmax=exp_avg_sq_absmax,
        steps=[torch.tensor(float(3 * i), device=device) for i in range(count)],
    )
    if "ewc" in parts:
        kw.update(anchors=[rand(s, anchor_dtype) for s in shapes], lam=0.7)
        fisher = [rand(s, positive=True) for s in shapes]
        if "fisher8" in parts:
            kw["fisher"], kw["fisher_absmax"] = quantized_state(fisher, signed=False)
        else:
            kw["fisher"] = fisher
    if "tensor" in parts:
        kw.update(factors=rand(count, positive=True))
    if "element" in parts:
        kw.update(
            ema_mean=[rand(s) for s in shapes],
            ema_var=[rand(s, positive=True) for s in shapes],
            alpha=torch.linspace(0.1, 1.0, count, device=device),
            var_scale=torch.full((count,), 0.25, device=device),  # unsaturated: 1 - sigmoid keeps its digits
        )
    if "si" in parts:
        kw.update(omega=[rand(s) for s in shapes])
    return kw


def clone(kw):
    return {k: [t.clone() for t in v] if isinstance(v, list) else v for k, v in kw.items()}


def run(kw, backend, **extra):
    return ff.protected_adamw8bit_step(**kw, **HYPER, **extra, backend=backend)


def _bnb():
    return pytest.importorskip("bitsandbytes")


@contextlib.contextmanager
def bnb_nearest_quantizer():
    """bitsandbytes' CPU ops with its CPU quantize kernel (a 65,536-bin table) replaced by its own default
    backend's (nearest map entry, the rule of its CUDA kernel and ours), for the length of the block."""
    _bnb()
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    default = torch.ops.bitsandbytes.quantize_blockwise.default

    def nearest(A, code, blocksize):
        return default.redispatch(keys, A, code, blocksize)

    with torch.library._scoped_library("bitsandbytes", "IMPL") as lib, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Warning only once for all operators")  # the override is the point
        lib.impl("quantize_blockwise", nearest, "CPU")
        yield


def bnb_adam_step(p, g, state, step, lr, betas, eps, weight_decay):
    """One bitsandbytes 8-bit blockwise Adam(W) step (its CPU op) on state = [codes1, codes2, absmax1, absmax2]."""
    codes1, codes2, absmax1, absmax2 = state
    torch.ops.bitsandbytes.optimizer_update_8bit_blockwise(
        "adam", g, p, codes1, codes2, betas[0], betas[1], 0.0, 0.0, eps, step, lr, dynamic_map(True),
        dynamic_map(False), absmax1, absmax2, weight_decay, 1.0, False,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(4097,), (33, 17), (257,)], ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_is_bitsandbytes_adamw8bit(shape, backend):
    """Plain AdamW over several steps: the reference and the C++ kernel against bitsandbytes' CPU 8-bit Adam using
    its own nearest-code quantizer (that of its CUDA kernel). Its first moment is m beta1 + (1 - beta1) g where
    torch (and we) lerp, so a rounding tie can fall differently: a handful of codes may be one apart."""
    if backend == "cpu" and not ff.available_backends()["cpu"]:
        pytest.skip("no C++ build")
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen)
    state = [torch.full(shape, 127, dtype=torch.uint8), torch.zeros(shape, dtype=torch.uint8)]
    state += [torch.zeros(-(-p.numel() // BLOCKSIZE)), torch.zeros(-(-p.numel() // BLOCKSIZE))]
    assert float(dynamic_map(True)[127]) == 0.0
    ours, step = [p.clone(), *(t.clone() for t in state)], torch.zeros(())
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    with bnb_nearest_quantizer():
        for k in range(6):
            g = torch.randn(shape, generator=gen)
            bnb_adam_step(p, g, state, k + 1, **hyper)
            ff.protected_adamw8bit_step([ours[0]], [g], *([t] for t in ours[1:]), [step], **hyper, backend=backend)
            for name, got, want in zip(("exp_avg", "exp_avg_sq"), ours[1:3], state[:2]):
                off = (got.int() - want.int()).abs()
                assert bool((off <= 1).all()) and int((off > 0).sum()) <= 4, (k, name)
            assert_close(ours[3], state[2], torch.float32)
            assert_close(ours[4], state[3], torch.float32)
            assert_close(ours[0], p, torch.float32)
    assert float(step) == 6


def test_reference_against_stock_bitsandbytes_cpu():
    """One step from the same state with bitsandbytes' stock CPU op: the params agree (both update them from the
    unquantized moments) and so do the scales; its table quantizer puts some codes a few entries off, never
    nearer than ours."""
    bnb = _bnb()  # noqa: F841
    kw = make_case([(4097,)], torch.float32, (), torch.device("cpu"), seed=2)
    kw["steps"] = [torch.tensor(4.0)]
    p = kw["params"][0].clone()
    state = [kw[k][0].clone() for k in ("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax")]
    hyper = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    bnb_adam_step(p, kw["grads"][0], state, 5, **hyper)
    ff.protected_adamw8bit_step(**kw, **hyper, backend="reference")
    assert_close(kw["params"][0], p, torch.float32)
    assert_close(kw["exp_avg_absmax"][0], state[2], torch.float32)
    assert_close(kw["exp_avg_sq_absmax"][0], state[3], torch.float32)


def test_reference_composes_the_32bit_reference():
    """With a float Fisher equal to the 8-bit one dequantized, both forms give the same step."""
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], torch.device("cpu"))
    floats = clone(kw)
    unsigned = dynamic_map(False)
    floats["fisher"] = [dequantize_blockwise(c, a, unsigned) for c, a in zip(kw["fisher"], floats.pop("fisher_absmax"))]
    assert torch.equal(run(kw, "reference"), run(floats, "reference"))
    for key in WRITTEN:
        assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), floats.get(key, []))), key


# ---------------------------------------------------------------------------------------------------- every backend


def assert_state_close(got, want, param_dtype):
    """Params, scales and float state to the tolerance table; codes equal but for a handful one entry apart
    (a new moment on a rounding midpoint, where the kernel's fp32 arithmetic and the reference's may differ)."""
    for key in WRITTEN:
        for g, w in zip(got.get(key, []), want.get(key, [])):
            assert g.dtype == w.dtype and g.shape == w.shape, key
            if g.dtype == torch.uint8:
                off = (g.int() - w.int()).abs()
                assert bool((off <= 1).all()) and int((off > 0).sum()) <= 4, key
            elif key != "omega" or param_dtype == torch.float32:
                assert_close(g, w, param_dtype if key == "params" else torch.float32)


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


@pytest.mark.parametrize("parts", ["ewc8", "all_element"])
def test_half_params_bf16_anchors_grad_scale_and_maximize(backend, parts):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.float16, PARTS[parts], device, anchor_dtype=torch.bfloat16)
    want = clone(kw)
    extra = dict(grad_scale=torch.tensor(64.0, device=device), found_inf=torch.zeros((), device=device))
    assert_close(run(kw, backend, maximize=True, **extra), run(want, "reference", maximize=True, **extra))
    assert_state_close(kw, want, torch.float16)


@pytest.mark.parametrize("parts", ["plain", "all_tensor", "all_element"])
def test_skipped_step_changes_nothing(backend, parts):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.bfloat16, PARTS[parts], device)
    before = clone(kw)
    penalty = run(kw, backend, found_inf=torch.ones((), device=device), grad_scale=torch.tensor(2.0, device=device))
    assert float(penalty) == 0.0
    for key in (*WRITTEN, "grads", "fisher", "fisher_absmax"):
        assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), before.get(key, []))), key


def _bad_cases(kw, device):
    n = len(kw["params"])
    return [
        (dict(grads=kw["grads"][:-1]), ValueError, "grads has"),
        (dict(params=[p.double() for p in kw["params"]]), TypeError, r"params\[0\] has dtype"),
        (dict(exp_avg=[t.float() for t in kw["exp_avg"]]), TypeError, r"exp_avg\[0\] has dtype"),
        (dict(exp_avg_sq=[t.t() if t.dim() == 2 else t for t in kw["exp_avg_sq"]]), ValueError, "shape|contiguous"),
        (dict(exp_avg_absmax=kw["exp_avg_absmax"][:-1]), ValueError, "exp_avg_absmax has"),
        (
            dict(exp_avg_sq_absmax=[torch.zeros(a.numel() + 1, device=device) for a in kw["exp_avg_sq_absmax"]]),
            ValueError,
            r"exp_avg_sq_absmax\[0\] must be a contiguous tensor of shape",
        ),  # fmt: skip
        (dict(exp_avg_absmax=[a.double() for a in kw["exp_avg_absmax"]]), TypeError, r"exp_avg_absmax\[0\] has dtype"),
        (dict(qmap_signed=torch.zeros(255, device=device)), ValueError, "qmap_signed must be"),
        (dict(qmap_unsigned=torch.zeros(256, device=device, dtype=torch.float64)), ValueError, "qmap_unsigned must"),
        (dict(steps=kw["steps"][:-1]), ValueError, "steps has"),
        (dict(fisher=[]), ValueError, "anchors and fisher come together"),
        (dict(fisher_absmax=kw["fisher_absmax"][:-1]), ValueError, "fisher_absmax has"),
        (dict(fisher=[f.float() for f in kw["fisher"]]), TypeError, r"fisher\[0\] has dtype"),
        (dict(fisher=[f.int() for f in kw["fisher"]], fisher_absmax=()), TypeError, r"fisher\[0\] has dtype"),
        (dict(factors=torch.ones(n + 1, device=device)), ValueError, "factors must be"),
        (dict(alpha=None), ValueError, "come together"),
        (dict(omega=kw["omega"][1:]), ValueError, "omega has"),
        (dict(exp_avg_absmax=kw["exp_avg_sq_absmax"]), ValueError, "overlap in memory"),
        (dict(params=[kw["params"][0]] * n), ValueError, "same tensor"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(betas=(1.0, 0.9)), ValueError, "betas"),
    ]


def test_rejects_bad_input_and_changes_nothing(backend):
    device = device_of(backend)
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], device)
    before = clone(kw)
    for change, error, match in _bad_cases(kw, device):
        args = {**kw, **HYPER, **change}
        with pytest.raises(error, match=match):
            ff.protected_adamw8bit_step(**args, backend=backend)
        for key in WRITTEN:
            assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), before.get(key, []))), (change, key)


def _op_args(kw, device, found_inf=0.0):
    return (
        kw["params"], kw["grads"], kw["exp_avg"], kw["exp_avg_sq"], kw["exp_avg_absmax"], kw["exp_avg_sq_absmax"],
        dynamic_map(True, device), dynamic_map(False, device), kw["steps"], kw["anchors"], kw["fisher"],
        kw["fisher_absmax"], None, kw["ema_mean"], kw["ema_var"], kw["alpha"], kw["var_scale"], kw["omega"],
        torch.tensor(2.0, device=device), torch.tensor(found_inf, device=device), 0.01, 0.9, 0.99, 1e-8, 0.01, 0.5,
        0.55, False,
    )  # fmt: skip


def native_op(backend):
    """The backend's op; skips the test while that backend has no kernel of it (the reference runs instead)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key(
        ff.dispatch.native_op("protected_adamw8bit_step", backend).name(), device_of(backend).type.upper()
    ):
        pytest.skip(f"the {backend} backend has no protected_adamw8bit_step kernel in this build")
    return ff.dispatch.native_op("protected_adamw8bit_step", backend)


def test_native_op_checks_before_writing(fused_backend):
    op = native_op(fused_backend)
    device = device_of(fused_backend)
    kw = make_case(SHAPES, torch.float32, PARTS["all_element"], device)
    before = clone(kw)
    for key in ("grads", "exp_avg", "exp_avg_absmax", "exp_avg_sq_absmax", "fisher_absmax", "omega", "fisher"):
        bad = clone(kw)
        bad[key] = bad[key][:-1]
        bad["params"] = kw["params"]
        with pytest.raises(RuntimeError):
            op(*_op_args(bad, device))
        assert all(torch.equal(a, b) for a, b in zip(kw["params"], before["params"])), key
    wrong = clone(kw)
    wrong["exp_avg_absmax"] = [torch.zeros(a.numel() + 1, device=device) for a in kw["exp_avg_absmax"]]
    with pytest.raises(RuntimeError, match="exp_avg_absmax"):
        op(*_op_args(wrong, device))
    assert all(torch.equal(a, b) for a, b in zip(kw["params"], before["params"]))


def test_opcheck(fused_backend):
    op = native_op(fused_backend)
    device = device_of(fused_backend)
    kw = make_case([(4, 3), (0,), (300,)], torch.float32, PARTS["all_element"], device)
    for found_inf in (0.0, 1.0):
        torch.library.opcheck(op, _op_args(clone(kw), device, found_inf))


def test_torch_compile_fullgraph():
    kw = make_case([(33, 7), (1025,)], torch.float32, PARTS["all_element"], torch.device("cpu"))
    want = clone(kw)

    def step(kw):
        return ff.protected_adamw8bit_step(**kw, **HYPER, backend="cpu")

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(kw)
    assert torch.equal(got, step(want))
    for key in WRITTEN:
        assert all(torch.equal(a, b) for a, b in zip(kw.get(key, []), want.get(key, []))), key


# ---------------------------------------------------------------------------------------------------- the quantizer


def _bf16_buckets(maps):
    """Per map, the top 16 bits (the bf16 bucket) of each midpoint."""
    return [(((m[:-1] + m[1:]) / 2).view(torch.int32) >> 16) for m in maps]


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_has_one_boundary_per_bf16_bucket(signed):
    """What the CPU kernel's table lookup relies on (csrc/cpu/quantize.h), checked over every bucket: no two
    midpoints of the map share a bf16 bucket, and none lies below 2^-23 in magnitude."""
    code = dynamic_map(signed)
    midpoints = (code[:-1] + code[1:]) / 2
    (buckets,) = _bf16_buckets([code])
    assert buckets.unique().numel() == buckets.numel() == 255
    assert bool((midpoints.abs() >= 2.0**-23).all())


def _probe_values():
    """Values in [-1, 1] where a table lookup can go wrong: both ends of every bf16 bucket and their neighbours,
    every midpoint of both maps and 3 floats either side, the smallest magnitudes, and random floats."""
    tops = torch.arange(0, 0x3F81, dtype=torch.int32)
    edges = torch.cat([tops << 16, (tops << 16) | 0xFFFF])
    edges = torch.cat([edges - 1, edges, edges + 1]).clamp(0, 0x3F800000)
    maps = [dynamic_map(True), dynamic_map(False)]
    midpoints = torch.cat([((m[:-1] + m[1:]) / 2).abs() for m in maps]).view(torch.int32)
    near = torch.cat([midpoints + k for k in range(-3, 4)])
    tiny = torch.tensor([0, 1, 2**23 - 1, 0x34000000 - 1, 0x34000000, 0x34000000 + 1], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    random_bits = torch.randint(0, 0x3F800001, (1 << 18,), generator=gen, dtype=torch.int32)
    magnitudes = torch.cat([edges, near, tiny, random_bits]).view(torch.float32)
    values = torch.cat([magnitudes, -magnitudes, torch.rand(1 << 16, generator=gen) * 2 - 1])
    return values[torch.randperm(values.numel(), generator=gen)]


def _quantizer_case(values, qmap_signed, qmap_unsigned):
    """A step whose new moments are exactly values (beta1 = beta2 = 0 from zero moments: m1 = g, m2 = g^2) with
    one 1.0 per block, so that x * (1 / absmax) is x itself."""
    blocks = values.reshape(-1, BLOCKSIZE - 1)
    g = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    n = g.numel()
    zero = dynamic_map(True).abs().argmin().to(torch.uint8)
    kw = dict(
        params=[torch.zeros(n)], grads=[g], exp_avg=[torch.full((n,), int(zero), dtype=torch.uint8)],
        exp_avg_sq=[torch.zeros(n, dtype=torch.uint8)], exp_avg_absmax=[torch.zeros(n // BLOCKSIZE)],
        exp_avg_sq_absmax=[torch.zeros(n // BLOCKSIZE)], steps=[torch.zeros(())], qmap_signed=qmap_signed,
        qmap_unsigned=qmap_unsigned,
    )  # fmt: skip
    return kw, g


def _run_quantizer(values, qmap_signed, qmap_unsigned):
    values = values[: values.numel() // (BLOCKSIZE - 1) * (BLOCKSIZE - 1)]
    kw, g = _quantizer_case(values, qmap_signed, qmap_unsigned)
    ff.protected_adamw8bit_step(**kw, lr=0.0, betas=(0.0, 0.0), weight_decay=0.0, backend="cpu")
    for codes, absmax, moment, qmap in ((kw["exp_avg"], kw["exp_avg_absmax"], g, qmap_signed),
                                        (kw["exp_avg_sq"], kw["exp_avg_sq_absmax"], g * g, qmap_unsigned)):  # fmt: skip
        want_codes, want_absmax = quantize_blockwise(moment, qmap)
        assert torch.equal(absmax[0], want_absmax)
        mismatch = (codes[0] != want_codes).nonzero().flatten()
        assert mismatch.numel() == 0, (moment[mismatch[:5]].tolist(), codes[0][mismatch[:5]], want_codes[mismatch[:5]])


@pytest.mark.skipif("cpu" not in ff.available_backends() or not ff.available_backends()["cpu"], reason="no C++ build")
def test_cpu_quantizer_is_the_nearest_code_exactly():
    """The table lookup against the reference's bucketize on every bf16-bucket edge, every midpoint's neighbours
    and random values (both maps: m1 signed, m2 = g^2 unsigned)."""
    _run_quantizer(_probe_values(), dynamic_map(True), dynamic_map(False))


@pytest.mark.skipif("cpu" not in ff.available_backends() or not ff.available_backends()["cpu"], reason="no C++ build")
def test_cpu_quantizer_with_other_maps():
    """Maps without the one-boundary-per-bucket property (a uniform map has a midpoint at 0; a crowded one two
    midpoints in one bucket) take the binary search, with the same result."""
    uniform = torch.linspace(-1, 1, 256)
    crowded = uniform.clone()
    crowded[192:195] = torch.tensor([0.5, 0.5 + 2.0**-20, 0.5 + 2.0**-19])
    assert bool((crowded[1:] > crowded[:-1]).all())
    gen = torch.Generator().manual_seed(6)
    values = torch.cat([_probe_values()[: 1 << 16], torch.rand(1 << 14, generator=gen) * 0.04 + 0.49])
    _run_quantizer(values, uniform, crowded.abs().sort().values)
    _run_quantizer(values, crowded, uniform.abs().sort().values)


def test_empty_list():
    assert float(ff.protected_adamw8bit_step([], [], [], [], [], [], [], lr=0.1)) == 0.0
