"""The CUDA kernels (csrc/cuda/*.cuh) run on the CPU through csrc/emu/cuda_emu.h, against the ``*_ref`` ops.

No GPU runs in CI, so the kernels' logic is proven here: a small shared library (csrc/emu/emu_launchers.cpp, built
with g++ at test time and cached by source hash) exposes every launcher on CPU memory; each check runs under several
schedule seeds (threads in a random order, preempted at random points: a race or a missing barrier changes the
result) and asserts the seeds agree bitwise, as the kernels' fixed-order reductions promise. The host side mirrors
the bindings (csrc/cuda/*.cu): contiguous copies written back, acc_t scalars, the metadata packed by the same
``pack_meta_words``. ``test_planted_bugs_are_caught`` rebuilds the library from mutated copies of the headers and
asserts that the checks fail for each planted bug.
"""

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from fastforget.ops.anchored_lm_loss import anchored_lm_loss_ref
from fastforget.ops.ewc_penalty import ewc_penalty_accumulate_ref, ewc_penalty_ref
from fastforget.ops.fisher_update import fisher_update_ref
from fastforget.ops.grad_ema import grad_ema_protect_ref, grad_ema_stats_ref
from fastforget.ops.grad_moments import grad_moments_ref
from fastforget.ops.protected_adamw8bit_step import protected_adamw8bit_step_ref
from fastforget.ops.protected_adamw_step import protected_adamw_step_ref
from fastforget.ops.scale_grads import scale_grads_ref
from fastforget.ops.weight_merge import weight_merge_ref
from fastforget.quantize import dynamic_map, quantize_blockwise
from fastforget.testing import TOLERANCES, assert_close

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas"]
SEEDS = (0, 1, 2)
CHUNK, BLOCK = 4096, 256  # multi_tensor.cuh's kChunkSize and kBlockThreads
SIZES = [1, BLOCK - 1, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 1]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.uint8: 4}

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX})")


# ---------------------------------------------------------------------------------------------------- the library


def _sources(root):
    """Everything the library is built from: the emulator, the kernel headers and the shared per-element math."""
    return [*sorted((root / "emu").glob("*")), *sorted((root / "cuda").glob("*.cuh")), root / "elementwise.h"]


