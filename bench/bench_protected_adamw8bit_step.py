"""Benchmarks of the protected AdamW step with 8-bit state (moments, and EWC's Fisher) against fp32 AdamW and
bitsandbytes' AdamW8bit.

Over one GPT-2-shaped fp32 list (default scale 0.45: 25M parameters in 148 tensors), every variant takes steps
from the same gradients. Minimum bytes moved per parameter (uint8 codes 1 B; the block scales, 4 B per 256
elements, left out):
  adamw_fused (torch.optim.AdamW(fused=True), fp32 moments): read theta, g, m1, m2; write theta, m1, m2    = 28 B
  adamw8bit (ff.protected_adamw8bit_step): read theta, g, codes1, codes2; write theta, codes1, codes2      = 14 B
  adamw8bit_ewc (the same with EWC: bf16 anchor, 8-bit Fisher): + read anchor, F                          = 17 B
  bnb_adamw8bit (bitsandbytes.optim.AdamW8bit on the CPU, same state as adamw8bit)                        = 14 B

The 8-bit variants run the op as ``ff.optim.ProtectedAdamW(state_bits=8)`` does (``run_protected_adamw8bit_step``,
one call over the list, state valid by construction). ``test_goals`` times them alternately in one run (rounds of
one run each; bitsandbytes, ~20x slower, in a few rounds of its own) and records the issue's goals: adamw8bit_ewc
<= 1.0x the time of adamw_fused, >= 10x faster than bnb_adamw8bit, and optimizer + EWC state <= 5.1 B/param.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_protected_adamw8bit_step.py [--benchmark-disable]
CLI:    python bench/bench_protected_adamw8bit_step.py [--scale S] [--repeats N] [--bnb-repeats N]
"""

import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import harness  # noqa: E402
from bench.harness import Variant  # noqa: E402
from fastforget.ops.protected_adamw8bit_step import blocks, run_protected_adamw8bit_step  # noqa: E402
from fastforget.quantize import dynamic_map, quantize_blockwise  # noqa: E402

DEFAULT_SCALE = 0.45  # GPT-2 small's shapes at 0.45: 25.3M parameters
BYTES = {"adamw_fused": 28, "adamw8bit": 14, "adamw8bit_ewc": 17, "bnb_adamw8bit": 14}
LR, BETAS, EPS, WEIGHT_DECAY, LAM = 1e-4, (0.9, 0.999), 1e-8, 0.01, 0.5


def scale() -> float:
    return harness.SMOKE_SCALE if harness.smoke_mode() else float(os.environ.get("FF_BENCH_SCALE", DEFAULT_SCALE))


@dataclass
class StepInputs:
    params: list[torch.Tensor]  # leaf tensors with .grad set
    numel: int

    def state8(self, ewc: bool) -> dict:
        """The 8-bit op's lists: zero moments as bitsandbytes initialises them; with ewc, a bf16 anchor and an
        8-bit Fisher (unsigned map) near the params."""
        device = self.params[0].device
        zero = int(dynamic_map(True).abs().argmin())  # the signed map's code of 0
        state = dict(
            exp_avg=[torch.full_like(p, zero, dtype=torch.uint8) for p in self.params],
            exp_avg_sq=[torch.zeros_like(p, dtype=torch.uint8) for p in self.params],
            exp_avg_absmax=[torch.zeros(blocks(p.numel()), device=device) for p in self.params],
            exp_avg_sq_absmax=[torch.zeros(blocks(p.numel()), device=device) for p in self.params],
            qmap_signed=dynamic_map(True, device),
            qmap_unsigned=dynamic_map(False, device),
            steps=[torch.zeros((), device=device) for _ in self.params],
            anchors=[],
            fisher=[],
            fisher_absmax=[],
        )
        if ewc:
            unsigned = dynamic_map(False, device)
            fisher = [quantize_blockwise(torch.rand_like(p), unsigned) for p in self.params]
            state.update(
                anchors=[(p.detach() + 1e-3 * torch.randn_like(p)).bfloat16() for p in self.params],
                fisher=[codes for codes, _ in fisher],
                fisher_absmax=[absmax for _, absmax in fisher],
            )
        return state


