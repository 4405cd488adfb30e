"""Benchmark of a LoRA fine-tuning step (forward, backward, AdamW) on a LlamaForCausalLM built from a config.

Variants, on the same base weights, adapters and batches, timed in alternation (one step of each per round):
  fastforget   ff.apply_lora(model, "all-linear", r, alpha): LoRALinear on the fused op
  peft         peft.get_peft_model(model, LoraConfig(target_modules="all-linear", ...)), the same A and B
  lower_bound  the model without adapters, base frozen, only the input embedding trainable: the backward still
               computes every layer's input gradient, which any adapter training must
and, with a bitsandbytes nf4 base (every linear layer but the head quantized; bnb 0.50 runs it on the CPU):
  qlora_fastforget / qlora_peft
Each variant's AdamW (torch's default implementation) steps its trainable tensors only. Reported: ms per step
(median), tokens/s, the ratio to the lower bound's time, fastforget's tokens/s over PEFT's, and the bytes autograd
saves for backward in one step (unique storages; on CUDA also torch.cuda.max_memory_allocated).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_lora_step.py [--benchmark-disable]
CLI:    python bench/bench_lora_step.py [--repeats N] [--qlora] (default: hidden 512, 4 layers, 8 heads,
        intermediate 1408, vocab 8192, sequence 256, batch 8, r = 16, alpha = 32)
"""

import copy
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@dataclass(frozen=True)
class Sizes:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1408
    vocab: int = 8192
    seq: int = 256
    batch: int = 8
    r: int = 16
    alpha: int = 32

    @property
    def tokens(self) -> int:
        return self.seq * self.batch


SMOKE = Sizes(hidden=32, layers=2, heads=4, intermediate=48, vocab=64, seq=8, batch=2, r=4, alpha=8)


def bench_sizes() -> Sizes:
    return SMOKE if harness.smoke_mode() else Sizes()


def base_model(sizes: Sizes, quantized=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=sizes.hidden, num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads, intermediate_size=sizes.intermediate, vocab_size=sizes.vocab,
        max_position_embeddings=sizes.seq,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(harness.bench_device())
    return quantize_nf4(model) if quantized else model


def quantize_nf4(model):
    """Every linear layer but the head as a bitsandbytes nf4 Linear4bit holding its weight."""
    import bitsandbytes as bnb

    for name in ff.lora.all_linear_names(model):
        dense = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(dense.weight.device))
    return model


def fastforget_model(base, sizes: Sizes):
    return ff.apply_lora(copy.deepcopy(base), "all-linear", r=sizes.r, alpha=sizes.alpha)


def peft_model(base, sizes: Sizes, like):
    """PEFT's model with the adapters of `like` (fastforget's, B drawn non-zero: a trained adapter)."""
    config = peft.LoraConfig(r=sizes.r, lora_alpha=sizes.alpha, target_modules="all-linear")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, module in ff.lora.lora_modules(like):
            torch.nn.init.normal_(module.lora_B, std=0.02)
            twin = model.base_model.model.get_submodule(name)
            twin.lora_A["default"].weight.copy_(module.lora_A)
            twin.lora_B["default"].weight.copy_(module.lora_B)
    return model


def lower_bound_model(base):
    model = copy.deepcopy(base).requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def batches(sizes: Sizes, count=4):
    g = torch.Generator().manual_seed(1)
    shape = (sizes.batch, sizes.seq)
    return [torch.randint(0, sizes.vocab, shape, generator=g).to(harness.bench_device()) for _ in range(count)]


