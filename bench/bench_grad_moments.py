"""Benchmarks of the per-tensor gradient moments, (count, mean, M2) of every gradient of a list, as a (T, 3) tensor.

Every variant computes the moments of the same GPT-2-small-shaped fp32 gradient list (inv_scale 1.0) and returns
them as a (T, 3) tensor (fused: ff.grad_moments in one launch; the reference backend computes in fp64, slowly).
Bytes moved per element, the op's minimum: read g once = 4 B (the (T, 3) output is negligible). frac_add compares
that with torch.add's 12 B/element, so a read-only op can exceed 1.

No foreach variant: torch._foreach_* has no per-tensor mean or variance (only _foreach_norm, and sum(g^2) -
sum(g)^2 / n from norms would need sum(g), which no foreach op gives, and would cancel catastrophically anyway).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_grad_moments.py [--benchmark-disable]
CLI:    python bench/bench_grad_moments.py [--scale S] [--repeats N]   (or python -m bench.bench_grad_moments)
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

MOMENTS_BYTES = harness.FP32_BYTES
FOREACH_NOT_APPLICABLE = "torch._foreach_* has no per-tensor mean/variance reduction (see the module docstring)"


@dataclass
class MomentsInputs:
    grads: list[torch.Tensor]
    counts: torch.Tensor  # numel of each gradient, fp32, on the gradients' device
    numel: int


def make_inputs(scale: float, device: torch.device) -> MomentsInputs:
    torch.manual_seed(0)
    grads = [g.mul_(1e-2) for g in harness.gpt2_tensors(scale, device)]
    counts = torch.tensor([float(g.numel()) for g in grads], device=device)
    return MomentsInputs(grads, counts, harness.gpt2_numel(scale))


def var_mean_moments(grads: list[torch.Tensor], counts: torch.Tensor) -> torch.Tensor:
    """The natural eager code: torch.var_mean per gradient (population variance), M2 = var * count."""
    variances, means = zip(*(torch.var_mean(g, correction=0) for g in grads))
    variances, means = torch.stack(variances), torch.stack(means)
    return torch.stack([counts, means, variances * counts], dim=1)


def eager_reference(inputs: MomentsInputs) -> Variant:
    """A per-tensor torch.var_mean loop, stacked into the (T, 3) result."""
    grads, counts = inputs.grads, inputs.counts
    return Variant("eager_reference", "torch", lambda: var_mean_moments(grads, counts), MOMENTS_BYTES * inputs.numel)


def compiled_reference(inputs: MomentsInputs) -> Variant:
    """torch.compile of the per-tensor var_mean loop; compiles on creation."""
    grads, counts = inputs.grads, inputs.counts
    compiled_moments = torch.compile(var_mean_moments)

    def run():
        return compiled_moments(grads, counts)

    compile_ms = harness.time_first_call_ms(run)
    return Variant("compiled_reference", "inductor", run, MOMENTS_BYTES * inputs.numel, compile_ms)


@harness.per_backend
def fused(inputs: MomentsInputs, backend: str) -> Variant:
    grads = inputs.grads
    return Variant("fused", backend, lambda: ff.grad_moments(grads, 1.0, backend=backend), MOMENTS_BYTES * inputs.numel)


VARIANTS = (eager_reference, compiled_reference, fused)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(f"grad_moments on {device}: {len(inputs.grads)} fp32 tensors, {inputs.numel:,} elements (scale {args.scale})")
    harness.run_variants(VARIANTS, inputs, args)
    print(f"no foreach variant: {FOREACH_NOT_APPLICABLE}")


if __name__ == "__main__":
    main()
