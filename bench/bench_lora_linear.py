"""Benchmarks of the LoRA linear layer y = x W^T + b + scale * (x A^T) B^T: forward, backward, forward + backward.

A training step of an adapted layer: W and b frozen, gradients of x (a hidden state), A and B. Variants:
  ff.lora_linear      the op on each backend usable here (cpu / cuda: ATen addmm + in-place addmm_ of the rank-r
                      term; triton: the fused kernels)
  peft_module         PEFT's layer: nn.Linear + lora_B(lora_A(dropout(x))) * scale, dropout = Identity (p = 0)
  compiled_reference  torch.compile of ff.lora_linear_ref (PEFT's formula), forward and backward through Inductor
  lower_bound         the base GEMMs the layer cannot avoid: x W^T forward, dY W backward (W frozen: no dW)
FLOPs counted (2 per multiply-add) are the layer's: forward 2M(in*out + r(in + out)) (x W^T, S = x A^T, S B^T),
backward 2M(in*out + 2r(in + out)) (dY W, dS = dY B, dS A, dS^T x, dY^T S); the lower bound counts its own GEMMs.
"x bound" is a variant's time over the lower bound's in the same run.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_lora_linear.py [--benchmark-disable]
CLI:    python bench/bench_lora_linear.py [--tokens M] [--features N] [--rank R] [--dtype D] [--scale S] [--repeats N]
        (defaults: the CPU size M=4096, in=out=1024, r=16, fp32; bench/gpu_check.sh runs 8192 x 4096 x 4096 bf16)
"""

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

TOKENS, FEATURES, RANK, ALPHA = 4096, 1024, 16, 32
MODES = ("forward", "backward", "forward+backward")


@dataclass
class LoRAInputs:
    x: torch.Tensor  # (M, in), requires grad
    weight: torch.Tensor  # (out, in), frozen
    bias: torch.Tensor
    lora_A: torch.Tensor  # (r, in), trainable
    lora_B: torch.Tensor  # (out, r), trainable
    grad_y: torch.Tensor  # (M, out): the upstream gradient

    @property
    def sizes(self):
        return self.x.shape[0], self.x.shape[1], self.weight.shape[0], self.lora_A.shape[0]


def make_inputs(tokens, features, rank, dtype, device) -> LoRAInputs:
    torch.manual_seed(0)
    base = nn.Linear(features, features, device=device, dtype=dtype).requires_grad_(False)
    layer = ff.LoRALinear(base, r=rank, alpha=ALPHA)
    nn.init.normal_(layer.lora_B, std=0.02)  # a trained adapter, not the zero start
    return LoRAInputs(
        torch.randn(tokens, features, device=device, dtype=dtype, requires_grad=True),
        base.weight,
        base.bias,
        layer.lora_A,
        layer.lora_B,
        torch.randn(tokens, features, device=device, dtype=dtype),
    )


def scale(inputs: LoRAInputs) -> float:
    return ALPHA / inputs.lora_A.shape[0]


def layer_flops(inputs: LoRAInputs, mode: str) -> int:
    m, n_in, n_out, r = inputs.sizes
    forward, backward = 2 * m * (n_in * n_out + r * (n_in + n_out)), 2 * m * (n_in * n_out + 2 * r * (n_in + n_out))
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def bound_flops(inputs: LoRAInputs, mode: str) -> int:
    m, n_in, n_out, _ = inputs.sizes
    return 2 * m * n_in * n_out * (2 if mode == "forward+backward" else 1)


@dataclass
class Variant:
    name: str
    backend: str
    fn: Callable[[], object]
    flops: int
    compile_ms: float | None = None


def layer_variant(name, backend, forward, leaves, inputs, mode, compile_ms=None) -> Variant:
    """``forward()`` returns the layer's output with its graph; gradients are taken with respect to ``leaves``."""
    retained = forward() if mode == "backward" else None  # one graph, differentiated again on every run

    def run():
        if mode == "forward":
            return forward()
        if mode == "backward":
            return torch.autograd.grad(retained, leaves, inputs.grad_y, retain_graph=True)
        return torch.autograd.grad(forward(), leaves, inputs.grad_y)

    return Variant(name, backend, run, layer_flops(inputs, mode), compile_ms)


