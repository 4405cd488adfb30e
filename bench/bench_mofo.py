"""Benchmark of MoFO's optimizer step: ProtectedAdamW(mofo_fraction=0.15) against the plain ProtectedAdamW step
and against the authors' AdamW_MoFO approach (per tensor: AdamW's moments, then torch.topk(|m|, k) for the
threshold and a masked addcdiv), on a LLaMA-shaped fp32 list (8 blocks of width 512, ~25M parameters in 74
tensors; the 1-D norm weights are updated fully, as MoFO does).

``test_goals`` times the variants alternately in one run (rounds of one step each) and records the medians of
the per-round ratios: mofo vs plain (goal <= 1.5x the time) and topk_reference vs mofo (goal >= 3x).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_mofo.py [--benchmark-disable]
CLI:    python bench/bench_mofo.py [--repeats N]
"""

import math
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

FRACTION, LR, WEIGHT_DECAY, BETAS, EPS = 0.15, 1e-4, 0.01, (0.9, 0.999), 1e-8


def llama_shapes(smoke: bool) -> list[tuple[int, ...]]:
    """Embedding, 8 blocks (4 attention projections, 3 MLP projections, 2 norm weights), final norm."""
    width, ffn, vocab = (32, 80, 100) if smoke else (512, 1280, 2000)
    block = [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]
    return [(vocab, width), *block * 8, (width,)]


def make_params(device) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, device=device)) for s in llama_shapes(harness.smoke_mode())]
    for p in params:
        p.grad = 1e-3 * torch.randn_like(p)
    return params


class TopkReference:
    """AdamW_MoFO's step as the authors write it: per tensor, decay, moments, torch.topk for the threshold of the
    tensors of 2+ dimensions, masked addcdiv."""

    def __init__(self, params):
        self.params = params
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = BETAS
        step_size = LR / (1 - b1**self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            p.mul_(1 - LR * WEIGHT_DECAY)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            h = (v.sqrt() / math.sqrt(1 - b2**self.t)).add_(EPS)
            k = int(p.numel() * FRACTION)
            if p.dim() >= 2 and k > 0:
                threshold = torch.topk(m.abs().view(-1), k)[0].min()
                p.addcdiv_(torch.where(m.abs() >= threshold, m, 0), h, value=-step_size)
            else:
                p.addcdiv_(m, h, value=-step_size)


def variants(device):
    """(name, step) of each variant, each on its own copy of the parameters."""
    plain = ff.optim.ProtectedAdamW(make_params(device), lr=LR, weight_decay=WEIGHT_DECAY)
    mofo = ff.optim.ProtectedAdamW(make_params(device), lr=LR, weight_decay=WEIGHT_DECAY, mofo_fraction=FRACTION)
    reference = TopkReference(make_params(device))
    return [("plain", plain.step), ("mofo", mofo.step), ("topk_reference", reference.step)]


def goal_ratios(repeats: int) -> dict:
    device = harness.bench_device()
    named = variants(device)
    samples = harness.interleaved_samples([fn for _, fn in named], repeats)
    ms = {name: statistics.median(times) for (name, _), times in zip(named, samples)}
    by_name = dict(zip((name for name, _ in named), samples))
    return {
        "ms": ms,
        "mofo_vs_plain": harness.median_ratio(by_name["mofo"], by_name["plain"]),
        "topk_reference_vs_mofo": harness.median_ratio(by_name["topk_reference"], by_name["mofo"]),
    }


def numel() -> int:
    return sum(math.prod(s) for s in llama_shapes(harness.smoke_mode()))


def test_goals(benchmark):
    result = benchmark.pedantic(lambda: goal_ratios(harness.default_repeats()), rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if not isinstance(v, dict)})
    assert result["mofo_vs_plain"] > 0 and result["topk_reference_vs_mofo"] > 0


def main() -> None:
    parser = harness.arg_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    shapes = llama_shapes(harness.smoke_mode())
    print(f"MoFO step on {harness.bench_device()}: {len(shapes)} fp32 tensors, {numel():,} parameters")
    result = goal_ratios(args.repeats)
    harness.print_table(
        ["variant", "ms", "vs plain"],
        [[name, f"{ms:.1f}", f"{ms / result['ms']['plain']:.2f}x"] for name, ms in result["ms"].items()],
    )
    harness.print_table(
        ["ratio (median of per-round ratios)", "measured", "goal"],
        [
            ["mofo / plain", f"{result['mofo_vs_plain']:.2f}x", "<= 1.5x"],
            ["topk_reference / mofo", f"{result['topk_reference_vs_mofo']:.2f}x", ">= 3x"],
        ],
    )


if __name__ == "__main__":
    main()
