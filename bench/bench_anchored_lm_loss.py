"""Benchmark of the anchored LM loss (CE + kl_weight T^2 KL to a reference model), forward + backward.

Every variant computes the loss of 4,096 tokens (H = 1,024, V = 32,000, fp32 by default) and the gradients of the
hidden states and of the LM head's weight:
  unfused             ff.anchored_lm_loss_ref: HF-style full logits, F.cross_entropy + F.kl_div(log_softmax)
  compiled_unfused    torch.compile of the same function (Inductor)
  fused-<backend>     ff.anchored_lm_loss (chunks of logits; the gradient computed in the forward)
  <variant>+dft       the same with token_weighting="dft" (DFT + the KL anchor: ASFT)
  <variant>+eaft      the same with token_weighting="eaft" (EAFT's top-20 entropy gate, with the KL anchor)

Peak memory is measured, not estimated: each variant runs once more in a fresh subprocess with glibc's mmap
threshold fixed at 64 KiB (every large allocation is mapped on malloc and unmapped on free), and the peak is the
process's resident high-water mark (VmHWM, reset through /proc/self/clear_refs after a warm-up run) minus its
resident size just before the measured forward + backward. The inputs are not counted; the gradients are.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_anchored_lm_loss.py [--benchmark-disable]
CLI:    python bench/bench_anchored_lm_loss.py [--scale S] [--repeats N]
"""

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

TOKENS, HIDDEN, VOCAB = 4096, 1024, 32000
KL_WEIGHT, TEMPERATURE = 0.5, 1.0
TOKEN_WEIGHTINGS = ("dft", "eaft")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LossInputs:
    hidden: torch.Tensor  # leaf, requires grad
    weight: torch.Tensor  # leaf, requires grad (the LM head)
    labels: torch.Tensor
    ref_hidden: torch.Tensor


def sizes(scale):
    return tuple(max(2, round(n * scale)) for n in (TOKENS, HIDDEN, VOCAB))


def make_inputs(tokens, hidden, vocab, device, dtype=torch.float32) -> LossInputs:
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, dtype=dtype)
    return LossInputs(
        h.clone().requires_grad_(),
        (torch.randn(vocab, hidden, device=device) * hidden**-0.5).to(dtype).requires_grad_(),
        torch.randint(0, vocab, (tokens,), device=device),
        h + 0.1 * torch.randn_like(h),
    )


def loss_step(loss_fn, inputs: LossInputs):
    """One forward + backward of loss_fn(hidden, weight, labels, ref_hidden), from cleared gradients."""

    def run():
        inputs.hidden.grad = inputs.weight.grad = None
        loss_fn(inputs.hidden, inputs.weight, inputs.labels, inputs.ref_hidden).backward()

    return run


def unfused_loss(token_weighting=None):
    def loss(hidden, weight, labels, ref_hidden):
        return ff.anchored_lm_loss_ref(
            hidden, weight, labels, ref_hidden=ref_hidden, kl_weight=KL_WEIGHT, temperature=TEMPERATURE,
            token_weighting=token_weighting,
        )  # fmt: skip

    return loss


def fused_loss(backend, token_weighting=None):
    def loss(hidden, weight, labels, ref_hidden):
        return ff.anchored_lm_loss(
            hidden, weight, labels, ref_hidden=ref_hidden, kl_weight=KL_WEIGHT, temperature=TEMPERATURE,
            backend=backend, token_weighting=token_weighting,
        )  # fmt: skip

    return loss


def variant_step(name, inputs):
    """(forward + backward function, compile ms or None) of the variant called `name` (`+dft` / `+eaft`: with that
    token weighting)."""
    name, _, weighting = name.partition("+")
    weighting = weighting or None
    if name == "unfused":
        return loss_step(unfused_loss(weighting), inputs), None
    if name == "compiled_unfused":
        step = loss_step(torch.compile(unfused_loss(weighting)), inputs)
        return step, harness.time_first_call_ms(step)
    return loss_step(fused_loss(name.removeprefix("fused-"), weighting), inputs), None


def variant_names(device):
    backends, _ = harness.usable_backends(ff.available_backends(), device)
    plain = ["unfused", "compiled_unfused", *(f"fused-{b}" for b in backends if b != "reference")]
    weighted = [f"{n}+{w}" for w in TOKEN_WEIGHTINGS for n in plain if n != "compiled_unfused"]
    return plain + weighted


# ---------------------------------------------------------------------------------------------------- peak memory


