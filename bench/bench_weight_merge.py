"""Benchmarks of the weight merge over a whole parameter list: WiSE-FT's in-place interpolation and a two-model
Fisher merge.

WiSE-FT, theta <- (1 - a) theta_0 + a theta over the GPT-2-small-shaped fp32 list: read theta, read theta_0, write
theta = 12 B per element, as torch.add's (frac_add is the fraction of reachable bandwidth); the eager loop makes two
passes over theta (20 B). Fisher merge of two models, theta = (w0 F0 t0 + w1 F1 t1) / (w0 F0 + w1 F1) into a third
list: read t0, t1, F0, F1, write theta = 20 B per element; the eager loop materialises its temporaries.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_weight_merge.py [--benchmark-disable]
CLI:    python bench/bench_weight_merge.py [--scale S] [--repeats N]   (or python -m bench.bench_weight_merge)
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

ALPHA = 0.5  # repeated in-place interpolation halves theta - theta_0 each run: the values stay bounded
WEIGHTS = [0.5, 0.5]
WISE_FT_BYTES = 3 * harness.FP32_BYTES
FISHER_BYTES = 5 * harness.FP32_BYTES


@dataclass
class MergeInputs:
    params: list[torch.Tensor]  # theta, interpolated in place by the WiSE-FT variants
    base: list[torch.Tensor]  # theta_0
    other: list[torch.Tensor]  # a second model for the Fisher merge
    fisher: list[list[torch.Tensor]]  # the two models' Fishers
    merged: list[torch.Tensor]  # the Fisher merge's output
    numel: int


def make_inputs(scale: float, device: torch.device) -> MergeInputs:
    torch.manual_seed(0)
    params = harness.gpt2_tensors(scale, device)
    base = [p + 0.01 * torch.randn_like(p) for p in params]
    other = [p + 0.01 * torch.randn_like(p) for p in params]
    fisher = [[torch.rand_like(p) for p in params] for _ in range(2)]
    merged = [torch.empty_like(p) for p in params]
    return MergeInputs(params, base, other, fisher, merged, harness.gpt2_numel(scale))


def eager_reference(inputs: MergeInputs) -> Variant:
    """WiSE-FT as a per-tensor loop: two in-place ops (two passes over theta) per tensor."""
    params, base = inputs.params, inputs.base

    def run():
        for p, b in zip(params, base):
            p.mul_(ALPHA).add_(b, alpha=1 - ALPHA)

    return Variant("eager_reference", "torch", run, WISE_FT_BYTES * inputs.numel)


def foreach_lerp(inputs: MergeInputs) -> Variant:
    """torch._foreach_lerp_(theta, theta_0, 1 - a): one multi-tensor pass."""
    params, base = inputs.params, inputs.base
    return Variant(
        "foreach_lerp", "torch", lambda: torch._foreach_lerp_(params, base, 1 - ALPHA), WISE_FT_BYTES * inputs.numel
    )


@harness.per_backend
def fused(inputs: MergeInputs, backend: str) -> Variant:
    params, base = inputs.params, inputs.base
    return Variant(
        "fused",
        backend,
        lambda: ff.weight_merge_(params, [base, params], [1 - ALPHA, ALPHA], backend=backend),
        WISE_FT_BYTES * inputs.numel,
    )


def fisher_eager(inputs: MergeInputs) -> Variant:
    """The Fisher merge of two models as a per-tensor loop of torch ops."""
    (f0, f1), t1 = inputs.fisher, inputs.other

    def run():
        for out, a, b, fa, fb in zip(inputs.merged, inputs.params, t1, f0, f1):
            sa, sb = WEIGHTS[0] * fa.clamp_min(1e-6), WEIGHTS[1] * fb
            torch.div(sa * a + sb * b, sa + sb, out=out)

    return Variant("fisher_eager", "torch", run, FISHER_BYTES * inputs.numel)


@harness.per_backend
def fisher_fused(inputs: MergeInputs, backend: str) -> Variant:
    def run():
        ff.weight_merge_(inputs.merged, [inputs.params, inputs.other], WEIGHTS, fisher=inputs.fisher,
                         floors=[1e-6, 0.0], backend=backend)  # fmt: skip

    return Variant("fisher_fused", backend, run, FISHER_BYTES * inputs.numel)


VARIANTS = (eager_reference, foreach_lerp, fused, fisher_eager, fisher_fused)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(
        f"weight_merge_ on {device}: {len(inputs.params)} fp32 tensors, {inputs.numel:,} elements (scale {args.scale})"
    )
    harness.run_variants(VARIANTS, inputs, args)


if __name__ == "__main__":
    main()
