"""Benchmarks of the in-place per-tensor gradient scaling, grads[i] *= factors[i], over a whole list.

Every variant scales the same GPT-2-small-shaped fp32 gradient list in place by a 1-D tensor of per-tensor factors
(on the gradients' device, as GradientProtector passes them). The factors are 2 and 0.5 (alternating over the
tensors) on one run and their reciprocals on the next (harness.alternate): powers of two scale exactly, so every
second run restores the gradients bit for bit and any number of runs keeps them bounded. Bytes moved per element,
the op's minimum: read g, write g = 8 B.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_scale_grads.py [--benchmark-disable]
CLI:    python bench/bench_scale_grads.py [--scale S] [--repeats N]   (or python -m bench.bench_scale_grads)
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

SCALE_BYTES = 2 * harness.FP32_BYTES


@dataclass
class ScaleInputs:
    grads: list[torch.Tensor]  # scaled in place by every variant
    factors: torch.Tensor  # (T,): 2, 0.5, 2, ...
    inverse_factors: torch.Tensor  # (T,): 1 / factors, applied on every second run
    numel: int


def make_inputs(scale: float, device: torch.device) -> ScaleInputs:
    torch.manual_seed(0)
    grads = [g.mul_(1e-2) for g in harness.gpt2_tensors(scale, device)]
    factors = torch.tensor([2.0 if i % 2 == 0 else 0.5 for i in range(len(grads))], device=device)
    return ScaleInputs(grads, factors, factors.reciprocal(), harness.gpt2_numel(scale))


def scale_loop(grads: list[torch.Tensor], factors: torch.Tensor) -> None:
    """The natural eager code: a per-tensor loop of in-place multiplies by 0-dim tensor factors."""
    for g, f in zip(grads, factors.unbind()):
        g.mul_(f)


def eager_reference(inputs: ScaleInputs) -> Variant:
    grads = inputs.grads
    run = harness.alternate(
        lambda: scale_loop(grads, inputs.factors), lambda: scale_loop(grads, inputs.inverse_factors)
    )
    return Variant("eager_reference", "torch", run, SCALE_BYTES * inputs.numel)


def foreach(inputs: ScaleInputs) -> Variant:
    """torch._foreach_mul_'s Tensor-list overload with one 0-dim factor per gradient (unbound once, outside)."""
    grads, factors, inverse_factors = inputs.grads, list(inputs.factors.unbind()), list(inputs.inverse_factors.unbind())
    run = harness.alternate(
        lambda: torch._foreach_mul_(grads, factors), lambda: torch._foreach_mul_(grads, inverse_factors)
    )
    return Variant("foreach", "torch", run, SCALE_BYTES * inputs.numel)


def compiled_reference(inputs: ScaleInputs) -> Variant:
    """torch.compile of the eager per-tensor loop; compiles on creation (factors and 1 / factors share one graph)."""
    grads = inputs.grads
    compiled_scale = torch.compile(scale_loop)
    run = harness.alternate(
        lambda: compiled_scale(grads, inputs.factors), lambda: compiled_scale(grads, inputs.inverse_factors)
    )
    compile_ms = harness.time_first_call_ms(run)
    run()  # back to the original gradients; the next run scales by factors again
    return Variant("compiled_reference", "inductor", run, SCALE_BYTES * inputs.numel, compile_ms)


@harness.per_backend
def fused(inputs: ScaleInputs, backend: str) -> Variant:
    grads = inputs.grads
    run = harness.alternate(
        lambda: ff.scale_grads_(grads, inputs.factors, backend=backend),
        lambda: ff.scale_grads_(grads, inputs.inverse_factors, backend=backend),
    )
    return Variant("fused", backend, run, SCALE_BYTES * inputs.numel)


VARIANTS = (eager_reference, foreach, compiled_reference, fused)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(f"scale_grads_ on {device}: {len(inputs.grads)} fp32 tensors, {inputs.numel:,} elements (scale {args.scale})")
    harness.run_variants(VARIANTS, inputs, args)


if __name__ == "__main__":
    main()