def fused(inputs: LoRAInputs, backend: str, mode: str) -> Variant:
    i = inputs

    def forward():
        return ff.lora_linear(i.x, i.weight, i.bias, i.lora_A, i.lora_B, scale(i), backend=backend)

    return layer_variant("ff.lora_linear", backend, forward, [i.x, i.lora_A, i.lora_B], inputs, mode)


class PeftStyleLoRA(nn.Module):
    """PEFT's LoRA Linear forward: result = base_layer(x) + lora_B(lora_A(lora_dropout(x))) * scaling."""

    def __init__(self, inputs: LoRAInputs):
        super().__init__()
        n_out, n_in = inputs.weight.shape
        r = inputs.lora_A.shape[0]
        options = dict(device=inputs.weight.device, dtype=inputs.weight.dtype)
        self.base_layer = nn.Linear(n_in, n_out, **options).requires_grad_(False)
        self.lora_A = nn.Linear(n_in, r, bias=False, **options)
        self.lora_B = nn.Linear(r, n_out, bias=False, **options)
        self.lora_dropout = nn.Identity()
        self.scaling = scale(inputs)
        with torch.no_grad():
            self.base_layer.weight.copy_(inputs.weight)
            self.base_layer.bias.copy_(inputs.bias)
            self.lora_A.weight.copy_(inputs.lora_A)
            self.lora_B.weight.copy_(inputs.lora_B)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


def peft_module(inputs: LoRAInputs, mode: str) -> Variant:
    module = PeftStyleLoRA(inputs)
    leaves = [inputs.x, module.lora_A.weight, module.lora_B.weight]
    return layer_variant("peft_module", "torch", lambda: module(inputs.x), leaves, inputs, mode)


def compile_reference(inputs: LoRAInputs):
    """torch.compile of ff.lora_linear_ref and the time of its first forward + backward (compiling both)."""
    compiled = torch.compile(ff.lora_linear_ref)
    i = inputs

    def first_step():
        y = compiled(i.x, i.weight, i.bias, i.lora_A, i.lora_B, scale(i))
        return torch.autograd.grad(y, [i.x, i.lora_A, i.lora_B], i.grad_y)

    with without_donated_buffers():
        return compiled, harness.time_first_call_ms(first_step)


def without_donated_buffers():
    """AOTAutograd's donated buffers (a memory saving) forbid retain_graph, which the backward-only timing needs;
    the flag is read when the graphs compile and again when a backward runs."""
    return torch._functorch.config.patch(donated_buffer=False)


def compiled_reference(inputs: LoRAInputs, mode: str, compiled, compile_ms=None) -> Variant:
    i = inputs

    def forward():
        return compiled(i.x, i.weight, i.bias, i.lora_A, i.lora_B, scale(i))

    with without_donated_buffers():
        variant = layer_variant("compiled_reference", "inductor", forward, [i.x, i.lora_A, i.lora_B], i, mode)
    run = variant.fn

    def run_without_donated_buffers():
        with without_donated_buffers():
            return run()

    variant.fn, variant.compile_ms = run_without_donated_buffers, compile_ms
    return variant


def lower_bound(inputs: LoRAInputs, mode: str) -> Variant:
    x, weight, grad_y = inputs.x.detach(), inputs.weight, inputs.grad_y
    calls = {
        "forward": lambda: torch.mm(x, weight.t()),
        "backward": lambda: torch.mm(grad_y, weight),
        "forward+backward": lambda: (torch.mm(x, weight.t()), torch.mm(grad_y, weight)),
    }
    return Variant("lower_bound", "torch.mm", calls[mode], bound_flops(inputs, mode))