def train_step(model, data, fused_adamw=False) -> Callable[[], None]:
    """One step per call on the next batch: forward with the LM loss, backward, AdamW (torch's default for-each
    loop on the CPU, or its fused kernel)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused_adamw or None)
    turn = iter(range(sys.maxsize))

    def step():
        batch = data[next(turn) % len(data)]
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

    return step


def saved_bytes(model, batch) -> int:
    """Bytes of the unique storages autograd saves for backward in one forward (activations, masks, weights not
    counted: parameters are excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=batch, labels=batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def variants(sizes: Sizes, qlora=False, fused_adamw=False) -> dict[str, tuple[Callable[[], None], object]]:
    """{name: (step function, model)} for the three plain variants, or the two QLoRA ones."""
    data = batches(sizes)
    base = base_model(sizes, quantized=qlora)
    ours = fastforget_model(base, sizes)
    theirs = peft_model(base, sizes, ours)
    models = {"fastforget": ours, "peft": theirs} if qlora else {
        "fastforget": ours, "peft": theirs, "lower_bound": lower_bound_model(base)}  # fmt: skip
    prefix = "qlora_" if qlora else ""
    return {prefix + name: (train_step(model, data, fused_adamw), model) for name, model in models.items()}


# ---------------------------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def steps():
    return {**variants(bench_sizes()), **variants(bench_sizes(), qlora=True)}


@pytest.mark.parametrize("name", ["fastforget", "peft", "lower_bound", "qlora_fastforget", "qlora_peft"])
def test_step(benchmark, steps, name):
    step, model = steps[name]
    benchmark(harness.synchronized(step))
    benchmark.extra_info.update(tokens=bench_sizes().tokens, saved_bytes=saved_bytes(model, batches(bench_sizes())[0]))
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tokens_per_s"] = bench_sizes().tokens / benchmark.stats.stats.median


# ---------------------------------------------------------------------------------------------------- CLI


def print_table(sizes: Sizes, named, repeats, warmup):
    """Each variant's median ms; its ratios to the lower bound and to PEFT as medians of per-round ratios."""
    names = list(named)
    samples = dict(zip(names, harness.interleaved_samples([named[n][0] for n in names], repeats, warmup)))
    bound = samples.get("lower_bound")
    theirs = samples[next(n for n in names if n.endswith("peft"))]
    rows = []
    for name in names:
        ms = statistics.median(samples[name])
        saved = saved_bytes(named[name][1], batches(sizes)[0]) / 2**20
        over_bound = "-" if bound is None else f"{harness.median_ratio(samples[name], bound):.3f}"
        rows.append([name, f"{ms:.1f}", f"{sizes.tokens / ms * 1e3:.0f}", over_bound,
                     f"{harness.median_ratio(theirs, samples[name]):.3f}", f"{saved:.0f}"])  # fmt: skip
    harness.print_table(["variant", "ms/step", "tokens/s", "x bound", "x PEFT tokens/s", "saved MiB"], rows)
    print(f"ms: median of {repeats} rounds; x bound, x PEFT: medians of the per-round ratios.")
    if bound is not None:  # adapters that cost nothing would run at the bound's speed
        ceiling = harness.median_ratio(theirs, bound)
        print(f"PEFT's step is {ceiling:.3f}x the bound's: the most any adapter can reach over PEFT at this size.")


def main() -> None:
    parser = harness.arg_parser(__doc__.splitlines()[0], scale_help="unused (fixed sizes; FF_BENCH_SMOKE=1: tiny)")
    parser.add_argument("--qlora", action="store_true", help="also the QLoRA step (nf4 base)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) in every variant")
    args = parser.parse_args()
    sizes = bench_sizes()
    optimizer = "AdamW(fused=True)" if args.fused_adamw else "AdamW (default)"
    print(f"LoRA step on {harness.bench_device()}, {torch.get_num_threads()} threads, {optimizer}: {sizes}")
    print_table(sizes, variants(sizes, fused_adamw=args.fused_adamw), args.repeats, args.warmup)
    if args.qlora:
        print("\nQLoRA (nf4 base):")
        print_table(sizes, variants(sizes, qlora=True, fused_adamw=args.fused_adamw), args.repeats, args.warmup)


if __name__ == "__main__":
    main()
