"""`make check`: verify every backend usable here against the references, then print the benchmark tables.

Verification, on a GPT-2-shaped list (scaled down), within the tolerance table of fastforget.testing:
* ewc_penalty: fp32/bf16/fp16 params x fp32/bf16 Fisher; penalty and gradient of the autograd and in-place forms;
* fisher_update_: fp32/bf16/fp16 Fisher x fp32/bf16 gradients, plain and stacked (3 per-sample gradients);
* grad_moments (against fp64 truth), scale_grads_ and grad_ema_protect_ (fp32 state, normalize "max"):
  fp32/bf16/fp16 gradients x fp32/bf16 factors (of scale_grads_).
* lora_linear: fp32/bf16/fp16 layers without and with dropout; output and gradients of x, W, b, A, B against the
  PEFT formula evaluated in fp64.
Triton is verified under its interpreter when there is no GPU.
"""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastforget defines its Triton kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import (  # noqa: E402
    bench_ewc_penalty,
    bench_fisher_update,
    bench_grad_ema,
    bench_grad_moments,
    bench_lora_linear,
    bench_protect,
    bench_scale_grads,
    harness,
)
from fastforget.ops.grad_ema import _var_scale  # noqa: E402
from fastforget.ops.lora_linear import dropout_keep_mask  # noqa: E402
from fastforget.testing import assert_close, assert_close_matmul  # noqa: E402

LAM = 0.4
THRESHOLD, THRESHOLD_ULPS = 0.6, 8  # grad_ema_protect_'s threshold; importances this close to it are not compared
# small under the Triton interpreter, which runs kernels in numpy
VERIFY_SCALE = {"cpu": 0.1, "cuda": 0.5, "triton": 0.5 if torch.cuda.is_available() else 0.02}


def verify_ewc_penalty(backend, device, param_dtype, fisher_dtype):
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


def verify_fisher_update(backend, device, fisher_dtype, grad_dtype):
    torch.manual_seed(0)
    fisher = [f.abs() for f in harness.gpt2_tensors(VERIFY_SCALE[backend], device, fisher_dtype)]
    for stack in ((), (3,)):
        grads = [torch.randn(*stack, *f.shape, device=device, dtype=grad_dtype) for f in fisher]
        expected, got = [f.clone() for f in fisher], [f.clone() for f in fisher]
        ff.fisher_update_ref(expected, grads, 0.9, 0.5)
        ff.fisher_update_(got, grads, 0.9, 0.5, backend=backend)
        for g, e in zip(got, expected):
            assert_close(g, e)
    return sum(f.numel() for f in fisher)


def verify_protection_ops(backend, device, grad_dtype, factor_dtype):
    """grad_moments against fp64 truth, scale_grads_ and grad_ema_protect_ against their references."""
    torch.manual_seed(0)
    grads = [3 + g for g in harness.gpt2_tensors(VERIFY_SCALE[backend], device, grad_dtype)]
    moments = ff.grad_moments(grads, 0.5, backend=backend)
    assert_close(moments, ff.grad_moments_ref(grads, 0.5).to(moments.dtype), torch.float32)
    factors = torch.rand(len(grads), device=device, dtype=factor_dtype)
    expected, got = [g.clone() for g in grads], [g.clone() for g in grads]
    ff.scale_grads_ref(expected, factors)
    ff.scale_grads_(got, factors, backend=backend)
    for g, e in zip(got, expected):
        assert_close(g, e)
    mean, var = ([torch.rand(g.shape, device=device) for g in grads] for _ in range(2))
    want_mean, want_var = [m.clone() for m in mean], [v.clone() for v in var]
    expected, got = [g.clone() for g in grads], [g.clone() for g in grads]  # the same inputs for both
    ff.grad_ema_protect_(got, mean, var, 0.3, normalize="max", threshold=THRESHOLD, backend=backend)
    ff.grad_ema_protect_(expected, want_mean, want_var, 0.3, normalize="max", threshold=THRESHOLD, backend="reference")
    for m, v, e_m, e_v in zip(mean, var, want_mean, want_var):
        assert_close(m, e_m)
        assert_close(v, e_v)
    # A gradient element is scaled by (1 - importance) or kept, by importance > threshold: where the importance lies
    # within a few ulp of the threshold, backends may round to either side. Those elements are not compared.
    near = 0
    for g, e, v in zip(got, expected, want_var):
        importance = torch.sigmoid(v.double() * _var_scale(v.double().max().reshape(1), "max", 1.0))
        decided = (importance - THRESHOLD).abs() > THRESHOLD_ULPS * torch.finfo(torch.float32).eps
        near += int((~decided).sum())
        assert_close(g[decided], e[decided])
    print(f"    ({near} gradient element(s) within {THRESHOLD_ULPS} ulp of the threshold not compared)")
    return sum(g.numel() for g in grads)