def _status_bytes(field):
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_peak_here(name, tokens, hidden, vocab) -> int:
    """Resident high-water mark of one forward + backward of `name` above the resident size before it (bytes).
    Meaningful in a process started with a small fixed MALLOC_MMAP_THRESHOLD_ (see peak_bytes)."""
    inputs = make_inputs(tokens, hidden, vocab, torch.device("cpu"))
    step, _ = variant_step(name, inputs)
    step()  # warm-up: compiles, loads libraries, creates the threads
    inputs.hidden.grad = inputs.weight.grad = None
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def peak_bytes(name, tokens, hidden, vocab) -> int | None:
    """measure_peak_here in a fresh subprocess (None where /proc is not Linux's)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bench.bench_anchored_lm_loss", "--peak-of", name]
    command += ["--tokens", str(tokens), "--hidden", str(hidden), "--vocab", str(vocab)]
    out = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


# ---------------------------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(*sizes(harness.bench_scale()), torch.device("cpu"))


PLAIN_VARIANTS = ["unfused", "compiled_unfused", *(f"fused-{b}" for b in ff.BACKENDS)]
WEIGHTED_VARIANTS = [f"{n}+{w}" for w in TOKEN_WEIGHTINGS for n in PLAIN_VARIANTS if n != "compiled_unfused"]


@pytest.mark.parametrize("name", PLAIN_VARIANTS + WEIGHTED_VARIANTS)
def test_variant(benchmark, inputs, name):
    if name.startswith("fused-"):
        backend = name.removeprefix("fused-").partition("+")[0]
        harness.require_backend(backend, ff.available_backends(), inputs.hidden.device)
        if backend == "reference":
            pytest.skip("the reference backend is the unfused variant")
    step, compile_ms = variant_step(name, inputs)
    benchmark(harness.synchronized(step))
    if compile_ms is not None:
        benchmark.extra_info["compile_ms"] = compile_ms
    if not harness.smoke_mode() or name != "compiled_unfused":  # smoke: no second compile in a subprocess
        benchmark.extra_info["peak_bytes"] = peak_bytes(name, *sizes(harness.bench_scale()))


# ---------------------------------------------------------------------------------------------------- CLI


def parse_args():
    parser = harness.arg_parser(__doc__.splitlines()[0], scale_help="scales tokens, hidden size and vocabulary")
    parser.add_argument("--tokens", type=int, default=None, help=f"N (default {TOKENS} x scale)")
    parser.add_argument("--hidden", type=int, default=None, help=f"H (default {HIDDEN} x scale)")
    parser.add_argument("--vocab", type=int, default=None, help=f"V (default {VOCAB} x scale)")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all usable)")
    parser.add_argument("--no-peak", action="store_true", help="time only, skip the peak-memory subprocesses")
    parser.add_argument("--peak-of", default=None, help=argparse.SUPPRESS)  # the subprocess of peak_bytes
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    default = sizes(args.scale)
    dims = tuple(d if a is None else a for a, d in zip((args.tokens, args.hidden, args.vocab), default))
    if args.peak_of:  # the subprocess of peak_bytes
        print(json.dumps({"peak_bytes": measure_peak_here(args.peak_of, *dims)}))
        return
    device = torch.device("cpu")
    inputs = make_inputs(*dims, device)
    names = args.variants.split(",") if args.variants else variant_names(device)
    steps = [variant_step(name, inputs) for name in names]
    samples = harness.interleaved_samples([step for step, _ in steps], args.repeats, args.warmup)
    peaks = [None if args.no_peak else peak_bytes(name, *dims) for name in names]
    print(f"anchored_lm_loss fwd+bwd on {device}, {torch.get_num_threads()} threads: N={dims[0]}, H={dims[1]}, "
          f"V={dims[2]}, fp32, kl_weight={KL_WEIGHT}, T={TEMPERATURE}")  # fmt: skip
    rows = []
    for name, (_, compile_ms), times, peak in zip(names, steps, samples, peaks):
        ms, over_unfused = statistics.median(times), harness.median_ratio(times, samples[0])
        memory = ["-", "-"] if peak is None else [f"{peak / 2**20:.0f}", f"{100 * peak / peaks[0]:.1f}%"]
        rows.append(
            [name, f"{ms:.0f}", f"{over_unfused:.2f}", *memory, "-" if compile_ms is None else f"{compile_ms:.0f}"]
        )
    harness.print_table(["variant", "ms", "x unfused", "peak MiB", "of unfused", "compile_ms"], rows)
    print(f"\nms: median of {args.repeats} interleaved runs; x unfused: median of the per-round ratios; "
          "peak: measured resident high-water mark above the inputs")  # fmt: skip


if __name__ == "__main__":
    main()
