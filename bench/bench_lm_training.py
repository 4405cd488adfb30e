"""Forgetting defences in language-model training (issue J's figures), on a LlamaForCausalLM built from a config.

1. Fisher estimation on token batches (hidden 256, 4 layers, seq 128, vocab 4096): samples/s of ``empirical``
   (per-sequence gradients by torch.func, one fused fisher_update_ per chunk) against a per-sequence Python loop
   (one forward + backward + squared accumulation per sequence), and of ``batch``.
2. A full fine-tuning step through ``ProtectedHFTrainer`` with EWC + GradientProtector (hidden 512, 4 layers, 8
   heads, seq 256, batch 8, vocab 4096): tokens/s with the fused backends against ``backend="reference"``, the two
   alternated step by step in one run; the protections' own milliseconds too.

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_lm_training.py [--benchmark-disable]
CLI:    python bench/bench_lm_training.py [--repeats N]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

transformers = pytest.importorskip("transformers")


def sizes():
    """(fisher model dims, fisher batches, trainer model dims, trainer batch, sequence length)."""
    if harness.smoke_mode():
        return (32, 2, 64), 2, (32, 2, 4), 2, 16
    return (256, 4, 128), 4, (512, 4, 256), 8, 256


def llama(hidden, layers, heads=4, vocab=4096):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def token_batches(count, batch, length, vocab=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def hf_loss(model, batch):
    return model(**batch).loss


def per_sequence_loop(model, batches):
    """The baseline: one forward + backward per sequence, squares accumulated per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    fisher = [torch.zeros_like(p) for p in params]
    count = 0
    for batch in batches:
        for i in range(len(batch["input_ids"])):
            grads = torch.autograd.grad(hf_loss(model, {k: v[i : i + 1] for k, v in batch.items()}), params)
            for f, g in zip(fisher, grads):
                f.addcmul_(g, g)
            count += 1
    return [f / count for f in fisher]


def fisher_estimators(model, batches):
    return {
        "per_sequence_loop": lambda: per_sequence_loop(model, batches),
        "empirical": lambda: ff.estimate_fisher(model, batches, batch_loss=hf_loss, chunk_size=8),
        "batch": lambda: ff.estimate_fisher(model, batches, batch_loss=hf_loss, estimator="batch"),
    }


def trainer_steps(backend, dims, batch, length, folder):
    """A ProtectedHFTrainer (EWC + element protector on `backend`), and a function running one optimizer step."""
    from fastforget.transformers import ProtectedHFTrainer

    hidden, layers, heads = dims
    model = llama(hidden, layers, heads)
    ewc = ff.EWC(model, lam=10.0, backend=backend)
    ewc.load_importance(
        [p.detach() + 0.01 for p in model.parameters()], [torch.rand_like(p) for p in model.parameters()]
    )
    protector = ff.GradientProtector(model, mode="element", backend=backend)
    data = [{"input_ids": ids} for ids in torch.randint(0, 4096, (batch * 1000, length)).tolist()]
    args = transformers.TrainingArguments(
        output_dir=folder, per_device_train_batch_size=batch, max_steps=10**6, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=10**6,
    )  # fmt: skip

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    trainer = ProtectedHFTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, ewc=ewc, protector=protector
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets; the steps below are the Trainer's own
    batches = iter(trainer.get_train_dataloader())

    def step():
        trainer.training_step(model, next(batches))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return trainer, step


@pytest.mark.parametrize("name", ["per_sequence_loop", "empirical", "batch"])
def test_lm_fisher(benchmark, name):
    (hidden, layers, length), count, *_ = sizes()
    model, batches = llama(hidden, layers), token_batches(count, 4, length)
    benchmark.pedantic(fisher_estimators(model, batches)[name], rounds=1 if harness.smoke_mode() else 3)
    benchmark.extra_info["samples"] = 4 * count


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_trainer_step(benchmark, backend, tmp_path):
    *_, dims, batch, length = sizes()
    _, step = trainer_steps(backend, dims, batch, length, str(tmp_path))
    step()  # warm-up
    benchmark.pedantic(step, rounds=1 if harness.smoke_mode() else 5)
    benchmark.extra_info["tokens_per_step"] = batch * length


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    (hidden, layers, length), count, dims, batch, trainer_length = sizes()
    model, batches = llama(hidden, layers), token_batches(count, 4, length)
    samples = 4 * count
    timings = harness.time_interleaved(list(fisher_estimators(model, batches).values()), args.repeats, args.warmup)
    print(f"Fisher on token batches: LLaMA hidden {hidden}, {layers} layers, seq {length}, {samples} sequences, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    rows = [
        [name, f"{ms:.0f}", f"{samples / (ms * 1e-3):.1f}", f"{timings[0] / ms:.2f}x"]
        for name, ms in zip(fisher_estimators(model, batches), timings)
    ]
    harness.print_table(["estimator", "ms", "samples/s", "vs per-sequence loop"], rows)

    with tempfile.TemporaryDirectory() as folder:
        runs = {b: trainer_steps(b, dims, batch, trainer_length, folder) for b in ("auto", "reference")}
        ms = {b: [] for b in runs}
        protection = {b: [] for b in runs}
        for _, step in runs.values():
            step()  # warm-up
        for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits both alike
            for b, (trainer, step) in runs.items():
                start = time.perf_counter()
                step()
                ms[b].append((time.perf_counter() - start) * 1e3)
                protection[b].append(sum(trainer.protection_time_ms.values()))
    tokens = batch * trainer_length
    print(f"\nProtectedHFTrainer step (EWC + element protector): LLaMA hidden {dims[0]}, {dims[1]} layers, "
          f"batch {batch} x seq {trainer_length}; median of {args.repeats}")  # fmt: skip
    median = {b: statistics.median(v) for b, v in ms.items()}
    rows = [
        [b, f"{median[b]:.0f}", f"{tokens / (median[b] * 1e-3):,.0f}", f"{statistics.median(protection[b]):.1f}",
         f"{median['reference'] / median[b]:.2f}x"]
        for b in runs
    ]  # fmt: skip
    harness.print_table(["backend", "step ms", "tokens/s", "EWC + protect ms", "speed-up"], rows)


if __name__ == "__main__":
    main()
