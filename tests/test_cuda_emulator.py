"""The CUDA kernels (csrc/cuda/*.cuh) run on the CPU through csrc/emu/cuda_emu.h, against the ``*_ref`` ops.

No GPU runs in CI, so the kernels' logic is proven here: a small shared library (csrc/emu/emu_launchers.cpp, built
with g++ at test time and cached by source hash) exposes every launcher on CPU memory; each check runs under several
schedule seeds (threads in a random order, preempted at random points: a race or a missing barrier changes the
result) and asserts the seeds agree bitwise, as the kernels' fixed-order reductions promise. The host side mirrors
the bindings (csrc/cuda/*.cu): contiguous copies written back, acc_t scalars, the metadata packed by the same
``pack_meta_words``, after the same checks (csrc/launch_checks.h: a launch the binding would refuse is refused with its
message). ``test_planted_bugs_are_caught`` rebuilds the library from mutated copies of the headers and
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
import test_ewc_penalty as ewc_tests
import test_fisher_update as fisher_tests
import test_grad_ema as ema_tests
import test_grad_moments as moments_tests
import test_protected_adamw_step as adamw_tests
import test_weight_merge as merge_tests
import torch

from fastforget.ops.anchored_lm_loss import anchored_lm_loss_ref
from fastforget.ops.ewc_penalty import ewc_penalty_accumulate_ref, ewc_penalty_ref
from fastforget.ops.fisher_update import fisher_update_ref
from fastforget.ops.grad_ema import grad_ema_protect_ref, grad_ema_stats_ref
from fastforget.ops.grad_moments import grad_moments_ref
from fastforget.ops.mofo import BINS, NONE_SELECTED, _digits, mofo_histogram_ref, mofo_update_ref
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
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.uint8: 4}

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler ({CXX})")

# ---------------------------------------------------------------------------------------------------- the matrix
#
# Each op runs over its own tests' matrix (test_<op>.py's sizes and dtypes, imported: a size or dtype added there
# runs here too), with fp64 and the CUDA kernels' chunk edges added: a chunk - 1, a chunk, a chunk + 1 and a few
# chunks + 1. The op tests' sizes already hold the thread-block edges (97: a part of a block; 1025: a block multiple
# + 1). Sizes above four chunks are left out: the op tests' 65537 (16 chunks + 1) crosses no edge that 3 chunks + 1
# does not, at five times the time.
EDGES = [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 1]


def sizes_of(op_sizes, edges=EDGES):
    return sorted({*(s for s in op_sizes if s <= 4 * CHUNK), *edges})


def dtypes_of(op_dtypes):
    return [*op_dtypes, *({torch.float64} - set(op_dtypes))]


# ewc_penalty's, and the matrix of the ops whose tests parametrise inline (scale_grads, the loss rows' dtypes)
SIZES, DTYPES = sizes_of(ewc_tests.SIZES), dtypes_of(ewc_tests.PARAM_DTYPES)
FISHER_SIZES, FISHER_DTYPES = sizes_of(fisher_tests.SIZES), dtypes_of(fisher_tests.DTYPES)
EMA_SIZES, EMA_DTYPES = sizes_of(ema_tests.SIZES), dtypes_of(ema_tests.DTYPES)
MOMENTS_SIZES, MOMENTS_DTYPES = sizes_of(moments_tests.SIZES), dtypes_of(moments_tests.DTYPES)
MERGE_SIZES, MERGE_DTYPES = sizes_of(merge_tests.SIZES), dtypes_of(merge_tests.DTYPES)
# protected_adamw_step's tests list shapes and parametrise dtypes inline: the element counts of those shapes, the
# chunk edges (five modes each) and DTYPES.
ADAMW_SIZES = sizes_of([math.prod(s) for s in adamw_tests.SHAPES], [CHUNK, CHUNK + 1, 3 * CHUNK + 1])


# ---------------------------------------------------------------------------------------------------- the library


def _sources(root):
    """Everything the library is built from: the emulator, the kernel headers, the shared per-element math and the
    bindings' launch checks."""
    return [*sorted((root / "emu").glob("*")), *sorted((root / "cuda").glob("*.cuh")), *SHARED_HEADERS(root)]


