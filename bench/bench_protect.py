"""Benchmarks of a gradient-protection step, ff.GradientProtector against the seed's algorithm: time and state.

Both protect the same parameter list (GPT-2-small shapes, every dimension times PROTECT_SCALE * scale: about 2M
fp32 elements in 148 tensors at scale 1.0) with window 100 and threshold 0.1:
  seed       ff.SeedGradientProtector.protect_gradients(): keeps the last `window` clones of every gradient and
             runs torch.var over their stack each step. Its history is pre-filled (`window` untimed steps), so
             every timed step is at steady state: clone, drop the oldest, stack `window` gradients, var.
             On the full GPT-2-small list it would hold 100 x 0.5 GB = 50 GB, hence this benchmark's own size.
  protector  ff.GradientProtector.protect_() per backend: one fused moments pass, a (T, window, 3) fp64 ring, one
             fused scaling pass. The ring has a fixed size and every step reads all of it, so a step costs the
             same whether the window is full or not: it is not pre-filled (the Triton interpreter would take
             minutes).
  protector_element  the same with mode="element": a per-element EMA mean and variance (2 fp32 per element), two
             fused passes (bench_grad_ema.py times the op alone on the full GPT-2-small list).
Every step (timed) first restores each .grad from a stored gradient (one torch._foreach_copy_), so that repeated
protection does not shrink the gradients towards 0. That copy is counted in both, alike: it is the restore_grads
row, and the CLI also prints the speed-up with its time subtracted from both.

State bytes: the protector's state_bytes() (ring and heads: O(T * window), independent of the tensors' sizes);
the seed's: the bytes of every tensor in its gradient_history once the window is full (window x the gradients).
Bytes moved per element, the step's minimum: restore (read the stored gradient, write g) 8 B + protect (read g for
its moments; read and write g to scale it) 12 B = 20 B (element mode: read g, m, v, write m, v, g: 8 + 24 = 32 B);
the seed's actual traffic is about window times that.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_protect.py [--benchmark-disable]
CLI:    python bench/bench_protect.py [--scale S] [--repeats N]   (or python -m bench.bench_protect)
"""

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402
from bench.harness import Variant  # noqa: E402

WINDOW = 100
THRESHOLD = 0.1
PROTECT_SCALE = 0.127  # GPT-2-small dimensions times this: 2,030,818 elements (harness.gpt2_numel(0.127))
RESTORE_BYTES = 2 * harness.FP32_BYTES
STEP_BYTES = RESTORE_BYTES + 3 * harness.FP32_BYTES
ELEMENT_STEP_BYTES = RESTORE_BYTES + 6 * harness.FP32_BYTES  # read g, m, v; write m, v, g


@dataclass
class ProtectInputs:
    stored: list[torch.Tensor]  # the gradients every step starts from
    numel: int


def make_inputs(scale: float, device: torch.device) -> ProtectInputs:
    torch.manual_seed(0)
    dimension_scale = PROTECT_SCALE * scale
    stored = [g.mul_(1e-2) for g in harness.gpt2_tensors(dimension_scale, device)]
    return ProtectInputs(stored, harness.gpt2_numel(dimension_scale))


def parameters_with_grads(inputs: ProtectInputs) -> tuple[list[tuple[str, torch.Tensor]], list[torch.Tensor]]:
    """A fresh (name, parameter) list whose .grads are copies of the stored gradients, and those .grads."""
    named = [(f"p{i}", torch.nn.Parameter(torch.zeros_like(g))) for i, g in enumerate(inputs.stored)]
    for (_, p), g in zip(named, inputs.stored):
        p.grad = g.clone()
    return named, [p.grad for _, p in named]


def restoring_step(grads: list[torch.Tensor], stored: list[torch.Tensor], protect: Callable[[], object]):
    """One step: restore the .grads (protection scales them in place), then protect them."""

    def run():
        torch._foreach_copy_(grads, stored)
        protect()

    return run


def seed(inputs: ProtectInputs) -> Variant:
    """The seed's algorithm, its history filled by `window` untimed steps."""
    named, grads = parameters_with_grads(inputs)
    protector = ff.SeedGradientProtector(named, importance_threshold=THRESHOLD, window=WINDOW)
    run = restoring_step(grads, inputs.stored, protector.protect_gradients)
    with warnings.catch_warnings():  # torch.var of a one-element history (a one-element tensor at step 1) warns
        warnings.filterwarnings("ignore", "var.*degrees of freedom", UserWarning)
        for _ in range(WINDOW):
            run()
    history = protector.gradient_history
    if len(history) != len(grads) or any(len(clones) != WINDOW for clones in history.values()):
        raise RuntimeError("the seed's gradient history is not full after `window` steps")
    state_bytes = sum(harness.tensor_bytes(clones) for clones in history.values())
    return Variant("seed", "torch", run, STEP_BYTES * inputs.numel, state_bytes=state_bytes)


@harness.per_backend
def protector(inputs: ProtectInputs, backend: str, mode: str = "tensor") -> Variant:
    named, grads = parameters_with_grads(inputs)
    protector = ff.GradientProtector(named, window=WINDOW, threshold=THRESHOLD, mode=mode, backend=backend)
    run = restoring_step(grads, inputs.stored, protector.protect_)
    step_bytes = STEP_BYTES if mode == "tensor" else ELEMENT_STEP_BYTES
    name = "protector" if mode == "tensor" else "protector_element"
    return Variant(name, backend, run, step_bytes * inputs.numel, state_bytes=protector.state_bytes())


@harness.per_backend
def protector_element(inputs: ProtectInputs, backend: str) -> Variant:
    return protector(inputs, backend, "element")


def restore_grads(inputs: ProtectInputs) -> Variant:
    """The restore copy alone (part of every step above)."""
    _, grads = parameters_with_grads(inputs)
    stored = inputs.stored
    return Variant("restore_grads", "torch", lambda: torch._foreach_copy_(grads, stored), RESTORE_BYTES * inputs.numel)


VARIANTS = (seed, protector, protector_element, restore_grads)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


@pytest.fixture(scope="module")
def add_bandwidth_gbps(inputs) -> float:
    """The add baseline over this benchmark's element count (not the GPT-2 list's, as conftest.py's)."""
    return harness.add_bandwidth_gbps(inputs.numel, harness.bench_device())


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(
        f"protect on {device}: {len(inputs.stored)} fp32 tensors, {inputs.numel:,} elements "
        f"(GPT-2 dimensions x {PROTECT_SCALE * args.scale:g}), window {WINDOW}, threshold {THRESHOLD}; ms per step"
    )
    variants, (seed_ms, *protector_ms, restore_ms) = harness.run_variants(VARIANTS, inputs, args, reference="seed")
    protectors = variants[1:-1]  # between seed and restore_grads
    print("restore_grads: the .grad restore copy that every step above includes (its speedup means nothing)")
    for variant, ms in zip(protectors, protector_ms):
        if ms > restore_ms:
            print(
                f"{variant.name} ({variant.backend}) without the restore copy: {ms - restore_ms:.3f} ms/step against "
                f"the seed's {seed_ms - restore_ms:.3f}: {(seed_ms - restore_ms) / (ms - restore_ms):.2f}x"
            )
    full = harness.gpt2_numel()
    print(
        f"on the full GPT-2-small list ({full:,} elements) the seed's history would hold "
        f"{WINDOW * full * harness.FP32_BYTES / 1e9:.1f} GB (not run); the protector's state does not depend on the "
        f"tensors' sizes ({protectors[0].state_bytes:,} B here for {len(inputs.stored)} tensors)"
    )


if __name__ == "__main__":
    main()