def state_bytes(tensors) -> int:
    """Bytes of the distinct tensors among ``tensors`` (a map shared by every param counts once)."""
    return harness.tensor_bytes({t.data_ptr(): t for t in tensors if t.numel()}.values())


def make_inputs(scale_: float, device: torch.device) -> StepInputs:
    torch.manual_seed(0)
    params = [(0.02 * t).requires_grad_() for t in harness.gpt2_tensors(scale_, device)]
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    return StepInputs(params, harness.gpt2_numel(scale_))


def adamw_fused(inputs: StepInputs) -> Variant:
    opt = torch.optim.AdamW(inputs.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=True)
    opt.step()  # creates the state
    state = [t for s in opt.state.values() for t in s.values()]
    nbytes = BYTES["adamw_fused"] * inputs.numel
    return Variant("adamw_fused", "torch", opt.step, nbytes, state_bytes=state_bytes(state))


def _adamw8bit(inputs: StepInputs, backend: str, ewc: bool) -> Variant:
    s = inputs.state8(ewc)
    params, grads = inputs.params, [p.grad for p in inputs.params]

    def run():
        run_protected_adamw8bit_step(
            params, grads, s["exp_avg"], s["exp_avg_sq"], s["exp_avg_absmax"], s["exp_avg_sq_absmax"],
            s["qmap_signed"], s["qmap_unsigned"], s["steps"], s["anchors"], s["fisher"], s["fisher_absmax"], None, [],
            [], None, None, [], None, None, LR, *BETAS, EPS, WEIGHT_DECAY, LAM if ewc else 0.0, 0.1, False,
            backend=backend,
        )  # fmt: skip

    tensors = [t for value in s.values() for t in (value if isinstance(value, list) else [value])]
    name = "adamw8bit_ewc" if ewc else "adamw8bit"
    return Variant(name, backend, run, BYTES[name] * inputs.numel, state_bytes=state_bytes(tensors))


@harness.per_backend
def adamw8bit(inputs: StepInputs, backend: str) -> Variant:
    return _adamw8bit(inputs, backend, ewc=False)


@harness.per_backend
def adamw8bit_ewc(inputs: StepInputs, backend: str) -> Variant:
    return _adamw8bit(inputs, backend, ewc=True)


def bnb_adamw8bit(inputs: StepInputs) -> Variant:
    """bitsandbytes' AdamW8bit with every tensor at 8 bits (min_8bit_size=0), as the 8-bit variants."""
    bnb = pytest.importorskip("bitsandbytes")
    opt = bnb.optim.AdamW8bit(inputs.params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, min_8bit_size=0)
    opt.step()  # creates the state
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return Variant("bnb_adamw8bit", "bitsandbytes", opt.step, BYTES["bnb_adamw8bit"] * inputs.numel,
                   state_bytes=state_bytes(state))  # fmt: skip


VARIANTS = (adamw_fused, adamw8bit, adamw8bit_ewc, bnb_adamw8bit)
inputs, test_variant = harness.pytest_benchmarks(lambda _, device: make_inputs(scale(), device), VARIANTS)


def memory_rows(inputs: StepInputs, variants: dict) -> list[list[str]]:
    """Optimizer (+ EWC) state per parameter of each configuration: the timed variants' own tensors, and today's
    fp32 configurations (fp32 moments + an fp32 or bf16 anchor and Fisher) from the fp32 AdamW's."""
    numel = inputs.numel
    fp32_moments = variants["adamw_fused"].state_bytes
    rows = [
        ("`torch.optim.AdamW` fp32 moments", fp32_moments),
        ("fp32 moments + EWC fp32 anchor, Fisher", fp32_moments + 8 * numel),
        ("fp32 moments + EWC bf16 anchor, Fisher (`state_dtype=torch.bfloat16`)", fp32_moments + 4 * numel),
        ("8-bit moments (`state_bits=8`)", variants["adamw8bit"].state_bytes),
        ("8-bit moments + EWC bf16 anchor, 8-bit Fisher", variants["adamw8bit_ewc"].state_bytes),
        ("`bitsandbytes.optim.AdamW8bit`", variants["bnb_adamw8bit"].state_bytes),
    ]
    return [[name, f"{nbytes / numel:.3f}"] for name, nbytes in rows]


