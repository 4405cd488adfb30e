"""Benchmarks of per-element gradient protection, ff.grad_ema_protect_ (GradientProtector's mode="element" step).

Every variant runs the same step on the same GPT-2-small-shaped fp32 gradient list with an fp32 mean/var state:
EMA update of m and v with alpha 0.01, importance sigmoid(v'), normalize "none". The threshold is 1.0, which no
importance exceeds, so the gradients stay as they are from run to run (repeated halving would sink them into
denormals); the work is the same as for any threshold (every element's factor is computed and g written).

Bytes moved per element, the op's minimum: read g, m, v and write m, v, g = 24 B. fastforget's kernels make two
passes (the first reads g, m, v to learn whether the step is finite, and the max of v', before anything is
written; a NaN/Inf step must leave the state untouched): 36 B, so their fraction of the add bandwidth, counted
on the 24 B minimum, is at most 24/36 = 0.67 of what they stream.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_grad_ema.py [--benchmark-disable]
CLI:    python bench/bench_grad_ema.py [--scale S] [--repeats N]   (or python -m bench.bench_grad_ema)
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402
from bench.harness import Variant  # noqa: E402
from fastforget.ops.grad_ema import _var_scale  # noqa: E402

ALPHA = 0.01
THRESHOLD = 1.0
STEP_BYTES = 6 * harness.FP32_BYTES


@dataclass
class EmaInputs:
    grads: list[torch.Tensor]
    mean: list[torch.Tensor]
    var: list[torch.Tensor]
    alpha: torch.Tensor  # (T,)
    numel: int


def make_inputs(scale: float, device: torch.device) -> EmaInputs:
    torch.manual_seed(0)
    grads = [g.mul_(1e-2) for g in harness.gpt2_tensors(scale, device)]
    mean = [torch.zeros_like(g) for g in grads]
    var = [torch.zeros_like(g) for g in grads]
    alpha = torch.full((len(grads),), ALPHA, device=device)
    return EmaInputs(grads, mean, var, alpha, harness.gpt2_numel(scale))


def reference_step(grads, mean, var, alpha):
    """The per-element step in plain torch (both passes of the op, as its reference computes them)."""
    inv_scale = torch.ones((), device=alpha.device)
    maxima = ff.grad_ema_stats_ref(grads, mean, var, inv_scale, alpha)
    found_inf = ~maxima.isfinite().all()
    ff.grad_ema_protect_ref(grads, mean, var, inv_scale, alpha, _var_scale(maxima, "none", 1.0), found_inf, THRESHOLD)


def eager_reference(inputs: EmaInputs) -> Variant:
    run = lambda: reference_step(inputs.grads, inputs.mean, inputs.var, inputs.alpha)  # noqa: E731
    return Variant("eager_reference", "torch", run, STEP_BYTES * inputs.numel)


def compiled_reference(inputs: EmaInputs) -> Variant:
    compiled = torch.compile(reference_step)
    run = lambda: compiled(inputs.grads, inputs.mean, inputs.var, inputs.alpha)  # noqa: E731
    compile_ms = harness.time_first_call_ms(run)
    return Variant("compiled_reference", "inductor", run, STEP_BYTES * inputs.numel, compile_ms)


@harness.per_backend
def fused(inputs: EmaInputs, backend: str) -> Variant:
    def run():
        ff.grad_ema_protect_(inputs.grads, inputs.mean, inputs.var, inputs.alpha, threshold=THRESHOLD, backend=backend)

    return Variant("fused", backend, run, STEP_BYTES * inputs.numel)


VARIANTS = (eager_reference, compiled_reference, fused)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(
        f"grad_ema_protect_ on {device}: {len(inputs.grads)} fp32 tensors, {inputs.numel:,} elements "
        f"(scale {args.scale}), fp32 state ({2 * harness.FP32_BYTES * inputs.numel / 1e9:.2f} GB)"
    )
    harness.run_variants(VARIANTS, inputs, args)


if __name__ == "__main__":
    main()