def SHARED_HEADERS(root):  # noqa: N802 -- the headers of csrc/ that csrc/cuda/*.cuh and the launchers include
    return [root / "elementwise.h", root / "launch_checks.h", root / "mofo.h"]


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
    """A failed or refused emulated launch: its cudaError_t code and ff_emu_last_message()."""

    def __init__(self, name, code, message):
        super().__init__(f"{name}: cudaError {code}: {message}")
        self.code, self.message = code, message


class LaunchLists(ctypes.Structure):
    """csrc/launch_checks.h's LaunchLists: each list's length; per tensor, list after list, its number of dimensions,
    its sizes (concatenated), data pointer and dtype code."""

    _fields_ = [("num_lists", ctypes.c_int64)] + [
        (name, ctypes.POINTER(ctypes.c_int64)) for name in ("length", "dim", "sizes", "ptr", "dtype")
    ]


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else ctypes.c_void_p(0)


def _sized(t):
    """A per-list tensor argument as the launchers take it: its data pointer and element count."""
    return _ptr(t), ctypes.c_int64(t.numel())


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
        self.tamper = None  # (field, list, index, change): changes one tensor's entry in the next LaunchLists built
        lib.ff_emu_last_message.restype = ctypes.c_char_p
        lib.ff_emu_seed.argtypes = [ctypes.c_uint64]

    def seed(self, seed):
        self.lib.ff_emu_seed(seed)

    def _call(self, name, *args):
        err = getattr(self.lib, name)(*args)
        if err:
            raise LaunchError(name, err, self.lib.ff_emu_last_message().decode())

    def _lists(self, lists):
        """A pointer to the LaunchLists of these tensor lists, as binding.h's HostLists reads them off the tensors
        (dtype code -1 for a dtype no kernel reads)."""
        tensors = [t for lst in lists for t in lst]
        fields = {
            "length": [len(lst) for lst in lists],
            "dim": [t.dim() for t in tensors],
            "sizes": [size for t in tensors for size in t.shape],
            "ptr": [t.data_ptr() for t in tensors],
            "dtype": [CODES.get(t.dtype, -1) for t in tensors],
        }
        if self.tamper is not None:
            (field, r, i, change), self.tamper = self.tamper, None
            k = sum(len(lst) for lst in lists[:r]) + i  # tensor i of list r
            fields[field][k] = change(fields[field][k])
        arrays = [(ctypes.c_int64 * max(len(v), 1))(*v) for v in fields.values()]
        return ctypes.pointer(LaunchLists(len(lists), *arrays))  # the structure keeps the arrays alive

    def ewc_penalty(self, params, anchors, fisher, lam, grads=None):
        acc = _acc(params)
        out = torch.empty((), dtype=acc)
        work = _contiguous(grads) if grads is not None else []
        roles = [_contiguous(params), _contiguous(anchors), _contiguous(fisher), work]
        self._call("ff_emu_ewc_penalty", self._lists(roles), ctypes.c_double(lam), int(grads is not None),
                   int(acc == torch.float64), _ptr(out))  # fmt: skip
        if grads is not None:
            _copy_back(grads, work)
        return out

    def ewc_penalty_backward(self, params, anchors, fisher, lam, grad_out):
        acc = _acc(params)
        p = _contiguous(params)
        grads = [torch.empty_like(t) for t in p]
        g = grad_out.to(acc).reshape(-1)
        roles = [p, _contiguous(anchors), _contiguous(fisher), grads]
        self._call("ff_emu_ewc_penalty_backward", self._lists(roles), ctypes.c_double(lam), *_sized(g),
                   int(acc == torch.float64))  # fmt: skip
        return grads

    def fisher_update(self, fisher, grads, decay, scale, absolute):
        work, g = _contiguous(fisher), _contiguous(grads)
        self._call("ff_emu_fisher_update", self._lists([work, g]), ctypes.c_double(decay), ctypes.c_double(scale),
                   int(absolute), int(_acc(fisher) == torch.float64))  # fmt: skip
        _copy_back(fisher, work)

    def scale_grads(self, grads, factors):
        work = _contiguous(grads)
        f = factors.to(_acc(grads)).contiguous()
        self._call("ff_emu_scale_grads", self._lists([work]), *_sized(f), int(f.dtype == torch.float64))
        _copy_back(grads, work)

    def weight_merge(self, out, models, weights, fisher=None, floors=None):
        acc = _acc(out)
        work = _contiguous(out)
        sources = [_contiguous(m) for m in models]
        flat, flat_fisher = [t for m in sources for t in m], [t for f in fisher or [] for t in _contiguous(f)]
        coefs = torch.tensor([*weights, *(floors or [])], dtype=acc)
        self._call("ff_emu_weight_merge", self._lists([work]), self._lists([flat, flat_fisher]),
                   ctypes.c_int64(len(weights)), ctypes.c_int64(len(floors or [])), _ptr(coefs),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(out, work)

    def grad_ema_stats(self, grads, mean, var, inv_scale, alpha):
        acc = _acc(mean)
        out = torch.zeros(len(grads), dtype=acc)
        scale, alphas = inv_scale.to(acc).reshape(-1), alpha.to(acc).reshape(-1).contiguous()
        self._call("ff_emu_grad_ema_stats", self._lists([_contiguous(grads), mean, var]), *_sized(scale),
                   *_sized(alphas), _ptr(out), int(acc == torch.float64))  # fmt: skip
        return out

    def grad_ema_protect(self, grads, mean, var, inv_scale, alpha, var_scale, skip, threshold):
        acc = _acc(mean)
        work = _contiguous(grads)
        scale, alphas = inv_scale.to(acc).reshape(-1), alpha.to(acc).reshape(-1).contiguous()
        scales, flag = var_scale.to(acc).reshape(-1).contiguous(), skip.to(torch.bool).reshape(-1)
        self._call("ff_emu_grad_ema_protect", self._lists([work, mean, var]), *_sized(scale), *_sized(alphas),
                   *_sized(scales), *_sized(flag), ctypes.c_double(threshold),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(grads, work)

    def grad_moments(self, grads, inv_scale):
        acc = _acc(grads)
        out = torch.empty(len(grads), 3, dtype=acc)
        scale = torch.as_tensor(inv_scale, dtype=acc).reshape(-1)
        self._call("ff_emu_grad_moments", self._lists([_contiguous(grads)]), *_sized(scale), _ptr(out),
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
        self._call("ff_emu_protected_adamw_step", self._lists(roles), int(bool(anchors)), protect, int(bool(omega)),
                   _ptr(table), _ptr(grad_factor), scalars, _ptr(skip), ctypes.c_double(lam), _ptr(penalty),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(params, work)
        for step in steps:
            step.add_((1 - skip).to(step.dtype))
        return penalty

    def mofo_histogram(self, exp_avg, prefix, shift, digit_bits):
        out = torch.zeros(len(exp_avg), BINS, dtype=torch.int32)  # the binding's at::zeros
        want = prefix.to(torch.int64).contiguous()
        self._call("ff_emu_mofo_histogram", self._lists([exp_avg]), _ptr(want), shift, digit_bits, _ptr(out),
                   int(_acc(exp_avg) == torch.float64))  # fmt: skip
        return out

    def mofo_thresholds(self, exp_avg, ks):
        out = torch.empty(len(exp_avg), dtype=torch.int64)
        self._call("ff_emu_mofo_thresholds", self._lists([exp_avg]), _ptr(ks.to(torch.int64).contiguous()),
                   _ptr(out), int(_acc(exp_avg) == torch.float64))  # fmt: skip
        return out

    def mofo_update(self, params, exp_avg, exp_avg_sq, steps, thresholds, grads, omega, grad_scale, found_inf, lr,
                    beta1, beta2, eps, weight_decay, maximize):  # fmt: skip
        acc = _acc(params)
        work = _contiguous(params)
        roles = [work, exp_avg, exp_avg_sq, _contiguous(grads) if omega else [], omega]
        k = torch.stack(steps).reshape(-1).double()  # the binding's table (steps already taken)
        table = torch.stack([(lr / (1 - beta1**k)).to(acc), (1 - beta2**k).sqrt().to(acc)], 1).contiguous()
        grad_factor = torch.full((), -1.0 if maximize else 1.0, dtype=acc)
        if grad_scale is not None:
            grad_factor = grad_factor / grad_scale.reshape(()).to(acc)
        skip = torch.zeros((), dtype=torch.float32) if found_inf is None else found_inf.reshape(()).float()
        self._call("ff_emu_mofo_update", self._lists(roles), int(bool(omega)), _ptr(table),
                   _ptr(thresholds.to(torch.int64).contiguous()), _ptr(grad_factor),
                   ctypes.c_double(1 - lr * weight_decay), ctypes.c_double(eps), _ptr(skip),
                   int(acc == torch.float64))  # fmt: skip
        _copy_back(params, work)

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
        self._call("ff_emu_protected_adamw8bit_step", self._lists(roles), int(bool(anchors)), protect,
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
                   int(dft), ctypes.c_int64(ignore), CODES.get(z.dtype, -1))  # fmt: skip
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


@pytest.mark.parametrize("size", FISHER_SIZES)
@pytest.mark.parametrize("dtype", FISHER_DTYPES)
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


@pytest.mark.parametrize("size", MERGE_SIZES)
@pytest.mark.parametrize("dtype", MERGE_DTYPES)
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


@pytest.mark.parametrize("size", EMA_SIZES)
@pytest.mark.parametrize("dtype", EMA_DTYPES)
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


@pytest.mark.parametrize("size", MOMENTS_SIZES)
@pytest.mark.parametrize(
    "dtype, offset", [(d, 0.0) for d in MOMENTS_DTYPES] + [(torch.float32, 1e4), (torch.float64, 1e4)]
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
@pytest.mark.parametrize("size", ADAMW_SIZES)
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


def mofo_moments(size, acc, gen):
    """A list of |m| with ties, zeros of both signs, an infinity and tiny values, around `size` elements."""
    ties = torch.randint(-3, 4, (size + 5,), generator=gen).to(acc) * 0.25
    tiny = torch.cat([torch.tensor([-0.0, 0.0, math.inf], dtype=acc), randn(size, acc, gen, 1e-30)])
    zeros = torch.zeros(3, dtype=acc)
    return [randn(size, acc, gen), ties, zeros, tiny, randn(CHUNK + 1, acc, gen), randn(1, acc, gen)]


def topk_bits(m, k):
    """torch.topk's k-th largest |m| as a bit pattern (int64), -1 for k = 0."""
    if k == 0:
        return NONE_SELECTED
    value = torch.topk(m.abs().reshape(-1), k)[0].min()
    return int(value.view(torch.int64 if m.dtype == torch.float64 else torch.int32))


@pytest.mark.parametrize("size", [1, BLOCK + 1, CHUNK, 3 * CHUNK + 1])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
def test_mofo_histogram(emu, size, acc):
    """Every pass of the radix select, following the fullest bin down (integer atomics: bitwise, any schedule)."""
    moments = mofo_moments(size, acc, torch.Generator().manual_seed(size))
    prefix = torch.zeros(len(moments), dtype=torch.int64)
    for shift, digit_bits in _digits(moments):
        (got,) = under_seeds(emu, lambda p=prefix, s=shift, d=digit_bits: [emu.mofo_histogram(moments, p, s, d)])
        want = mofo_histogram_ref(moments, prefix, shift, digit_bits)
        assert torch.equal(got, want), (shift, digit_bits)
        prefix = (prefix << digit_bits) + want.argmax(1)


@pytest.mark.parametrize("size", [1, BLOCK + 1, 3 * CHUNK + 1])
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fraction", [1e-3, 0.15, 1.0])
def test_mofo_thresholds(emu, size, acc, fraction):
    """The device select equals torch.topk's k-th value bitwise (ties, zeros, inf, k = 0 included)."""
    moments = mofo_moments(size, acc, torch.Generator().manual_seed(size))
    ks = torch.tensor([int(m.numel() * fraction) for m in moments])
    (got,) = under_seeds(emu, lambda: [emu.mofo_thresholds(moments, ks)])
    assert got.tolist() == [topk_bits(m, k) for m, k in zip(moments, ks.tolist())]


@pytest.mark.parametrize("case", ["plain", "si", "si-maximize", "found-inf"])
@pytest.mark.parametrize("size", [1, BLOCK + 1, CHUNK + 1])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mofo_update(emu, case, size, dtype):
    gen = torch.Generator().manual_seed(size)
    shapes = shapes_of(size, "many" if size % 2 else "one")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    params = [randn(n, dtype, gen) for n in shapes]
    grads = [randn(n, torch.bfloat16 if i % 2 else dtype, gen) for i, n in enumerate(shapes)]
    exp_avg = [randn(n, acc, gen, 0.1) for n in shapes]
    exp_avg_sq = [torch.rand(n, generator=gen, dtype=acc) for n in shapes]
    steps = [torch.tensor(float(3 + i)) for i in range(len(shapes))]
    ks = [int(n * 0.3) for n in shapes]
    thresholds = torch.tensor([topk_bits(m, k) for m, k in zip(exp_avg, ks)])
    omega = [randn(n, acc, gen) for n in shapes] if case.startswith("si") else []
    found_inf = torch.tensor(1.0 if case == "found-inf" else 0.0)
    hyper = (1e-2, 0.9, 0.999, 1e-8, 0.05, case.endswith("maximize"))

    def call(op):
        p, w = [t.clone() for t in params], [t.clone() for t in omega]
        op(p, exp_avg, exp_avg_sq, steps, thresholds, grads, w, torch.tensor(2.0), found_inf, *hyper)
        return [*p, *w]

    got = under_seeds(emu, lambda: call(emu.mofo_update))
    for a, e in zip(got, call(mofo_update_ref)):
        agree(a, e)


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
        emu._call("ff_emu_grad_moments", emu._lists([[]]), *_sized(torch.ones(1)), _ptr(torch.empty(0)), 0)


# ---------------------------------------------------------------------------------------------------- bad metadata
#
# A direct call of an emulated launcher with inconsistent metadata is refused by the real bindings' checks
# (csrc/launch_checks.h, which csrc/cuda/*.cu TORCH_CHECK): cudaErrorInvalidValue, the binding's message word for
# word, nothing written. Each case: (the op's valid call, a corruption of it, the message).

UNSUPPORTED = "has an unsupported dtype (code {}); expected Float, BFloat16, Half or Double"


def _tensors(*shapes, dtype=torch.float32):
    """Tensors of these shapes whose values every op changes (no 0 or 1)."""
    return [(torch.rand(s, dtype=torch.float64) + 0.5).to(dtype) for s in shapes]


def _set(name, value):
    return lambda args: args.__setitem__(name, value)


def _replace(name, i, value):
    return lambda args: args[name].__setitem__(i, value)


def _tamper(field, r, i, change):
    """Corrupts the next LaunchLists: field of tensor i of list r, changed by `change` (old value -> new)."""
    return lambda args: args.__setitem__("tamper", (field, r, i, change))


def _ewc_lists():
    return dict({name: _tensors(3, 2) for name in ("params", "anchors", "fisher", "grads")}, grad_out=torch.ones(()))


def _fisher_lists():
    return dict(fisher=_tensors(3, 2), grads=_tensors((4, 3), 2))


def _ema_lists():
    skip = torch.zeros(1, dtype=torch.bool)
    return dict(grads=_tensors(3, 2), mean=_tensors(3, 2), var=_tensors(3, 2), inv_scale=torch.ones(1),
                alpha=torch.full((2,), 0.5), var_scale=torch.ones(2), skip=skip)  # fmt: skip


def _adamw_lists():
    lists = ("params", "grads", "exp_avg", "exp_avg_sq", "anchors", "fisher", "omega")
    return dict({name: _tensors(3, 2) for name in lists}, factors=None, ema_mean=[], ema_var=[])


def _merge_lists():
    models = [_tensors(3, 2), _tensors(3, 2)]
    return dict(out=_tensors(3, 2), models=models, weights=[0.5, 0.5], fisher=None, floors=None)


def _rows_lists():
    return dict(logits=torch.ones(4, 5), temperature=1.5)


def _adamw(emu, a):
    steps = [torch.zeros(()) for _ in a["params"]]
    emu.protected_adamw_step(a["params"], a["grads"], a["exp_avg"], a["exp_avg_sq"], steps, a["anchors"],
                             a["fisher"], a["factors"], a["ema_mean"], a["ema_var"], None, None, a["omega"], None,
                             None, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.5, 0.5, False)  # fmt: skip


def _rows(emu, a):
    logits = a["logits"]
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    emu.anchored_lm_loss_rows(logits, logits, labels, None, torch.ones(1), 0.5, a["temperature"], False, -100)


# op: (valid arguments, the emulated call, the names of the lists it writes)
BAD_METADATA_OPS = {
    "ewc_penalty": (_ewc_lists, lambda emu, a: emu.ewc_penalty(a["params"], a["anchors"], a["fisher"], 0.5), ()),
    "ewc_penalty_accumulate": (
        _ewc_lists, lambda emu, a: emu.ewc_penalty(a["params"], a["anchors"], a["fisher"], 0.5, a["grads"]), ("grads",),
    ),
    "ewc_penalty_backward": (
        _ewc_lists,
        lambda emu, a: emu.ewc_penalty_backward(a["params"], a["anchors"], a["fisher"], 0.5, a["grad_out"]),
        (),
    ),
    "fisher_update": (_fisher_lists, lambda emu, a: emu.fisher_update(a["fisher"], a["grads"], 0.9, 1.0, False),
                      ("fisher",)),
    "scale_grads": (lambda: dict(grads=_tensors(3, 2), factors=torch.full((2,), 0.5)),
                    lambda emu, a: emu.scale_grads(a["grads"], a["factors"]), ("grads",)),
    "grad_moments": (lambda: dict(grads=_tensors(3, 2), inv_scale=torch.ones(1)),
                     lambda emu, a: emu.grad_moments(a["grads"], a["inv_scale"]), ()),
    "grad_ema_stats": (
        _ema_lists, lambda emu, a: emu.grad_ema_stats(a["grads"], a["mean"], a["var"], a["inv_scale"], a["alpha"]), (),
    ),
    "grad_ema_protect": (
        _ema_lists,
        lambda emu, a: emu.grad_ema_protect(a["grads"], a["mean"], a["var"], a["inv_scale"], a["alpha"],
                                            a["var_scale"], a["skip"], 0.5),
        ("grads", "mean", "var"),
    ),
    "protected_adamw_step": (_adamw_lists, _adamw, ("params", "exp_avg", "exp_avg_sq", "omega")),
    "weight_merge": (
        _merge_lists,
        lambda emu, a: emu.weight_merge(a["out"], a["models"], a["weights"], a["fisher"], a["floors"]), ("out",),
    ),
    "anchored_lm_loss_rows": (_rows_lists, _rows, ()),
}  # fmt: skip

# (op, what is wrong, the corruption, the message): per op a role of another size, a wrong dtype code, a missing
# pointer and a list of another length, where the op has them, and its own per-tensor arguments.
BAD_METADATA = [
    ("ewc_penalty", "a role of another size", _replace("anchors", 1, torch.ones(3)),
     "anchors[1] has shape [3] but params[1] has shape [2]"),
    ("ewc_penalty", "a wrong dtype code", _tamper("dtype", 2, 0, lambda _: 7),
     "fastforget: fisher[0] " + UNSUPPORTED.format(7)),
    ("ewc_penalty", "an integer tensor", _replace("params", 0, torch.ones(3, dtype=torch.int32)),
     "fastforget: params[0] " + UNSUPPORTED.format(-1)),
    ("ewc_penalty", "a missing pointer", _tamper("ptr", 1, 1, lambda _: 0),
     "fastforget: anchors[1] has 2 elements but no data pointer"),
    ("ewc_penalty", "a list of another length", _set("fisher", _tensors(3)), "fisher has 1 tensors but params has 2"),
    ("ewc_penalty_accumulate", "a role of another size", _replace("grads", 1, torch.ones(1, 2)),
     "grads[1] has shape [1, 2] but params[1] has shape [2]"),
    ("ewc_penalty_accumulate", "a misaligned pointer", _tamper("ptr", 3, 0, lambda p: p + 2),
     "fastforget: grads[0] is not aligned to its 4-byte elements"),
    ("ewc_penalty_accumulate", "a list of another length", _set("grads", _tensors(3)),
     "grads has 1 tensors but params has 2"),
    ("ewc_penalty_backward", "grad_out of two elements", _set("grad_out", torch.ones(2)),
     "fastforget: grad_out has 2 elements; expected 1"),
    ("ewc_penalty_backward", "a wrong dtype code", _tamper("dtype", 0, 1, lambda _: 4),
     "fastforget: params[1] " + UNSUPPORTED.format(4)),
    ("fisher_update", "a role of another size", _replace("grads", 1, torch.ones(3)),
     "grads[1] has shape [3]; expected [2] or (k, [2])"),
    ("fisher_update", "a wrong dtype code", _tamper("dtype", 0, 1, lambda _: -3),
     "fastforget: fisher[1] " + UNSUPPORTED.format(-3)),
    ("fisher_update", "a missing pointer", _tamper("ptr", 1, 0, lambda _: 0),
     "fastforget: grads[0] has 12 elements but no data pointer"),
    ("fisher_update", "a list of another length", _set("grads", _tensors(3)), "grads has 1 tensors but fisher has 2"),
    ("scale_grads", "factors of another length", _set("factors", torch.ones(1)),
     "fastforget: factors has 1 elements; expected 2"),
    ("scale_grads", "a wrong dtype code", _tamper("dtype", 0, 0, lambda _: 9),
     "fastforget: grads[0] " + UNSUPPORTED.format(9)),
    ("scale_grads", "a missing pointer", _tamper("ptr", 0, 1, lambda _: 0),
     "fastforget: grads[1] has 2 elements but no data pointer"),
    ("grad_moments", "inv_scale of two elements", _set("inv_scale", torch.ones(2)),
     "fastforget: inv_scale has 2 elements; expected 1"),
    ("grad_moments", "a wrong dtype code", _tamper("dtype", 0, 1, lambda _: 5),
     "fastforget: grads[1] " + UNSUPPORTED.format(5)),
    ("grad_moments", "a missing pointer", _tamper("ptr", 0, 0, lambda _: 0),
     "fastforget: grads[0] has 3 elements but no data pointer"),
    ("grad_ema_stats", "a role of another size", _replace("var", 0, torch.ones(4)),
     "var[0] has shape [4] but grads[0] has shape [3]"),
    ("grad_ema_stats", "alpha of another length", _set("alpha", torch.ones(1)),
     "fastforget: alpha has 1 elements; expected 2"),
    ("grad_ema_stats", "a list of another length", _set("mean", _tensors(3)), "mean has 1 tensors but grads has 2"),
    ("grad_ema_stats", "state of another dtype", _replace("mean", 1, torch.ones(2, dtype=torch.bfloat16)),
     "fastforget: mean[1] is BFloat16; expected Float, the accumulation dtype"),
    ("grad_ema_protect", "var_scale of another length", _set("var_scale", torch.ones(3)),
     "fastforget: var_scale has 3 elements; expected 2"),
    ("grad_ema_protect", "skip of two elements", _set("skip", torch.zeros(2, dtype=torch.bool)),
     "fastforget: skip has 2 elements; expected 1"),
    ("grad_ema_protect", "a wrong dtype code", _tamper("dtype", 2, 0, lambda _: 1),
     "fastforget: var[0] is BFloat16; expected Float, the accumulation dtype"),
    ("grad_ema_protect", "a missing pointer", _tamper("ptr", 1, 1, lambda _: 0),
     "fastforget: mean[1] has 2 elements but no data pointer"),
    ("protected_adamw_step", "a role of another size", _replace("exp_avg_sq", 0, torch.ones(5)),
     "exp_avg_sq[0] has shape [5] but params[0] has shape [3]"),
    ("protected_adamw_step", "state of another dtype", _replace("omega", 1, torch.ones(2, dtype=torch.float64)),
     "fastforget: omega[1] is Double; expected Float, the accumulation dtype"),
    ("protected_adamw_step", "a wrong dtype code", _tamper("dtype", 5, 1, lambda _: 6),
     "fastforget: fisher[1] " + UNSUPPORTED.format(6)),
    ("protected_adamw_step", "a missing pointer", _tamper("ptr", 2, 1, lambda _: 0),
     "fastforget: exp_avg[1] has 2 elements but no data pointer"),
    ("protected_adamw_step", "a list of another length", _set("fisher", _tensors(3)),
     "fisher has 1 tensors but params has 2"),
    ("protected_adamw_step", "a list its mode does not use",
     lambda args: args.update(factors=torch.ones(2), ema_mean=_tensors(3, 2), ema_var=_tensors(3, 2)),
     "fastforget: ema_mean given, but its mode is off"),
    ("weight_merge", "a model of another size", _set("models", [_tensors(3, 2), _tensors(3, 4)]),
     "fastforget: source 3 of weight_merge has shape [4]; expected [2]"),
    ("weight_merge", "models of another count", _set("models", [_tensors(3, 2), _tensors(3)]),
     "fastforget: models has 3 tensors; expected 2 x 2"),
    ("weight_merge", "a wrong dtype code", _tamper("dtype", 0, 0, lambda _: 8),
     "fastforget: out[0] " + UNSUPPORTED.format(8)),
    ("weight_merge", "a missing pointer", _tamper("ptr", 0, 1, lambda _: 0),
     "fastforget: out[1] has 2 elements but no data pointer"),
    ("weight_merge", "floors without a Fisher", _set("floors", [0.0, 0.0]),
     "fastforget: floors has 2 entries; expected 0"),
    ("anchored_lm_loss_rows", "an empty vocabulary", _set("logits", torch.ones(4, 0)),
     "fastforget: logits has an empty vocabulary"),
    ("anchored_lm_loss_rows", "a temperature of 0", _set("temperature", 0.0),
     "fastforget: temperature must be finite and > 0"),
    ("anchored_lm_loss_rows", "integer logits", _set("logits", torch.ones(4, 5, dtype=torch.int32)),
     "fastforget: logits " + UNSUPPORTED.format(-1)),
]  # fmt: skip


@pytest.mark.parametrize(
    "op, what, corrupt, message", BAD_METADATA, ids=[f"{op}-{what}" for op, what, *_ in BAD_METADATA]
)
def test_inconsistent_metadata_is_refused_like_the_binding(emu, op, what, corrupt, message):
    make, call, written = BAD_METADATA_OPS[op]
    args = make()
    before = {name: [t.clone() for t in args[name]] for name in written}
    call(emu, args)  # the valid call runs, and writes
    for name, tensors in before.items():
        assert not all(torch.equal(t, b) for t, b in zip(args[name], tensors)), f"the valid call wrote no {name}"
    args = make()
    corrupt(args)
    emu.tamper = args.pop("tamper", None)
    before = {name: [t.clone() for t in args[name]] for name in written}
    with pytest.raises(LaunchError) as refused:
        call(emu, args)
    emu.tamper = None
    assert refused.value.code == 1, refused.value  # cudaErrorInvalidValue: refused, not a failed launch
    assert refused.value.message == message
    for name, tensors in before.items():
        for t, b in zip(args[name], tensors):
            assert torch.equal(raw_bytes(t), raw_bytes(b)), f"{name} was written"


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
    "histogram flushed before every thread counted": (
        "mofo.cuh",
        "    if (digit >= 0) atomicAdd(&counts[digit], 1);\n  }\n  __syncthreads();\n",
        "    if (digit >= 0) atomicAdd(&counts[digit], 1);\n  }\n",
        lambda emu: test_mofo_histogram(emu, CHUNK, torch.float32),
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
    for header in SHARED_HEADERS(CSRC):
        shutil.copy(header, root)
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