def verify_lora_linear(backend, device, dtype, dropout):
    """Output and gradients (of x, W, b, A, B) against PEFT's formula in fp64, with the same dropout mask."""
    m, n_in, n_out, r = (33, 40, 24, 8) if VERIFY_SCALE[backend] < 0.05 else (1025, 256, 384, 16)
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(m, n_in, generator=g), torch.randn(n_out, generator=g)
    weight, lora_A = torch.randn(n_out, n_in, generator=g) / n_in**0.5, torch.randn(r, n_in, generator=g) / n_in**0.5
    layer = [x, weight, bias, lora_A, torch.randn(n_out, r, generator=g) / r**0.5]
    results = []
    for name, dt in ((backend, dtype), ("reference", torch.float64)):
        leaves = [t.detach().to(device, dt).requires_grad_() for t in layer]
        torch.manual_seed(1)
        keep = dropout_keep_mask((m, n_in), dropout, device) if dropout else None
        torch.manual_seed(1)
        if name == "reference":  # the truth: PEFT's formula on fp64 copies, with the same mask
            y = ff.lora_linear_ref(*leaves, 2.0, keep, dropout)
        else:
            y = ff.lora_linear(*leaves, 2.0, dropout, backend=name)
        y.backward(torch.ones_like(y))
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        assert_close_matmul(got, want, dtype)
    return m * n_in


CHECKS = {  # op -> (verify function, the two roles (dtypes or settings) it is swept over, and their values)
    "ewc_penalty": (verify_ewc_penalty, ("params", "fisher"), None),
    "fisher_update_": (verify_fisher_update, ("fisher", "grads"), None),
    "grad_moments, scale_grads_ and grad_ema_protect_": (verify_protection_ops, ("grads", "factors"), None),
    "lora_linear": (verify_lora_linear, ("layer", "dropout"), (0.0, 0.25)),
}


def main():
    status = ff.available_backends()
    print("backends:")
    for name, s in status.items():
        print(f"  {name:10s} {'yes' if s.available else 'no':4s} {s.reason}")
    failures = 0
    for op, (verify, (first, second), second_values) in CHECKS.items():
        print(f"\nverification of {op} against its reference:")
        for backend in ("cpu", "cuda", "triton"):
            device = torch.device("cpu" if backend == "cpu" else "cuda" if torch.cuda.is_available() else "cpu")
            if ff.dispatch._why_not(backend, device.type):
                print(f"  {backend:7s} skipped: {ff.dispatch._why_not(backend, device.type)}")
                continue
            for first_dtype in (torch.float32, torch.bfloat16, torch.float16):
                for second_dtype in second_values or (torch.float32, torch.bfloat16):
                    dtypes = f"{first} {str(first_dtype)[6:]:8s} {second} {str(second_dtype).removeprefix('torch.'):8s}"
                    label = f"{backend:7s} on {device.type}: {dtypes}"
                    try:
                        numel = verify(backend, device, first_dtype, second_dtype)
                        print(f"  {label} PASS ({numel:,} elements)")
                    except AssertionError as error:
                        failures += 1
                        print(f"  {label} FAIL\n{error}")
    benchmarks = (bench_ewc_penalty, bench_fisher_update, bench_grad_moments, bench_scale_grads, bench_grad_ema)
    for benchmark in (*benchmarks, bench_protect, bench_lora_linear):  # every table, even after a failed check
        print()
        benchmark.main()
    if failures:
        sys.exit(f"{failures} verification(s) failed (see FAIL above)")


if __name__ == "__main__":
    main()
