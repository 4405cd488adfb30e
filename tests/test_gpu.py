"""What a GPU run must show beyond the per-op tests (which include misaligned views of every multi-tensor op): a
misaligned lora_linear (also on the CPU backends), a non-default CUDA stream, a second device, grad_moments' block
merge at >= 2**20 elements per tensor, and a tensor of more than 2**31 elements. The CUDA-only tests skip here,
with their reason; bench/gpu_check.sh runs them."""

import pytest
import torch
from conftest import CUDA, FUSED_BACKENDS

import fastforget as ff
from fastforget.testing import assert_close

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
GPU_BACKENDS = [b for b in FUSED_BACKENDS if b in ("cuda", "triton")]


def misaligned(t):
    """A contiguous copy of `t` whose data start one element into their storage (not 16-byte aligned)."""
    storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = storage[1:].view(t.shape)
    view.copy_(t)
    return view


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