def _cache_dir():
    """~/.cache/fastforget/cuda_emu ($XDG_CACHE_HOME honoured), or the temporary directory where that is read-only."""
    for base in (Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")), Path(tempfile.gettempdir())):
        try:
            (base / "fastforget" / "cuda_emu").mkdir(parents=True, exist_ok=True)
            return base / "fastforget" / "cuda_emu"
        except OSError:
            continue
    raise OSError("no writable cache directory for the emulated launchers")


def build_library(root=CSRC):
    """The emulated launchers built from root's emu/ and cuda/*.cuh, cached under ~/.cache by their hash."""
    digest = hashlib.sha256(" ".join([CXX, *FLAGS]).encode())
    for path in _sources(root):
        digest.update(path.name.encode() + path.read_bytes())
    cache = _cache_dir()
    target = cache / f"libffemu-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / target.name
            cmd = [CXX, *FLAGS, f"-I{root / 'emu'}", str(root / "emu" / "emu_launchers.cpp"), "-o", str(built)]
            build = subprocess.run(cmd, capture_output=True, text=True)
            assert build.returncode == 0, f"building the emulated launchers failed:\n{build.stderr}"
            os.replace(built, target)  # atomic: concurrent builders never load a half-written file
    return Emulator(ctypes.CDLL(str(target)))


class LaunchError(RuntimeError):
    pass


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _acc(tensors):
    """The bindings' accumulate_type: fp64 when any tensor is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _contiguous(tensors):
    return [t.contiguous() for t in tensors]


def _copy_back(tensors, work):
    for t, w in zip(tensors, work):
        if w.data_ptr() != t.data_ptr():
            t.copy_(w)


class Emulator:
    """The host side of csrc/cuda/*.cu on CPU tensors, launching through the emulated launchers."""

    def __init__(self, lib):
        self.lib = lib
        lib.ff_emu_last_message.restype = ctypes.c_char_p
        lib.ff_emu_seed.argtypes = [ctypes.c_uint64]

    def seed(self, seed):
        self.lib.ff_emu_seed(seed)

    def _call(self, name, *args):
        err = getattr(self.lib, name)(*args)
        if err:
            raise LaunchError(f"{name}: cudaError {err}: {self.lib.ff_emu_last_message().decode()}")

    @staticmethod
    def _lists(roles):
        """(n, numel, ptr, dtype) as pack_meta builds them: role r of tensor i at [r * n + i]; absent roles null."""
        n = len(roles[0])
        numel = (ctypes.c_int64 * max(n, 1))(*[t.numel() for t in roles[0]])
        ptrs = [lst[i].data_ptr() if lst else 0 for lst in roles for i in range(n)]
        codes = [CODES[lst[i].dtype] if lst else 0 for lst in roles for i in range(n)]
        size = max(len(ptrs), 1)
        return ctypes.c_int64(n), numel, (ctypes.c_int64 * size)(*ptrs), (ctypes.c_int64 * size)(*codes)

    def ewc_penalty(self, params, anchors, fisher, lam, grads=None):
        acc = _acc(params)
        out = torch.empty((), dtype=acc)
        work = _contiguous(grads) if grads is not None else []
        roles = [_contiguous(params), _contiguous(anchors), _contiguous(fisher), work]
        self._call("ff_emu_ewc_penalty", *self._lists(roles), ctypes.c_double(lam), int(grads is not None),
                   int(acc == torch.float64), _ptr(out))  # fmt: skip
        if grads is not None:
            _copy_back(grads, work)
        return out

    def ewc_penalty_backward(self, params, anchors, fisher, lam, grad_out):
        acc = _acc(params)
        p = _contiguous(params)
        grads = [torch.empty_like(t) for t in p]
        g = grad_out.to(acc).reshape(())
        roles = [p, _contiguous(anchors), _contiguous(fisher), grads]
        self._call("ff_emu_ewc_penalty_backward", *self._lists(roles), ctypes.c_double(lam), _ptr(g),
                   int(acc == torch.float64))  # fmt: skip
        return grads

    def fisher_update(self, fisher, grads, decay, scale, absolute):
        work, g = _contiguous(fisher), _contiguous(grads)
        samples = [1 if gi.dim() == f.dim() else gi.shape[0] for f, gi in zip(work, g)]
        self._call("ff_emu_fisher_update", *self._lists([work, g]), (ctypes.c_int64 * max(len(samples), 1))(*samples),
                   ctypes.c_double(decay), ctypes.c_double(scale), int(absolute),
                   int(_acc(fisher) == torch.float64))  # fmt: skip
        _copy_back(fisher, work)

    def scale_grads(self, grads, factors):
        work = _contiguous(grads)
        f = factors.to(_acc(grads)).contiguous()
        self._call("ff_emu_scale_grads", *self._lists([work]), _ptr(f), int(f.dtype == torch.float64))
        _copy_back(grads, work)

    def weight_merge(self, out, models, weights, fisher=None, floors=None):
        acc = _acc(out)
        work = _contiguous(out)
        sources = [_contiguous(m) for m in models]
        flat, flat_fisher = [t for m in sources for t in m], [t for f in fisher or [] for t in _contiguous(f)]
        count = len(flat)
        src = self._lists([flat, flat_fisher])[1:]  # (numel, ptr, dtype) of the count (model, Fisher) records
        coefs = torch.tensor([*weights, *(floors or [])], dtype=acc)
        self._call("ff_emu_weight_merge", *self._lists([work]), ctypes.c_int64(count), *src,
                   ctypes.c_int64(len(weights)), _ptr(coefs), int(fisher is not None),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(out, work)

    def grad_ema_stats(self, grads, mean, var, inv_scale, alpha):
        acc = _acc(mean)
        out = torch.zeros(len(grads), dtype=acc)
        scale, alphas = inv_scale.to(acc).reshape(1), alpha.to(acc).contiguous()
        self._call("ff_emu_grad_ema_stats", *self._lists([_contiguous(grads), mean, var]), _ptr(scale), _ptr(alphas),
                   _ptr(out), int(acc == torch.float64))  # fmt: skip
        return out

    def grad_ema_protect(self, grads, mean, var, inv_scale, alpha, var_scale, skip, threshold):
        acc = _acc(mean)
        work = _contiguous(grads)
        scale, alphas, scales = inv_scale.to(acc).reshape(1), alpha.to(acc).contiguous(), var_scale.to(acc)
        flag = skip.to(torch.bool).reshape(1)
        self._call("ff_emu_grad_ema_protect", *self._lists([work, mean, var]), _ptr(scale), _ptr(alphas),
                   _ptr(scales.contiguous()), _ptr(flag), ctypes.c_double(threshold),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(grads, work)

    def grad_moments(self, grads, inv_scale):
        acc = _acc(grads)
        out = torch.empty(len(grads), 3, dtype=acc)
        scale = torch.as_tensor(inv_scale, dtype=acc).reshape(1)
        self._call("ff_emu_grad_moments", *self._lists([_contiguous(grads)]), _ptr(scale), _ptr(out),
                   int(acc == torch.float64))  # fmt: skip
        return out

    def protected_adamw_step(self, params, grads, exp_avg, exp_avg_sq, steps, anchors, fisher, factors, ema_mean,
                             ema_var, alpha, var_scale, omega, grad_scale, found_inf, lr, beta1, beta2, eps,
                             weight_decay, lam, threshold, maximize):  # fmt: skip
        acc = _acc(params)
        work = _contiguous(params)
        roles = [work, _contiguous(grads), exp_avg, exp_avg_sq, _contiguous(anchors), _contiguous(fisher), ema_mean,
                 ema_var, omega]  # fmt: skip
        k = torch.stack(steps).reshape(-1).double() + 1  # per_tensor_table of protected_adamw_step.cu
        ones = torch.ones(len(params), dtype=acc)
        table = torch.stack(
            [(lr / (1 - beta1**k)).to(acc), (1 - beta2**k).sqrt().to(acc)]
            + [ones if t is None else t.reshape(-1).to(acc) for t in (factors, alpha, var_scale)],
            1,
        ).contiguous()
        grad_factor = torch.full((), -1.0 if maximize else 1.0, dtype=acc)
        if grad_scale is not None:
            grad_factor = grad_factor / grad_scale.reshape(()).to(acc)
        skip = torch.zeros((), dtype=torch.float32) if found_inf is None else found_inf.reshape(()).float()
        scalars = (ctypes.c_double * 7)(2 * lam, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, threshold)
        protect = 1 if factors is not None else 2 if ema_mean else 0
        penalty = torch.empty((), dtype=acc)
        self._call("ff_emu_protected_adamw_step", *self._lists(roles), int(bool(anchors)), protect, int(bool(omega)),
                   _ptr(table), _ptr(grad_factor), scalars, _ptr(skip), ctypes.c_double(lam), _ptr(penalty),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(params, work)
        for step in steps:
            step.add_((1 - skip).to(step.dtype))
        return penalty

    def protected_adamw8bit_step(self, params, grads, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax,
                                 qmap_signed, qmap_unsigned, steps, anchors, fisher, fisher_absmax, factors, ema_mean,
                                 ema_var, alpha, var_scale, omega, grad_scale, found_inf, lr, beta1, beta2, eps,
                                 weight_decay, lam, threshold, maximize):  # fmt: skip
        work = _contiguous(params)
        roles = [work, _contiguous(grads), exp_avg, exp_avg_sq, _contiguous(anchors), _contiguous(fisher), ema_mean,
                 ema_var, omega, exp_avg_absmax, exp_avg_sq_absmax, fisher_absmax]  # fmt: skip
        k = torch.stack(steps).reshape(-1).double() + 1  # adamw_device_args of adamw_binding.h
        ones = torch.ones(len(params))
        table = torch.stack(
            [(lr / (1 - beta1**k)).float(), (1 - beta2**k).sqrt().float()]
            + [ones if t is None else t.reshape(-1).float() for t in (factors, alpha, var_scale)],
            1,
        ).contiguous()
        grad_factor = torch.full((), -1.0 if maximize else 1.0)
        if grad_scale is not None:
            grad_factor = grad_factor / grad_scale.reshape(()).float()
        skip = torch.zeros(()) if found_inf is None else found_inf.reshape(()).float()
        scalars = (ctypes.c_double * 7)(2 * lam, 1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, eps, threshold)
        protect = 1 if factors is not None else 2 if ema_mean else 0
        penalty = torch.empty(())
        self._call("ff_emu_protected_adamw8bit_step", *self._lists(roles), int(bool(anchors)), protect,
                   int(bool(omega)), _ptr(table), _ptr(grad_factor), scalars, _ptr(qmap_signed.contiguous()),
                   _ptr(qmap_unsigned.contiguous()), _ptr(skip), ctypes.c_double(lam), _ptr(penalty))  # fmt: skip
        _copy_back(params, work)
        for step in steps:
            step.add_((1 - skip).to(step.dtype))
        return penalty

    def anchored_lm_loss_rows(self, logits, ref, labels, weights, scale, kl_weight, temperature, reverse, ignore,
                              dft=False):  # fmt: skip
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        anchored = ref is not None and kl_weight != 0
        z = logits.contiguous()
        a = ref.contiguous() if anchored else z
        w = weights.to(acc).contiguous() if weights is not None else None
        c = scale.to(acc).reshape(1)
        loss, grad = torch.empty(z.shape[0], dtype=acc), torch.empty_like(z)
        self._call("ff_emu_anchored_lm_loss_rows", _ptr(z), _ptr(a), _ptr(labels.contiguous()), _ptr(w), _ptr(c),
                   _ptr(loss), _ptr(grad), ctypes.c_int64(z.shape[0]), ctypes.c_int64(z.shape[1]),
                   ctypes.c_double(kl_weight), ctypes.c_double(temperature), int(reverse), int(anchored),
                   int(dft), ctypes.c_int64(ignore), CODES[z.dtype])  # fmt: skip
        return loss, grad


@pytest.fixture(scope="module")
def emu():
    return build_library()


# ---------------------------------------------------------------------------------------------------- checking


def agree(actual, expected, dtype=None):
    """Within the tolerance of the output's dtype and, for 16-bit outputs, bitwise equal to the reference on nearly
    every element: a kernel computing in fp32 and rounding once to nearest even differs from the reference's
    rounding only where the fp32 values straddle a tie (rare), truncation on about half the elements."""
    dtype = dtype or expected.dtype
    assert_close(actual, expected, dtype)
    if dtype in (torch.bfloat16, torch.float16) and expected.numel() >= 64:
        mismatched = (raw_bytes(actual.to(dtype)) != raw_bytes(expected.to(dtype))).double().mean()
        assert mismatched <= 0.02, f"{mismatched:.1%} of the {dtype} elements differ from the reference's rounding"


def raw_bytes(t):
    """The bits of t's elements, as an integer tensor (NaN payloads and signed zeros included)."""
    return (
        t.detach()
        .reshape(-1)
        .clone()
        .view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    )


def under_seeds(emu, run):
    """run() under every schedule seed (each on fresh inputs it makes); the seeds' results agree bitwise."""
    results = []
    for seed in SEEDS:
        emu.seed(seed)
        results.append([t.clone() for t in run()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(raw_bytes(a), raw_bytes(b)), "the result depends on the schedule"
    return results[0]


def randn(shape, dtype, gen, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)


def odd_view(numel, dtype, gen, kind):
    """A tensor of numel elements: contiguous, misaligned (offset by one element in its storage) or strided."""
    if kind == "misaligned":
        return randn(numel + 1, dtype, gen)[1:]
    if kind == "strided":
        return randn(2 * numel, dtype, gen)[::2]
    return randn(numel, dtype, gen)


def shapes_of(size, layout):
    """One tensor of `size` elements ("one"), or a list around it ("many": empty tensors, a chunk + 1, two chunks)."""
    return [size] if layout == "one" else [size, 3, 0, CHUNK + 1, 1, size + 5, 2 * CHUNK, 7, 0]


# ---------------------------------------------------------------------------------------------------- ops


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "misaligned"])
def test_ewc_penalty(emu, size, dtype, kind):
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "many" if kind == "misaligned" else "one")
    params = [odd_view(n, dtype, gen, kind) for n in shapes]
    anchors = [(p.double() + 0.5 * randn(p.shape, torch.float64, gen)).to(dtype) for p in params]
    fisher = [torch.rand(p.shape, generator=gen).to(torch.bfloat16 if i % 2 else dtype) for i, p in enumerate(params)]
    lam = 0.4
    (penalty,) = under_seeds(emu, lambda: [emu.ewc_penalty(params, anchors, fisher, lam)])
    agree(penalty, ewc_penalty_ref(params, anchors, fisher, lam), penalty.dtype)

    initial = [odd_view(p.numel(), p.dtype, gen, kind) for p in params]

    def accumulate():
        grads = [g.clone() for g in initial]
        return [emu.ewc_penalty(params, anchors, fisher, lam, grads), *grads]

    penalty, *grads = under_seeds(emu, accumulate)
    expected = [g.clone() for g in initial]
    agree(penalty, ewc_penalty_accumulate_ref(params, anchors, fisher, expected, lam), penalty.dtype)
    for g, e in zip(grads, expected):
        agree(g, e)

    upstream = torch.tensor(3.0)
    grads = under_seeds(emu, lambda: emu.ewc_penalty_backward(params, anchors, fisher, lam, upstream))
    leaves = [p.detach().clone().requires_grad_() for p in params]
    (upstream.to(_acc(params)) * ewc_penalty_ref(leaves, anchors, fisher, lam)).backward()
    for g, leaf in zip(grads, leaves):
        agree(g, leaf.grad)


def test_hundreds_of_tensors(emu):
    """One launch over 300 tensors (one block each; the merge kernels one block per tensor)."""
    gen = torch.Generator().manual_seed(0)
    params = [randn(i % 7 + 1, torch.bfloat16 if i % 3 else torch.float32, gen) for i in range(300)]
    anchors = [randn(p.shape, p.dtype, gen) for p in params]
    fisher = [torch.rand(p.shape, generator=gen) for p in params]
    (penalty,) = under_seeds(emu, lambda: [emu.ewc_penalty(params, anchors, fisher, 0.3)])
    agree(penalty, ewc_penalty_ref(params, anchors, fisher, 0.3))
    (rows,) = under_seeds(emu, lambda: [emu.grad_moments(params, 2.0)])
    agree(rows, grad_moments_ref(params, 2.0))


def test_empty_lists(emu):
    """The launchers plan no block for an empty list: nothing is launched but the sums (lam * 0)."""
    assert emu.ewc_penalty([], [], [], 0.5).item() == 0.0
    assert emu.ewc_penalty([], [], [], 0.5, grads=[]).item() == 0.0
    emu.fisher_update([], [], 0.9, 1.0, False)
    emu.weight_merge([], [[], []], [0.5, 0.5])
    emu.scale_grads([], torch.zeros(0))
    assert emu.grad_ema_stats([], [], [], torch.tensor(1.0), torch.zeros(0)).numel() == 0
    emu.grad_ema_protect([], [], [], torch.tensor(1.0), torch.zeros(0), torch.zeros(0), torch.tensor(False), 0.5)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("samples", [None, 0, 3])
@pytest.mark.parametrize("absolute", [False, True])
def test_fisher_update(emu, size, dtype, samples, absolute):
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "many" if samples == 3 else "one")
    initial = [torch.rand(n, generator=gen).to(dtype) for n in shapes]
    lead = () if samples is None else (samples,)
    grads = [randn((*lead, n), torch.bfloat16 if i % 2 else dtype, gen) for i, n in enumerate(shapes)]

    def run():
        fisher = [f.clone() for f in initial]
        emu.fisher_update(fisher, grads, 0.9, 0.25, absolute)
        return fisher

    fisher = under_seeds(emu, run)
    expected = [f.clone() for f in initial]
    fisher_update_ref(expected, grads, 0.9, 0.25, absolute)
    for f, e in zip(fisher, expected):
        agree(f, e)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fisher", [False, True], ids=["linear", "fisher"])
@pytest.mark.parametrize("layout", ["one", "many"])
def test_weight_merge(emu, size, dtype, fisher, layout):
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, layout)
    models = [[randn(n, d, gen) for n in shapes] for d in (dtype, torch.bfloat16, torch.float32)]
    fishers = [[torch.rand(n, generator=gen).to(d) for n in shapes] for d in (torch.float32, dtype, dtype)]
    weights, floors = [0.2, 0.5, 0.3], [1e-6, 0.0, 0.0]
    kwargs = dict(fisher=fishers, floors=floors) if fisher else {}

    def run():
        out = [torch.zeros(n, dtype=dtype) for n in shapes]
        emu.weight_merge(out, models, weights, **kwargs)
        return out

    out = under_seeds(emu, run)
    expected = [torch.zeros(n, dtype=dtype) for n in shapes]
    weight_merge_ref(expected, models, weights, **kwargs)
    for o, e in zip(out, expected):
        agree(o, e)


def test_weight_merge_in_place(emu):
    """out is one of its sources (WiSE-FT): every element is read before it is written."""
    gen = torch.Generator().manual_seed(0)
    base, tuned = [randn(3 * CHUNK + 1, torch.bfloat16, gen)], [randn(3 * CHUNK + 1, torch.bfloat16, gen)]
    expected = [tuned[0].clone()]
    weight_merge_ref(expected, [base, tuned], [0.3, 0.7])

    def run():
        params = [tuned[0].clone()]
        emu.weight_merge(params, [base, params], [0.3, 0.7])
        return params

    agree(under_seeds(emu, run)[0], expected[0])


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["contiguous", "misaligned", "strided"])
def test_scale_grads(emu, size, dtype, kind):
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "one" if kind == "contiguous" else "many")
    initial = [odd_view(n, dtype, gen, kind) for n in shapes]
    factors = torch.rand(len(shapes), generator=gen) + 0.5

    def run():
        grads = [g.clone() for g in initial]
        emu.scale_grads(grads, factors)
        return grads

    grads = under_seeds(emu, run)
    expected = [g.clone() for g in initial]
    scale_grads_ref(expected, factors)
    for g, e in zip(grads, expected):
        agree(g, e)


def ema_case(size, dtype, gen, layout, state=torch.float32):
    shapes = shapes_of(size, layout)
    grads = [randn(n, torch.float16 if i % 3 == 2 else dtype, gen) for i, n in enumerate(shapes)]
    mean = [randn(n, state, gen, 0.1) for n in shapes]
    var = [torch.rand(n, generator=gen, dtype=state) for n in shapes]
    alpha = torch.rand(len(shapes), generator=gen) * 0.5 + 0.1
    return grads, mean, var, alpha


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_ema(emu, size, dtype):
    gen = torch.Generator().manual_seed(size)
    state = torch.float64 if dtype == torch.float64 else torch.float32
    grads, mean, var, alpha = ema_case(size, dtype, gen, "many" if size % 2 else "one", state)
    inv_scale = torch.tensor(0.5)
    (maxima,) = under_seeds(emu, lambda: [emu.grad_ema_stats(grads, mean, var, inv_scale, alpha)])
    agree(maxima, grad_ema_stats_ref(grads, mean, var, inv_scale, alpha))

    var_scale = 1.0 / maxima.clamp(min=1e-12)
    for skip in (torch.tensor(False), torch.tensor(True)):

        def run(skip=skip):
            g, m, v = ([t.clone() for t in lst] for lst in (grads, mean, var))
            emu.grad_ema_protect(g, m, v, inv_scale, alpha, var_scale, skip, 0.6)
            return [*g, *m, *v]

        got = under_seeds(emu, run)
        g, m, v = ([t.clone() for t in lst] for lst in (grads, mean, var))
        grad_ema_protect_ref(g, m, v, inv_scale, alpha, var_scale, skip, 0.6)
        for a, e in zip(got, [*g, *m, *v]):
            agree(a, e)


def test_grad_ema_stats_nonfinite_is_inf(emu):
    grads, mean, var, alpha = ema_case(CHUNK + 1, torch.float32, torch.Generator().manual_seed(0), "one")
    grads[0][CHUNK] = math.nan
    assert emu.grad_ema_stats(grads, mean, var, torch.tensor(1.0), alpha).item() == math.inf


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize(
    "dtype, offset", [(d, 0.0) for d in DTYPES] + [(torch.float32, 1e4), (torch.float64, 1e4)]
)  # 1e4 + 1e-3 noise has no 16-bit representation
def test_grad_moments(emu, size, dtype, offset):
    """offset 1e4: the shifted case, |mean| >> std, where sum(x^2) - sum(x)^2 / n loses every digit."""
    gen = torch.Generator().manual_seed(size)
    grads = [randn(n, dtype, gen, 1e-3 if offset else 1.0, offset) for n in shapes_of(size, "many")[:5] if n]
    (rows,) = under_seeds(emu, lambda: [emu.grad_moments(grads, 0.5)])
    expected = grad_moments_ref(grads, 0.5)
    acc = rows.dtype
    assert torch.equal(rows[:, 0], expected[:, 0])
    agree(rows[:, 1], expected[:, 1], acc)
    # M2 relative to the spread it measures (the shift keeps fp32's error at the spread's scale, not the mean's)
    tolerance = TOLERANCES[acc]["rtol"] * 10
    torch.testing.assert_close(rows[:, 2].double(), expected[:, 2].double(), rtol=tolerance, atol=1e-30)


ADAMW_CASES = {
    # name: (ewc, protection, si, found_inf, maximize)
    "plain": (False, None, False, False, False),
    "ewc-si": (True, None, True, False, False),
    "ewc-tensor": (True, "tensor", False, False, True),
    "element-si": (False, "element", True, False, False),
    "ewc-element-found-inf": (True, "element", True, True, False),
}


@pytest.mark.parametrize("case", list(ADAMW_CASES))
@pytest.mark.parametrize("size", [1, BLOCK + 1, CHUNK, CHUNK + 1, 3 * CHUNK + 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_protected_adamw_step(emu, case, size, dtype):
    ewc, protection, si, found_inf, maximize = ADAMW_CASES[case]
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "many" if size % 2 else "one")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    params = [randn(n, dtype, gen) for n in shapes]
    grads = [randn(n, torch.bfloat16 if i % 2 else dtype, gen) for i, n in enumerate(shapes)]
    state = [[randn(n, acc, gen, 0.1) for n in shapes], [torch.rand(n, generator=gen, dtype=acc) for n in shapes]]
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    anchors = [(p.double() + 0.1 * randn(p.shape, torch.float64, gen)).to(p.dtype) for p in params] if ewc else []
    fisher = [torch.rand(n, generator=gen).to(dtype) for n in shapes] if ewc else []
    factors = torch.rand(len(shapes), generator=gen) if protection == "tensor" else None
    element = protection == "element"
    ema = [[randn(n, acc, gen, 0.1) for n in shapes], [torch.rand(n, generator=gen, dtype=acc) for n in shapes]]
    alpha = torch.full((len(shapes),), 0.3) if element else None
    var_scale = torch.full((len(shapes),), 2.0) if element else None
    omega = [torch.zeros(n, dtype=acc) for n in shapes] if si else []
    grad_scale = torch.tensor(2.0)
    inf = torch.tensor(1.0 if found_inf else 0.0)
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.01, 0.3, 0.5, maximize)

    def fresh():
        mutable = [params, *state, steps, *(ema if element else ([], [])), omega]
        return [[t.clone() for t in lst] for lst in mutable]

    def call(op, p, m1, m2, k, em, ev, om):
        penalty = op(p, grads, m1, m2, k, anchors, fisher, factors, em, ev, alpha, var_scale, om, grad_scale, inf,
                     *hyper)  # fmt: skip
        return [penalty, *p, *m1, *m2, *k, *em, *ev, *om]

    got = under_seeds(emu, lambda: call(emu.protected_adamw_step, *fresh()))
    expected = call(protected_adamw_step_ref, *fresh())
    for a, e in zip(got, expected):
        agree(a, e)


ADAMW8BIT_CASES = {
    # name: (ewc: None / "float" / "8bit", protection, si, found_inf, maximize)
    "plain": (None, None, False, False, False),
    "ewc-float-si": ("float", None, True, False, False),
    "ewc-8bit-tensor": ("8bit", "tensor", False, False, True),
    "element-si": (None, "element", True, False, False),
    "ewc-8bit-element-si-found-inf": ("8bit", "element", True, True, False),
}


def quantized(values, signed):
    """The (codes, absmax) lists of fp32 values."""
    pairs = [quantize_blockwise(v, dynamic_map(signed)) for v in values]
    return [c for c, _ in pairs], [a for _, a in pairs]


def agree_codes(actual, expected):
    """Equal codes but where the two sides' fp32 moments straddle a midpoint of the map (then one apart): rare."""
    differ = actual != expected
    assert int(differ.sum()) <= max(2, actual.numel() // 500), f"{int(differ.sum())} of {actual.numel()} codes differ"
    assert not differ.any() or int((actual.int() - expected.int()).abs().max()) <= 1


@pytest.mark.parametrize("case", list(ADAMW8BIT_CASES))
@pytest.mark.parametrize("size", [1, BLOCK - 1, BLOCK + 1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_protected_adamw8bit_step(emu, case, size, dtype):
    """The 8-bit kernel against dequantize -> the 32-bit reference -> quantize: one warp per quantization block,
    partial blocks and chunks, empty tensors in the list, an all-zero block (absmax 0)."""
    ewc, protection, si, found_inf, maximize = ADAMW8BIT_CASES[case]
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "many" if size % 2 else "one")
    params = [randn(n, dtype, gen) for n in shapes]
    grads = [randn(n, torch.bfloat16 if i % 2 else dtype, gen) for i, n in enumerate(shapes)]
    m1 = [randn(n, torch.float32, gen, 0.1) for n in shapes]
    m1[0][:BLOCK] = 0
    state = [*quantized(m1, True), *quantized([torch.rand(n, generator=gen) for n in shapes], False)]
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    anchors = [(p.float() + 0.1 * randn(p.shape, torch.float32, gen)).to(torch.bfloat16) for p in params]
    fisher = [torch.rand(n, generator=gen) for n in shapes]
    fisher, fisher_absmax = quantized(fisher, False) if ewc == "8bit" else (fisher, [])
    if not ewc:
        anchors, fisher = [], []
    factors = torch.rand(len(shapes), generator=gen) if protection == "tensor" else None
    element = protection == "element"
    ema = [[randn(n, torch.float32, gen, 0.1) for n in shapes], [torch.rand(n, generator=gen) for n in shapes]]
    alpha = torch.full((len(shapes),), 0.3) if element else None
    var_scale = torch.full((len(shapes),), 2.0) if element else None
    omega = [torch.zeros(n) for n in shapes] if si else []
    grad_scale = torch.tensor(2.0)
    inf = torch.tensor(1.0 if found_inf else 0.0)
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.01, 0.3, 0.5, maximize)
    maps = (dynamic_map(True), dynamic_map(False))

    def fresh():
        codes1, absmax1, codes2, absmax2 = state
        mutable = [params, codes1, codes2, absmax1, absmax2, steps, *(ema if element else ([], [])), omega]
        return [[t.clone() for t in lst] for lst in mutable]

    def call(op, p, c1, c2, a1, a2, k, em, ev, om):
        penalty = op(p, grads, c1, c2, a1, a2, *maps, k, anchors, fisher, fisher_absmax, factors, em, ev, alpha,
                     var_scale, om, grad_scale, inf, *hyper)  # fmt: skip
        return [penalty, *p, *c1, *c2, *a1, *a2, *k, *em, *ev, *om]

    got = under_seeds(emu, lambda: call(emu.protected_adamw8bit_step, *fresh()))
    expected = call(protected_adamw8bit_step_ref, *fresh())
    for a, e in zip(got, expected):
        if e.dtype == torch.uint8:
            agree_codes(a, e)
        else:
            agree(a, e)


def anchored_rows_ref(logits, ref, labels, weights, scale, kl_weight, temperature, reverse, ignore, dft=False):
    """Per row: scale * anchored_lm_loss_ref of that row alone (a one-token batch), and its gradient by autograd,
    the logits being the hidden states of an identity head."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    eye = torch.eye(logits.shape[1], dtype=logits.dtype)
    losses, grads = [], []
    for t in range(logits.shape[0]):
        z = logits[t : t + 1].detach().clone().requires_grad_()
        loss = anchored_lm_loss_ref(
            z, eye, labels[t : t + 1], ref_hidden=None if ref is None else ref[t : t + 1], kl_weight=kl_weight,
            temperature=temperature, kl="reverse" if reverse else "forward", ignore_index=ignore,
            token_weights=None if weights is None else weights[t : t + 1], token_weighting="dft" if dft else None,
        ) * scale.to(acc)  # fmt: skip
        (grad,) = torch.autograd.grad(loss, z)
        losses.append(loss.detach())
        grads.append(grad.to(acc))
    return torch.stack(losses), torch.cat(grads)


@pytest.mark.parametrize("vocab", [1, 31, BLOCK, BLOCK + 1, 1001])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ce", "forward", "reverse", "dft", "asft"])
def test_anchored_lm_loss_rows(emu, vocab, dtype, mode):
    gen = torch.Generator().manual_seed(vocab)
    rows = 5
    logits = randn((rows, vocab), dtype, gen, 3.0)
    anchored = mode not in ("ce", "dft")
    ref = (logits.double() + randn((rows, vocab), torch.float64, gen)).to(dtype) if anchored else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[2] = -100  # an ignored row: loss 0, zero gradient
    weights = torch.rand(rows, generator=gen) + 0.5 if mode in ("forward", "asft") else None
    scale = torch.tensor(1.0 / 4)
    args = (logits, ref, labels, weights, scale, 0.7 if anchored else 0.0, 1.5, mode == "reverse", -100)
    args += (mode in ("dft", "asft"),)  # DFT's gate exp(-CE), with the forward KL: ASFT
    loss, grad = under_seeds(emu, lambda: emu.anchored_lm_loss_rows(*args))
    expected_loss, expected_grad = anchored_rows_ref(*args)
    agree(loss, expected_loss)
    assert torch.all(grad[2] == 0) and loss[2] == 0
    # the gradient is rounded once to the logits' dtype; the reference's (acc_t) rounded the same way
    agree(grad, expected_grad.to(dtype))


# ---------------------------------------------------------------------------------------------------- the emulator


def converted(emu, values, kind):
    out = torch.empty(len(values), dtype=torch.int16)
    x = torch.tensor(values, dtype=torch.float64)
    emu.lib.ff_emu_convert(_ptr(x), ctypes.c_int64(len(values)), kind, _ptr(out))
    return out


def test_16_bit_conversions_round_to_nearest_even(emu):
    """From fp32, as torch's conversions (round to nearest even, subnormals, overflow to inf, NaN); from fp64 with a
    single rounding, as cvt.rn.bf16.f64 does (rounding through fp32 first would round twice)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([
        torch.randn(20000, generator=gen) * torch.logspace(-45, 38, 20000).float(),
        torch.tensor([0.0, -0.0, math.inf, -math.inf, 65504.0, 65520.0, 1e-8, 6e-8, 3.4e38, 1 + 2**-8, 1 + 3 * 2**-8]),
    ]).double()  # fmt: skip
    values = x.tolist()
    assert torch.equal(converted(emu, values, 0), x.float().bfloat16().view(torch.int16))
    assert torch.equal(converted(emu, values, 2), x.float().half().view(torch.int16))
    nan = converted(emu, [math.nan], 0).view(torch.bfloat16)
    assert nan.isnan().all()
    # 1 + 2^-8 + 2^-30 lies above the bf16 tie 1 + 2^-8 (so rounds up), but as fp32 it is the tie (rounds to even).
    just_above = [1.0 + 2**-8 + 2**-30, 1.0 + 2**-11 + 2**-40]
    assert converted(emu, just_above[:1], 1).view(torch.bfloat16).item() == 1.0 + 2**-7
    assert converted(emu, just_above[1:], 3).view(torch.float16).item() == 1.0 + 2**-10
    # the truncating variant (the planted bug below) rounds toward zero
    assert converted(emu, [1.0 + 255 * 2**-15], 4).view(torch.bfloat16).item() == 1.0


def test_launch_of_no_block_is_rejected(emu):
    """A grid of zero blocks is an invalid configuration, as on the GPU (the bindings reject empty lists first)."""
    with pytest.raises(LaunchError, match="cudaError 9"):
        emu._call("ff_emu_grad_moments", *emu._lists([[]]), _ptr(torch.ones(1)), _ptr(torch.empty(0)), 0)


# Planted bugs: (file, the exact text, its mutant, the checks that must catch it). Each text must occur exactly
# once, so that a change of the headers cannot silently turn a mutation into a no-op.
MUTATIONS = {
    "chunk end off by one": (
        "multi_tensor.cuh",
        "t.numel - b.begin < kChunkSize ? t.numel : b.begin + kChunkSize}",
        "t.numel - b.begin < kChunkSize ? t.numel : b.begin + kChunkSize - 1}",
        lambda emu: test_scale_grads(emu, CHUNK + 1, torch.float32, "contiguous"),
    ),
    "wrong shuffle offset": (
        "multi_tensor.cuh",
        "for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);",
        "for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset + 1);",
        lambda emu: test_ewc_penalty(emu, BLOCK + 1, torch.float32, "contiguous"),
    ),
    "missing __syncthreads": (
        "multi_tensor.cuh",
        "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
        "  if (lane == 0) warp_sums[warp] = v;\n",
        lambda emu: test_grad_moments(emu, CHUNK, torch.float32, 0.0),
    ),
    "reduction order set by the schedule": (
        "multi_tensor.cuh",
        "  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n"
        "  if (warp == 0) v = warp_reduce_sum(lane < kWarps ? warp_sums[lane] : acc_t(0));\n  return v;",
        "  __shared__ acc_t block_total;\n  if (threadIdx.x == 0) block_total = 0;\n  __syncthreads();\n"
        "  if (lane == 0) atomicAdd(&block_total, v);\n  __syncthreads();\n  return block_total;",
        lambda emu: test_ewc_penalty(emu, 3 * CHUNK + 1, torch.float32, "contiguous"),
    ),
    "bf16 rounded by truncation": (
        "multi_tensor.cuh",
        "to_bfloat16(float v) { return __float2bfloat16(v); }",
        "to_bfloat16(float v) { return __float2bfloat16_rz(v); }",
        lambda emu: test_scale_grads(emu, CHUNK + 1, torch.bfloat16, "contiguous"),
    ),
    "8-bit absmax of one lane, not the warp's": (
        "protected_adamw8bit_step.cuh",
        "    max1 = warp_max(max1);\n",
        "",
        lambda emu: test_protected_adamw8bit_step(emu, "plain", BLOCK + 1, torch.float32),
    ),
    "barrier in divergent code": (
        "grad_moments.cuh",
        "merged[threadIdx.x + stride]);\n    __syncthreads();",
        "merged[threadIdx.x + stride]);\n    if (threadIdx.x < stride) __syncthreads();",
        lambda emu: test_grad_moments(emu, 1, torch.float32, 0.0),
    ),
}


def mutant_root(tmp, name):
    file, text, mutant, _ = MUTATIONS[name]
    root = Path(tmp) / name.replace(" ", "_")
    shutil.copytree(CSRC / "emu", root / "emu")
    shutil.copytree(CSRC / "cuda", root / "cuda", ignore=shutil.ignore_patterns("*.cu", "*.h"))
    shutil.copy(CSRC / "elementwise.h", root)
    source = (root / "cuda" / file).read_text()
    assert source.count(text) == 1, f"{name}: the text to mutate is not in {file} exactly once"
    (root / "cuda" / file).write_text(source.replace(text, mutant))
    return root


@pytest.fixture(scope="module")
def mutants(tmp_path_factory):
    """The library built from each mutation of the headers (in parallel: each build takes a few seconds)."""
    tmp = tmp_path_factory.mktemp("mutants")
    roots = {name: mutant_root(tmp, name) for name in MUTATIONS}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        built = {name: pool.submit(build_library, root) for name, root in roots.items()}
        return {name: future.result() for name, future in built.items()}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_planted_bugs_are_caught(emu, mutants, name):
    check = MUTATIONS[name][-1]
    check(emu)  # passes on the real headers
    with pytest.raises((AssertionError, LaunchError)) as caught:
        check(mutants[name])
    if name == "barrier in divergent code":
        assert "__syncthreads" in str(caught.value)