def goal_ratios(inputs: StepInputs, repeats: int, bnb_repeats: int) -> dict:
    """Times fp32 AdamW and the 8-bit steps alternately, then the 8-bit EWC step and bitsandbytes alternately;
    returns per-variant ms, the goals' ratios (medians of per-round ratios) and the state per parameter."""
    variants = {v.name: v for v in (adamw_fused(inputs), adamw8bit(inputs, "auto"), adamw8bit_ewc(inputs, "auto"))}
    names = list(variants)
    samples = dict(zip(names, harness.interleaved_samples([variants[n].fn for n in names], repeats)))
    variants["bnb_adamw8bit"] = bnb_adamw8bit(inputs)
    ours, bnb = harness.interleaved_samples([variants["adamw8bit_ewc"].fn, variants["bnb_adamw8bit"].fn], bnb_repeats)
    ms = {name: statistics.median(times) for name, times in samples.items()}
    ms["bnb_adamw8bit"] = statistics.median(bnb)
    return {
        "ms": ms,
        "state_bytes_per_param": {n: v.state_bytes / inputs.numel for n, v in variants.items()},
        "memory_rows": memory_rows(inputs, variants),
        "adamw8bit_ewc_vs_adamw_fused": harness.median_ratio(samples["adamw8bit_ewc"], samples["adamw_fused"]),
        "adamw8bit_vs_adamw_fused": harness.median_ratio(samples["adamw8bit"], samples["adamw_fused"]),
        "speedup_vs_bnb_adamw8bit": harness.median_ratio(bnb, ours),
        "state_bytes_per_param_8bit_ewc": variants["adamw8bit_ewc"].state_bytes / inputs.numel,
    }


def test_goals(benchmark, inputs):
    result = benchmark.pedantic(
        lambda: goal_ratios(inputs, harness.default_repeats(), bnb_repeats=2), rounds=1, iterations=1
    )
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
    # per element 2 (moments) + 2 (bf16 anchor) + 1 (Fisher) B; per tensor 3 absmax of 4 B per block and a step;
    # the two maps once
    expected = sum(5 * p.numel() + 12 * blocks(p.numel()) + 4 for p in inputs.params) + 2 * 256 * 4
    assert result["state_bytes_per_param_8bit_ewc"] * inputs.numel == pytest.approx(expected)
    if not harness.smoke_mode():  # tiny tensors' per-tensor bytes dominate in smoke size
        assert result["state_bytes_per_param_8bit_ewc"] <= 5.1
    assert result["speedup_vs_bnb_adamw8bit"] > 0


def main() -> None:
    parser = harness.arg_parser(__doc__.splitlines()[0])
    parser.set_defaults(scale=scale())
    parser.add_argument("--bnb-repeats", type=int, default=3, help="rounds of the bitsandbytes comparison")
    args = parser.parse_args()
    device = harness.bench_device()
    inputs = make_inputs(args.scale, device)
    print(f"8-bit protected AdamW step on {device}: {len(inputs.params)} fp32 tensors, {inputs.numel:,} parameters")
    result = goal_ratios(inputs, args.repeats, args.bnb_repeats)
    rows = [[name, str(BYTES[name]), f"{ms:.1f}"] for name, ms in result["ms"].items()]
    harness.print_table(["variant", "B/param moved", "ms"], rows)
    harness.print_table(["optimizer + EWC state", "B/param"], result["memory_rows"])
    goals = [
        ["adamw8bit_ewc / adamw_fused (time)", f"{result['adamw8bit_ewc_vs_adamw_fused']:.2f}", "<= 1.0"],
        ["adamw8bit / adamw_fused (time)", f"{result['adamw8bit_vs_adamw_fused']:.2f}", ""],
        ["bnb_adamw8bit / adamw8bit_ewc (time)", f"{result['speedup_vs_bnb_adamw8bit']:.1f}", ">= 10"],
        ["8-bit + EWC state, B/param", f"{result['state_bytes_per_param_8bit_ewc']:.3f}", "<= 5.1"],
    ]
    harness.print_table(["goal", "measured", "target"], goals)


if __name__ == "__main__":
    main()
