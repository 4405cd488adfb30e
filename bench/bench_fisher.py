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
import datetime
import json
import resource
import statistics
import subprocess
import sys
import time
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


def doc_table(figures):
    """docs/ewc.md's table: each variant's time over forward+backward, its median, its Fisher's mean and max."""
    names = {"train": "forward+backward"}
    rows = []
    for name, times in figures["ms"].items():
        if not times:
            continue
        scale = figures["fisher_scale"].get(name)
        rows.append([
            names.get(name, f"`{name}`"), f"{figures['time_ratio_to_forward_backward'][name]:.2f}×",
            f"{statistics.median(times):,.0f}", f"{scale['mean']:.3g}" if scale else "",
            f"{scale['max']:.3g}" if scale else "",
        ])  # fmt: skip
    headers = ["variant", "time / forward+backward", "median ms", "Fisher mean", "Fisher max"]
    return {"headers": headers, "align": ["---", "---:", "---:", "---:", "---:"], "rows": rows}


def main():
    parser = harness.arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file (rewritten after each round)")
    parser.add_argument("--peak", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(run_once_for_peak(args.peak))
        return
    model, batches = setup()
    run = variants(model, batches)
    hidden, intermediate, layers, heads, vocab, sequences, length = dims()
    figures = {
        "model": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "heads": heads, "vocab": vocab,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "largest_weight_bytes": max(p.numel() * p.element_size() for p in model.parameters())},
        "data": {"sequences": sequences, "length": length, "batch": BATCH},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "ms": {name: [] for name in run}, "time_ratio_to_forward_backward": {}, "peak_bytes": {}, "fisher_scale": {},
    }  # fmt: skip

    def save():  # the results format of bench/results (rendered into docs/ewc.md), the raw figures beside it
        if args.json:
            results = {
                "benchmark": "bench_fisher", "command": "python " + " ".join(sys.argv),
                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                "machine": harness.machine(), "fastforget": ff.__version__, "tables": [doc_table(figures)], **figures,
            }  # fmt: skip
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")

    for _ in range(args.warmup):
        for name, fn in run.items():
            result = fn()
            if name != "train":
                figures["fisher_scale"][name] = ff.fisher.fisher_stats(result)
    for _ in range(args.repeats):  # alternated rounds: a slow spell of the machine hits every variant alike
        for name, fn in run.items():
            start = time.perf_counter()
            result = fn()
            harness.synchronize()
            figures["ms"][name].append((time.perf_counter() - start) * 1e3)
            if name != "train":
                figures["fisher_scale"][name] = ff.fisher.fisher_stats(result)
        figures["time_ratio_to_forward_backward"] = {
            name: harness.median_ratio(times, figures["ms"]["train"]) for name, times in figures["ms"].items()
        }
        save()
    for name in run:
        figures["peak_bytes"][name] = peak_bytes(name)
        save()
    print(f"Fisher cost: LLaMA hidden {hidden}, {layers} layers, vocab {vocab} "
          f"({figures['model']['parameters'] / 1e6:.1f}M parameters), {sequences} sequences x {length} tokens in "
          f"batches of {min(BATCH, sequences)}, {torch.get_num_threads()} threads, "
          f"{args.repeats} alternated rounds")  # fmt: skip
    peaks, scale = figures["peak_bytes"], figures["fisher_scale"]
    rows = [
        [name, f"{statistics.median(times):.0f}", f"{figures['time_ratio_to_forward_backward'][name]:.2f}x",
         f"{peaks[name] / 2**20:,.0f}", f"{(peaks[name] - peaks['train']) / 2**20:+,.0f}",
         f"{scale[name]['mean']:.3g}" if name in scale else "", f"{scale[name]['max']:.3g}" if name in scale else ""]
        for name, times in figures["ms"].items()
    ]  # fmt: skip
    harness.print_table(
        ["variant", "ms", "vs forward+backward", "peak MiB", "peak - train MiB", "Fisher mean", "Fisher max"], rows
    )
    print(f"largest weight: {figures['model']['largest_weight_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