def print_mode_table(mode, variants, repeats, warmup):
    """Time the variants of one mode interleaved; print median ms, TFLOP/s and the ratio to the lower bound (last;
    the median of the per-round ratios)."""
    samples = harness.interleaved_samples([v.fn for v in variants], repeats, warmup)
    rows = []
    for v, times in zip(variants, samples):
        ms, over_bound = statistics.median(times), harness.median_ratio(times, samples[-1])
        compile_ms = "-" if v.compile_ms is None else f"{v.compile_ms:.0f}"
        rows.append([v.name, v.backend, f"{ms:.2f}", f"{v.flops / ms / 1e9:.3f}", f"{over_bound:.3f}", compile_ms])
    print(f"\n{mode}:")
    harness.print_table(["variant", "backend", "ms", "TFLOP/s", "x bound", "compile_ms"], rows)


# ---------------------------------------------------------------------------------------------------- pytest


def bench_sizes():
    s = harness.bench_scale()
    return max(1, round(TOKENS * s)), max(1, round(FEATURES * s)), RANK


@pytest.fixture(scope="module")
def inputs() -> LoRAInputs:
    return make_inputs(*bench_sizes(), torch.float32, harness.bench_device())


@pytest.fixture(scope="module")
def compiled_ref(inputs):
    return compile_reference(inputs)


def record(benchmark, variant: Variant, mode: str) -> None:
    benchmark(harness.synchronized(variant.fn))
    benchmark.extra_info.update(mode=mode, flops=variant.flops)
    if variant.compile_ms is not None:
        benchmark.extra_info["compile_ms"] = variant.compile_ms
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = variant.flops / benchmark.stats.stats.median / 1e12


@pytest.mark.parametrize("mode", MODES)
def test_lower_bound(benchmark, inputs, mode):
    record(benchmark, lower_bound(inputs, mode), mode)


@pytest.mark.parametrize("mode", MODES)
def test_peft_module(benchmark, inputs, mode):
    record(benchmark, peft_module(inputs, mode), mode)


@pytest.mark.parametrize("mode", MODES)
def test_compiled_reference(benchmark, inputs, compiled_ref, mode):
    record(benchmark, compiled_reference(inputs, mode, *compiled_ref), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", ff.BACKENDS)
def test_fused(benchmark, inputs, backend, mode):
    harness.require_backend(backend, ff.available_backends(), inputs.x.device)
    record(benchmark, fused(inputs, backend, mode), mode)


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args():
    parser = harness.arg_parser(__doc__.splitlines()[0], scale_help="scales tokens and features")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="M, rows of x (default %(default)s)")
    parser.add_argument("--features", type=int, default=FEATURES, help="in = out features (default %(default)s)")
    parser.add_argument("--rank", type=int, default=RANK, help="r (default %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = harness.bench_device()
    tokens, features = max(1, round(args.tokens * args.scale)), max(1, round(args.features * args.scale))
    inputs = make_inputs(tokens, features, args.rank, getattr(torch, args.dtype), device)
    backends, skipped = harness.usable_backends(ff.available_backends(), device)
    compiled, compile_ms = compile_reference(inputs)
    print(f"lora_linear on {device}: M={tokens}, in=out={features}, r={args.rank}, {args.dtype}; W frozen, "
          f"gradients of x, A, B")  # fmt: skip
    for mode in MODES:
        variants = [
            *(fused(inputs, backend, mode) for backend in backends if backend != "reference"),
            peft_module(inputs, mode),
            compiled_reference(inputs, mode, compiled, compile_ms),
            lower_bound(inputs, mode),
        ]
        print_mode_table(mode, variants, args.repeats, args.warmup)
    print(f"\nms: median of {args.repeats}; TFLOP/s: the layer's FLOPs (see the module docstring) over ms; x bound: "
          "the median of the per-round ratios of ms to the lower bound's; compile_ms: first forward + backward of "
          "the compiled reference")  # fmt: skip
    for backend, reason in skipped.items():
        print(f"skipped backend {backend}: {reason}")


if __name__ == "__main__":
    main()
