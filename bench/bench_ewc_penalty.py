"""Benchmarks of the EWC penalty, lam * sum_i sum_j F_ij (theta_ij - anchor_ij)^2, with its gradient.

Every variant computes the penalty and the params' gradient 2 * lam * F * (theta - anchor) over the same
GPT-2-small-shaped fp32 list. Bytes moved per element (4 B for each fp32 tensor read or written once):
  fresh grad (eager_reference, compiled_reference, fused_autograd): read theta, anchor, F; write grad  = 16 B
  grad accumulated in place (foreach, fused_inplace):      read theta, anchor, F, grad; write grad     = 20 B

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_ewc_penalty.py [--benchmark-disable]
CLI:    python bench/bench_ewc_penalty.py [--scale S] [--repeats N]   (or python -m bench.bench_ewc_penalty)
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

LAM = 0.5
FRESH_GRAD_BYTES = 4 * harness.FP32_BYTES
ACCUMULATE_BYTES = 5 * harness.FP32_BYTES


@dataclass
class EwcInputs:
    params: list[torch.Tensor]  # leaves that require grad
    anchors: list[torch.Tensor]
    fisher: list[torch.Tensor]
    numel: int


def make_inputs(scale: float, device: torch.device) -> EwcInputs:
    torch.manual_seed(0)
    params = [p.mul_(0.02).requires_grad_() for p in harness.gpt2_tensors(scale, device)]
    anchors = [p.detach() + 1e-3 * torch.randn_like(p) for p in params]
    fisher = [torch.rand_like(p) for p in params]
    return EwcInputs(params, anchors, fisher, harness.gpt2_numel(scale))


def clear_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None


def existing_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The params' grads, zeros where there are none yet (the accumulating variants read them)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def eager_reference(inputs: EwcInputs) -> Variant:
    """The seed's code: a per-parameter loop, then autograd."""
    params, anchors, fisher = inputs.params, inputs.anchors, inputs.fisher

    def run():
        clear_grads(params)
        loss = LAM * sum((f * (p - a).pow(2)).sum() for p, a, f in zip(params, anchors, fisher))
        loss.backward()

    return Variant("eager_reference", "torch", run, FRESH_GRAD_BYTES * inputs.numel)


def foreach(inputs: EwcInputs) -> Variant:
    """torch._foreach_* ops, no autograd: the penalty plus grads += 2 * lam * F * (theta - anchor)."""
    params, anchors, fisher = inputs.params, inputs.anchors, inputs.fisher

    @torch.no_grad()
    def run():
        grads = existing_grads(params)
        diff = torch._foreach_sub(params, anchors)
        weighted = torch._foreach_mul(diff, fisher)
        torch._foreach_add_(grads, weighted, alpha=2 * LAM)
        torch._foreach_mul_(diff, weighted)  # F * (theta - anchor)^2 >= 0, so its L1 norm is its sum
        return LAM * torch.stack(torch._foreach_norm(diff, 1)).sum()

    return Variant("foreach", "torch", run, ACCUMULATE_BYTES * inputs.numel)


def compiled_reference(inputs: EwcInputs) -> Variant:
    """torch.compile of ff.ewc_penalty_ref (forward and, through AOTAutograd, backward); compiles on creation."""
    params, anchors, fisher = inputs.params, inputs.anchors, inputs.fisher
    compiled_penalty = torch.compile(ff.ewc_penalty_ref)

    def run():
        clear_grads(params)
        compiled_penalty(params, anchors, fisher, LAM).backward()

    compile_ms = harness.time_first_call_ms(run)
    return Variant("compiled_reference", "inductor", run, FRESH_GRAD_BYTES * inputs.numel, compile_ms)


@harness.per_backend
def fused_autograd(inputs: EwcInputs, backend: str) -> Variant:
    params, anchors, fisher = inputs.params, inputs.anchors, inputs.fisher

    def run():
        clear_grads(params)
        ff.ewc_penalty(params, anchors, fisher, LAM, backend=backend).backward()

    return Variant("fused_autograd", backend, run, FRESH_GRAD_BYTES * inputs.numel)


@harness.per_backend
def fused_inplace(inputs: EwcInputs, backend: str) -> Variant:
    params, anchors, fisher = inputs.params, inputs.anchors, inputs.fisher
    existing_grads(params)
    return Variant(
        "fused_inplace",
        backend,
        lambda: ff.ewc_penalty_(params, anchors, fisher, LAM, backend=backend),
        ACCUMULATE_BYTES * inputs.numel,
    )


VARIANTS = (eager_reference, foreach, compiled_reference, fused_autograd, fused_inplace)
inputs, test_variant = harness.pytest_benchmarks(make_inputs, VARIANTS)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0])
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(f"ewc_penalty on {device}: {len(inputs.params)} fp32 tensors, {inputs.numel:,} elements (scale {args.scale})")
    harness.run_variants(VARIANTS, inputs, args)


if __name__ == "__main__":
    main()
