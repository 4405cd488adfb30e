"""Benchmarks of the protected optimizer step: EWC gradient + per-element protection + AdamW, fused or not.

Over one GPT-2-shaped fp32 list (default scale 0.53: ~35M parameters), every variant takes one step from the same
gradients. Minimum bytes moved per parameter (4 B per fp32 tensor read or written once):
  adamw_fused (torch.optim.AdamW(fused=True)): read theta, g, m1, m2; write theta, m1, m2              = 28 B
  unfused (ff.ewc_penalty_ 20 + protector.protect_() 12 + 24 + AdamW(fused=True) 28)                  = 84 B
  fused_ewc (ProtectedAdamW, ewc only): AdamW + read anchor, F                                         = 36 B
  fused (ProtectedAdamW, ewc + element protector), compiled_reference: + read/write m, v              = 52 B

``test_goals`` times the variants alternately in one run (rounds of one run each, medians) and records the
issue's ratios: fused vs unfused (goal >= 1.3x faster), fused_ewc and fused vs adamw_fused (goal <= 1.4x the
time), and the fused step's fraction of the add bandwidth (goal >= 85 %).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_protected_adamw_step.py [--benchmark-disable]
CLI:    python bench/bench_protected_adamw_step.py [--scale S] [--repeats N]
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402
from bench.harness import Variant  # noqa: E402

DEFAULT_SCALE = 0.53  # GPT-2 small's shapes at 0.53: 35M parameters
BYTES = {"adamw_fused": 28, "unfused": 84, "fused_ewc": 36, "fused": 52, "compiled_reference": 52}
LR, WEIGHT_DECAY, LAM = 1e-4, 0.01, 0.5


def scale() -> float:
    return harness.SMOKE_SCALE if harness.smoke_mode() else float(os.environ.get("FF_BENCH_SCALE", DEFAULT_SCALE))


@dataclass
class StepInputs:
    params: list[torch.nn.Parameter]  # with .grad set
    named: list[tuple[str, torch.nn.Parameter]]
    numel: int

    def ewc(self):
        ewc = ff.EWC(self.named, lam=LAM)
        ewc.load_importance([p.detach() + 1e-3 * torch.randn_like(p) for p in self.params],
                            [torch.rand_like(p) for p in self.params])  # fmt: skip
        return ewc

    def protector(self):
        return ff.GradientProtector(self.named, window=100, threshold=0.6, mode="element")


def make_inputs(scale_: float, device: torch.device) -> StepInputs:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * t) for t in harness.gpt2_tensors(scale_, device)]
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    return StepInputs(params, [(f"p{i}", p) for i, p in enumerate(params)], harness.gpt2_numel(scale_))


def variant(name, backend, fn, inputs, **kw):
    return Variant(name, backend, fn, BYTES[name] * inputs.numel, **kw)


def adamw_fused(inputs: StepInputs) -> Variant:
    opt = torch.optim.AdamW(inputs.params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    return variant("adamw_fused", "torch", opt.step, inputs)


def unfused(inputs: StepInputs) -> Variant:
    """What ProtectedTrainer does with a plain optimizer: three passes (four kernels) per step."""
    ewc, protector = inputs.ewc(), inputs.protector()
    opt = torch.optim.AdamW(inputs.params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def run():
        ewc.apply_()
        protector.protect_()
        opt.step()

    return variant("unfused", "cpu+torch", run, inputs)


@harness.per_backend
def fused_ewc(inputs: StepInputs, backend: str) -> Variant:
    opt = ff.optim.ProtectedAdamW(inputs.params, lr=LR, weight_decay=WEIGHT_DECAY, ewc=inputs.ewc(), backend=backend)
    return variant("fused_ewc", backend, opt.step, inputs)


@harness.per_backend
def fused(inputs: StepInputs, backend: str) -> Variant:
    opt = ff.optim.ProtectedAdamW(
        inputs.params, lr=LR, weight_decay=WEIGHT_DECAY, ewc=inputs.ewc(), protector=inputs.protector(),
        backend=backend,
    )  # fmt: skip
    return variant("fused", backend, opt.step, inputs)


def compiled_reference(inputs: StepInputs) -> Variant:
    """torch.compile of ff.protected_adamw_step_ref (the same math as ``fused``, Inductor-generated) on the
    optimizer's lists; compiles on creation, which takes minutes for 148 tensors on a 2-core CPU whatever their
    size: left out in smoke mode."""
    if harness.smoke_mode():
        pytest.skip("compiling the reference step over 148 tensors takes minutes; not part of the smoke run")
    ewc, protector = inputs.ewc(), inputs.protector()
    params, count = inputs.params, len(inputs.params)
    state = [torch.zeros_like(p) for p in params for _ in range(2)]
    steps = [torch.zeros(()) for _ in params]
    alpha, var_scale = torch.full((count,), 0.01), torch.ones(count)
    compiled = torch.compile(ff.protected_adamw_step_ref)

    def run():
        compiled(
            params, [p.grad for p in params], state[0::2], state[1::2], steps, ewc.anchors, ewc.fisher, None,
            protector.mean, protector.var, alpha, var_scale, [], None, None, LR, 0.9, 0.999, 1e-8, WEIGHT_DECAY,
            LAM, protector.threshold, False,
        )  # fmt: skip

    compile_ms = harness.time_first_call_ms(run)
    return variant("compiled_reference", "inductor", run, inputs, compile_ms=compile_ms)


VARIANTS = (adamw_fused, unfused, fused_ewc, fused, compiled_reference)
inputs, test_variant = harness.pytest_benchmarks(lambda _, device: make_inputs(scale(), device), VARIANTS)


@pytest.fixture(scope="module")
def add_bandwidth_gbps(inputs) -> float:
    """GB/s of the torch.add baseline over this benchmark's parameter count."""
    return harness.add_bandwidth_gbps(inputs.numel, harness.bench_device())


