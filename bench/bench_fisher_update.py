"""Benchmarks of the in-place Fisher update, F <- decay * F + scale * g^2, over a whole list.

Every variant updates the same GPT-2-small-shaped fp32 Fisher list in place from a list of grads (each run updates
it again; decay < 1 keeps it bounded). Bytes moved per element, the op's minimum (4 B for each fp32 tensor read or
written once): read F, read g; write F = 12 B, as torch.add's, so frac_add is directly the fraction of reachable
bandwidth. eager_reference and foreach make two passes over F (F *= decay, then F += scale * g^2), moving 20 B.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_fisher_update.py [--benchmark-disable]
CLI:    python bench/bench_fisher_update.py [--scale S] [--repeats N]   (or python -m bench.bench_fisher_update)
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

DECAY = 0.9
SCALE = 0.5
UPDATE_BYTES = 3 * harness.FP32_BYTES


@dataclass
class FisherInputs:
    fisher: list[torch.Tensor]  # updated in place by every variant
    grads: list[torch.Tensor]
    numel: int


def make_inputs(scale: float, device: torch.device) -> FisherInputs:
    torch.manual_seed(0)
    grads = [g.mul_(1e-2) for g in harness.gpt2_tensors(scale, device)]
    fisher = [torch.rand_like(g) for g in grads]
    return FisherInputs(fisher, grads, harness.gpt2_numel(scale))


def eager_reference(inputs: FisherInputs) -> Variant:
    """The straightforward eager code: a per-tensor loop, two in-place ops (two passes over F) per tensor."""
    fisher, grads = inputs.fisher, inputs.grads

    def run():
        for f, g in zip(fisher, grads):
            f.mul_(DECAY).addcmul_(g, g, value=SCALE)

    return Variant("eager_reference", "torch", run, UPDATE_BYTES * inputs.numel)


def foreach(inputs: FisherInputs) -> Variant:
    """torch._foreach_* ops: two multi-tensor passes over F."""
    fisher, grads = inputs.fisher, inputs.grads

    def run():
        torch._foreach_mul_(fisher, DECAY)
        torch._foreach_addcmul_(fisher, grads, grads, value=SCALE)

    return Variant("foreach", "torch", run, UPDATE_BYTES * inputs.numel)


def compiled_reference(inputs: FisherInputs) -> Variant:
    """torch.compile of ff.fisher_update_ref; compiles on creation."""
    fisher, grads = inputs.fisher, inputs.grads
    compiled_update = torch.compile(ff.fisher_update_ref)

    def run():
        compiled_update(fisher, grads, DECAY, SCALE)

    compile_ms = harness.time_first_call_ms(run)
    return Variant("compiled_reference", "inductor", run, UPDATE_BYTES * inputs.numel, compile_ms)


@harness.per_backend
def fused(inputs: FisherInputs, backend: str) -> Variant:
    fisher, grads = inputs.fisher, inputs.grads
    return Variant(
        "fused",
        backend,
        lambda: ff.fisher_update_(fisher, grads, DECAY, SCALE, backend=backend),
        UPDATE_BYTES * inputs.numel,
    )


VARIANTS = (eager_reference, foreach, compiled_reference, fused)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(
        f"fisher_update_ on {device}: {len(inputs.fisher)} fp32 tensors, {inputs.numel:,} elements (scale {args.scale})"
    )
    harness.run_variants(VARIANTS, inputs, args)


if __name__ == "__main__":
    main()
