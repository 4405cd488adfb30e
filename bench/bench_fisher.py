"""The cost of the per-sample Fisher (``ff.estimate_fisher``: per-layer hooks on one ordinary backward) on a
LlamaForCausalLM built from a config (~106M parameters: hidden 768, 8 layers, vocab 32000; tiny in smoke mode),
16 sequences x 128 tokens in batches of 8:

* time of ``empirical``, ``true``, ``mas`` and ``batch`` as a ratio to one forward + backward pass over the same
  batches (the training step's work), alternated in one process, median of the per-round ratios;
* peak memory of each, and of the forward + backward, each in a fresh process (CPU: the process's peak RSS; CUDA:
  ``torch.cuda.max_memory_allocated``), beside the size of the model's largest weight;
* the scale of each estimator's Fisher (mean, max), for choosing lam (docs/ewc.md).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_fisher.py [--benchmark-disable]
CLI:    python bench/bench_fisher.py [--repeats N] [--json bench/results/fisher_cpu.json]
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

transformers = pytest.importorskip("transformers")

SEQUENCES, LENGTH, BATCH = 16, 128, 8
VARIANTS = ("train", "empirical", "true", "mas", "batch")


def dims():
    """(hidden, intermediate, layers, heads, vocab, sequences, length)."""
    if harness.smoke_mode():
        return 32, 64, 2, 4, 128, 4, 16
    return 768, 2048, 8, 12, 32000, SEQUENCES, LENGTH


def setup():
    hidden, intermediate, layers, heads, vocab, sequences, length = dims()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=length,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(harness.bench_device()).eval()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(sequences // min(BATCH, sequences)):
        ids = torch.randint(0, vocab, (min(BATCH, sequences), length), generator=g).to(harness.bench_device())
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return model, batches


def hf_loss(model, batch):
    return model(**batch).loss


def variants(model, batches):
    def train():
        model.zero_grad(set_to_none=True)
        for batch in batches:
            hf_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def fisher(estimator):
        loss = {} if estimator == "mas" else {"batch_loss": hf_loss}
        return lambda: ff.estimate_fisher(model, batches, estimator=estimator, **loss)

    return {"train": train, **{name: fisher(name) for name in VARIANTS[1:]}}


def peak_bytes(name):
    """Peak memory of one run of `name` in a fresh process (bytes)."""
    command = [sys.executable, __file__, "--peak", name]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1])


def run_once_for_peak(name):
    model, batches = setup()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    variants(model, batches)[name]()
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.mark.parametrize("name", VARIANTS)
def test_fisher_cost(benchmark, name):
    model, batches = setup()
    benchmark.pedantic(variants(model, batches)[name], rounds=1 if harness.smoke_mode() else 3)
    benchmark.extra_info["sequences"] = sum(len(b["input_ids"]) for b in batches)


def main():
    parser = harness.arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--peak", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(run_once_for_peak(args.peak))
        return
    model, batches = setup()
    run = variants(model, batches)
    samples = harness.interleaved_samples(list(run.values()), args.repeats, args.warmup)
    ratio = {name: harness.median_ratio(times, samples[0]) for name, times in zip(run, samples)}
    peaks = {name: peak_bytes(name) for name in run}
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    scale = {}
    for name in VARIANTS[1:]:
        fisher = run[name]()
        scale[name] = ff.fisher.fisher_stats(fisher)
    hidden, intermediate, layers, heads, vocab, sequences, length = dims()
    params = sum(p.numel() for p in model.parameters())
    print(f"Fisher cost: LLaMA hidden {hidden}, {layers} layers, vocab {vocab} ({params / 1e6:.1f}M parameters), "
          f"{sequences} sequences x {length} tokens in batches of {BATCH}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} alternated rounds")  # fmt: skip
    rows = [
        [name, f"{statistics.median(times):.0f}", f"{ratio[name]:.2f}x", f"{peaks[name] / 2**20:,.0f}",
         f"{(peaks[name] - peaks['train']) / 2**20:+,.0f}",
         f"{scale[name]['mean']:.3g}" if name in scale else "", f"{scale[name]['max']:.3g}" if name in scale else ""]
        for name, times in zip(run, samples)
    ]  # fmt: skip
    harness.print_table(
        ["variant", "ms", "vs forward+backward", "peak MiB", "peak - train MiB", "Fisher mean", "Fisher max"], rows
    )
    print(f"largest weight: {largest / 2**20:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        figures = {
            "model": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads,
                      "vocab": vocab, "parameters": params, "largest_weight_bytes": largest},
            "data": {"sequences": sequences, "length": length, "batch": BATCH},
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "time_ratio_to_forward_backward": ratio,
            "median_ms": {name: statistics.median(times) for name, times in zip(run, samples)},
            "peak_bytes": peaks, "fisher_scale": scale,
        }  # fmt: skip
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
