"""What a GPU run must show beyond the per-op tests: misaligned views for every op (also on the CPU backends), a
non-default CUDA stream, a second device, grad_moments' block merge at >= 2**20 elements per tensor, and a tensor
of more than 2**31 elements. The CUDA-only tests skip here, with their reason; bench/gpu_check.sh runs them."""

import pytest
import torch
from conftest import CUDA, FUSED_BACKENDS

import fastforget as ff
from fastforget.testing import assert_close

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in FUSED_BACKENDS if b in ("cuda", "triton")]


def misaligned(t):
    """A contiguous copy of `t` whose data starts one element into its storage (not 16-byte aligned)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


def run_every_op(backend, params, anchors, fisher, grads):
    """The outputs of every op on the given tensors (in-place ones on copies made with the same alignment)."""
    same = misaligned if params[0].storage_offset() else torch.clone
    out = {"ewc_penalty": ff.ewc_penalty(params, anchors, fisher, 0.5, backend=backend)}
    g = [same(t) for t in grads]
    leaves = [same(p).requires_grad_(False) for p in params]
    for p, t in zip(leaves, g):
        p.grad = t
    out["ewc_penalty_"] = (ff.ewc_penalty_(leaves, anchors, fisher, 0.5, backend=backend), g)
    f = [same(t) for t in fisher]
    ff.fisher_update_(f, grads, 0.9, 0.5, backend=backend)
    out["fisher_update_"] = f
    out["grad_moments"] = ff.grad_moments(grads, backend=backend)
    s = [same(t) for t in grads]
    ff.scale_grads_(s, torch.linspace(0.5, 1.5, len(s), device=s[0].device), backend=backend)
    out["scale_grads_"] = s
    e, mean, var = [same(t) for t in grads], [same(t.abs()) for t in anchors], [same(t) for t in fisher]
    out["grad_ema_protect_"] = (ff.grad_ema_protect_(e, mean, var, 0.3, normalize="max", backend=backend), e, mean, var)
    return out


def flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for v in value if v is not None for t in flat(v)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_misaligned_views_give_the_aligned_results(backend):
    """Storage offset 1: the kernels' vector loads must not assume 16-byte alignment (bitwise the same)."""
    torch.manual_seed(0)
    shapes = [(4099,), (33, 7), (1,)] if backend == "triton" and not CUDA else [(70_001,), (257, 33), (1,)]
    lists = [[torch.randn(s) for s in shapes] for _ in range(4)]
    aligned = run_every_op(backend, *lists)
    shifted = run_every_op(backend, *[[misaligned(t) for t in ts] for ts in lists])
    for name in aligned:
        for a, b in zip(flat(aligned[name]), flat(shifted[name])):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_misaligned_lora_linear(backend):
    torch.manual_seed(0)
    x, w, b, A, B = torch.randn(37, 40), torch.randn(24, 40), torch.randn(24), torch.randn(8, 40), torch.randn(24, 8)
    want = ff.lora_linear(x, w, b, A, B, 2.0, backend=backend)
    got = ff.lora_linear(*(misaligned(t) for t in (x, w, b, A, B)), 2.0, backend=backend)
    assert torch.equal(got, want)


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_non_default_stream(backend):
    """The kernels go on the current (side) stream: there the inputs are written after a long sleep kernel, so a
    kernel queued on any other stream would read the zeros they held before, and give other results."""
    torch.manual_seed(0)
    source = [torch.randn(1 << 20, device="cuda"), torch.randn(4097, device="cuda")]
    grads, fisher = [torch.zeros_like(g) for g in source], [torch.zeros_like(g) for g in source]
    want = ff.grad_moments(source, backend=backend)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning on this stream only
        for g, s in zip(grads, source):
            g.copy_(s)
        got = ff.grad_moments(grads, backend=backend)
        ff.fisher_update_(fisher, grads, 1.0, 1.0, backend=backend)
    stream.synchronize()
    assert torch.equal(got, want)
    assert all(torch.equal(f, s * s) for f, s in zip(fisher, source))


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_second_device(backend):
    """Tensors on cuda:1 while cuda:0 is current: kernels run there, results right."""
    torch.manual_seed(0)
    params = [torch.randn(5000, device="cuda:1"), torch.randn(77, device="cuda:1")]
    anchors, fisher = [p + 1 for p in params], [torch.rand_like(p) for p in params]
    with torch.cuda.device(0):
        penalty = ff.ewc_penalty(params, anchors, fisher, 0.5, backend=backend)
    assert penalty.device == torch.device("cuda:1")
    assert_close(penalty, ff.ewc_penalty_ref(params, anchors, fisher, 0.5), torch.float32)


@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_grad_moments_merge_at_2_pow_20_elements(backend):
    """>= 2**20 elements per tensor: hundreds of chunks per tensor go through the block merge (fp64 truth)."""
    torch.manual_seed(0)
    grads = [3 + torch.randn(1 << 22, device="cuda"), torch.randn((1 << 20) + 7, device="cuda")]
    got = ff.grad_moments(grads, backend=backend)
    truth = ff.grad_moments_ref([g.double() for g in grads])
    assert_close(got.double(), truth, torch.float32)
    assert torch.equal(got, ff.grad_moments(grads, backend=backend))  # reproducible


@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_more_than_2_pow_31_elements(backend):
    """int64 offsets: a tensor of 2**31 + 5 bf16 elements (4 GiB, plus the Fisher), checked at its far end."""
    n = (1 << 31) + 5
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * 2 * n + (1 << 30):
        pytest.skip(f"needs {4 * 2 * n / 2**30:.0f} GiB of free GPU memory, has {free / 2**30:.0f} GiB")
    grads = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    grads[-3:] = 2.0
    fisher = torch.zeros(n, device="cuda", dtype=torch.float32)
    ff.fisher_update_([fisher], [grads], 1.0, 1.0, backend=backend)
    assert fisher[-3:].tolist() == [4.0] * 3 and fisher[0].item() == 1.0 and fisher[(1 << 31) - 1].item() == 1.0
    del fisher
    moments = ff.grad_moments([grads], backend=backend)
    assert moments[0, 0].item() == n