def goal_ratios(inputs: StepInputs, repeats: int, with_compiled: bool = True) -> dict:
    """Times the add baseline and the variants alternately in one run; returns ms, GB/s and the goal ratios."""
    device = harness.bench_device()
    factories = [adamw_fused, unfused, lambda i: fused_ewc(i, "auto"), lambda i: fused(i, "auto")]
    if with_compiled:
        factories.append(compiled_reference)
    variants = [harness.add_baseline(inputs.numel, device)] + [f(inputs) for f in factories]
    times = harness.time_interleaved([v.fn for v in variants], repeats)
    ms = {v.name: t for v, t in zip(variants, times)}
    gbps = {v.name: harness.gbps(v.bytes_moved, t) for v, t in zip(variants, times)}
    return {
        "ms": ms,
        "gbps": gbps,
        "fused_speedup_vs_unfused": ms["unfused"] / ms["fused"],
        "fused_vs_adamw_fused": ms["fused"] / ms["adamw_fused"],
        "fused_ewc_vs_adamw_fused": ms["fused_ewc"] / ms["adamw_fused"],
        "fused_bandwidth_fraction": gbps["fused"] / gbps["bandwidth_baseline"],
        "fused_ewc_bandwidth_fraction": gbps["fused_ewc"] / gbps["bandwidth_baseline"],
        "adamw_fused_bandwidth_fraction": gbps["adamw_fused"] / gbps["bandwidth_baseline"],
    }


def test_goals(benchmark, inputs):
    result = benchmark.pedantic(
        lambda: goal_ratios(inputs, harness.default_repeats(), with_compiled=not harness.smoke_mode()),
        rounds=1,
        iterations=1,
    )
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, dict)})
    assert result["fused_speedup_vs_unfused"] > 0


def main() -> None:
    parser = harness.arg_parser(__doc__.splitlines()[0])
    parser.set_defaults(scale=scale())
    parser.add_argument("--no-compiled", action="store_true", help="leave out compiled_reference (slow to compile)")
    args = parser.parse_args()
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(f"protected AdamW step on {device}: {len(inputs.params)} fp32 tensors, {inputs.numel:,} parameters")
    result = goal_ratios(inputs, args.repeats, with_compiled=not args.no_compiled)
    rows = [[name, f"{ms:.2f}", f"{result['gbps'][name]:.1f}"] for name, ms in result["ms"].items()]
    harness.print_table(["variant", "ms", "GB/s"], rows)
    for key, value in result.items():
        if not isinstance(value, dict):
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
