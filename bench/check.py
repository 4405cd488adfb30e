"""`make check`: verify every backend usable here against the reference, then print the benchmark table.

Verification: a GPT-2-shaped list (scaled down) in fp32/bf16/fp16 params with fp32 and bf16 Fisher; penalty and
gradient of both the autograd form and the in-place form must match ff.ewc_penalty_ref within the tolerance table
of fastforget.testing. Triton is verified under its interpreter when there is no GPU.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastforget defines its Triton kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import bench_ewc_penalty, harness  # noqa: E402
from fastforget.testing import assert_close  # noqa: E402

LAM = 0.4
# small under the Triton interpreter, which runs kernels in numpy
VERIFY_SCALE = {"cpu": 0.1, "cuda": 0.5, "triton": 0.5 if torch.cuda.is_available() else 0.02}


def verify(backend, device, param_dtype, fisher_dtype):
    torch.manual_seed(0)
    params = harness.gpt2_tensors(VERIFY_SCALE[backend], device, param_dtype)
    anchors = [p + 0.1 * torch.randn_like(p) for p in params]
    fisher = [torch.rand(p.shape, device=device, dtype=fisher_dtype) for p in params]
    results = {}
    for name in ("reference", backend):
        leaves = [p.clone().requires_grad_() for p in params]
        penalty = ff.ewc_penalty(leaves, anchors, fisher, LAM, backend=name)
        penalty.backward()
        inplace = [p.clone() for p in params]
        for p in inplace:
            p.grad = torch.ones_like(p)
        results[name] = (
            penalty.detach(),
            [p.grad for p in leaves],
            ff.ewc_penalty_(inplace, anchors, fisher, LAM, backend=name),
            [p.grad for p in inplace],
        )
    (ref_pen, ref_grads, ref_pen2, ref_grads2), (pen, grads, pen2, grads2) = results["reference"], results[backend]
    assert_close(pen, ref_pen, torch.float32)
    assert_close(pen2, ref_pen2, torch.float32)
    for got, want in zip(grads + grads2, ref_grads + ref_grads2):
        assert_close(got, want, param_dtype)
    return sum(p.numel() for p in params)


def main():
    status = ff.available_backends()
    print("backends:")
    for name, s in status.items():
        print(f"  {name:10s} {'yes' if s.available else 'no':4s} {s.reason}")
    print("\nverification against ff.ewc_penalty_ref (penalty and gradients, autograd and in-place):")
    failures = 0
    for backend in ("cpu", "cuda", "triton"):
        device = torch.device("cpu" if backend == "cpu" else "cuda" if torch.cuda.is_available() else "cpu")
        if ff.dispatch._why_not(backend, device.type):
            print(f"  {backend:7s} skipped: {ff.dispatch._why_not(backend, device.type)}")
            continue
        for param_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for fisher_dtype in (torch.float32, torch.bfloat16):
                label = (
                    f"{backend:7s} on {device.type}: params {str(param_dtype)[6:]:8s} fisher {str(fisher_dtype)[6:]:8s}"
                )
                try:
                    numel = verify(backend, device, param_dtype, fisher_dtype)
                    print(f"  {label} PASS ({numel:,} elements)")
                except AssertionError as error:
                    failures += 1
                    print(f"  {label} FAIL\n{error}")
    if failures:
        sys.exit(f"{failures} verification(s) failed")
    print()
    bench_ewc_penalty.main()


if __name__ == "__main__":
    main()
