"""EWC end to end: Fisher estimation throughput per estimator, and the error of bf16 state against fp32 state.

Model: an MLP 64-256-256-10 (83k parameters) on synthetic 10-class tasks (labels from a random linear map).

pytest: FF_BENCH_SMOKE=1 pytest bench/bench_ewc.py [--benchmark-disable]
CLI:    python bench/bench_ewc.py     (prints both tables; the bf16 table is README's)
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: make `bench` (and an uninstalled fastforget) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastforget as ff  # noqa: E402
from bench import harness  # noqa: E402

FEATURES, CLASSES = 64, 10
STEPS_AFTER_CONSOLIDATION = (1, 10, 60)


def mlp(hidden):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES)
    )


def task(seed, batches, batch_size=64):
    g = torch.Generator().manual_seed(seed)
    mapping = torch.randn(FEATURES, CLASSES, generator=g)
    inputs = [torch.randn(batch_size, FEATURES, generator=g) for _ in range(batches)]
    return [(x, (x @ mapping).argmax(1)) for x in inputs]


def sizes():
    """(hidden width, batches per task): tiny in smoke mode."""
    return (16, 2) if harness.smoke_mode() else (256, 20)


def per_sample_loop(model, data):
    """The straightforward empirical Fisher: one forward and backward per sample."""
    fisher = [torch.zeros_like(p) for p in model.parameters()]
    count = 0
    for x, y in data:
        for i in range(len(x)):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
            torch._foreach_addcmul_(fisher, grads, grads)
            count += 1
    torch._foreach_div_(fisher, count)
    return fisher


def estimators(model, data):
    """name -> a function estimating the Fisher of `model` over `data`."""
    run = {
        name: (lambda name=name: ff.estimate_fisher(model, data, F.cross_entropy, estimator=name))
        for name in ff.fisher.ESTIMATORS
    }
    return {"per_sample_loop": lambda: per_sample_loop(model, data), **run}


@pytest.mark.parametrize("name", ["per_sample_loop", *ff.fisher.ESTIMATORS])
def test_estimator(benchmark, name):
    hidden, batches = sizes()
    model, data = mlp(hidden), task(0, batches)
    benchmark.pedantic(estimators(model, data)[name], rounds=1 if harness.smoke_mode() else 3)
    benchmark.extra_info["samples"] = sum(len(x) for x, _ in data)


def bf16_state_errors(hidden, batches):
    """Rows (steps, mode, penalty rel. error, gradient rel. error) of bf16 state against fp32 state."""
    model = mlp(hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

    def train(data, steps):
        for step in range(steps):
            x, y = data[step % len(data)]
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

    ewcs = {
        (mode, dtype): ff.EWC(model, lam=1.0, mode=mode, state_dtype=dtype)
        for mode in ff.ewc.MODES
        for dtype in ff.ewc.STATE_DTYPES
    }
    for seed in range(3):
        data = task(seed, batches)
        train(data, 3 * len(data))
        fisher = ff.estimate_fisher(model, data, F.cross_entropy, max_batches=5)
        for ewc in ewcs.values():
            ewc.load_importance([p.detach() for p in model.parameters()], fisher)

    def value_and_grad(ewc):
        model.zero_grad()
        value = ewc.penalty()
        value.backward()
        return value.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    rows, new_task, done = [], task(9, batches), 0
    for steps in STEPS_AFTER_CONSOLIDATION:
        train(new_task, steps - done)
        done = steps
        for mode in ff.ewc.MODES:
            exact, exact_grad = value_and_grad(ewcs[(mode, torch.float32)])
            compact, compact_grad = value_and_grad(ewcs[(mode, torch.bfloat16)])
            grad_error = ((compact_grad - exact_grad).norm() / exact_grad.norm()).item()
            rows.append((steps, mode, abs(compact - exact) / exact, grad_error))
    return rows


def test_bf16_state_error(benchmark):
    rows = benchmark.pedantic(bf16_state_errors, args=sizes(), rounds=1)
    for steps, mode, value_error, grad_error in rows:
        benchmark.extra_info[f"{mode}_after_{steps}_steps"] = {"penalty": value_error, "gradient": grad_error}


def main():
    args = harness.parse_args(__doc__.splitlines()[0])
    hidden, batches = sizes()
    model, data = mlp(hidden), task(0, batches)
    samples = sum(len(x) for x, _ in data)
    rows = []
    timings = {name: harness.time_ms(fn, args.repeats, args.warmup) for name, fn in estimators(model, data).items()}
    for name, ms in timings.items():
        rate = samples / (ms * 1e-3)
        rows.append([name, f"{ms:.1f}", f"{rate:,.0f}", f"{timings['per_sample_loop'] / ms:.1f}x"])
    shape = f"{FEATURES}-{hidden}-{hidden}-{CLASSES}"
    print(f"Fisher estimation, MLP {shape}, {samples} samples, {torch.get_num_threads()} threads")
    harness.print_table(["estimator", "ms", "samples/s", "vs per-sample loop"], rows)
    print("\nbf16 EWC state against fp32 state (relative errors), training on a 4th task after 3 consolidated ones")
    table = [[str(s), m, f"{v:.1e}", f"{g:.1e}"] for s, m, v, g in bf16_state_errors(hidden, batches)]
    harness.print_table(["steps", "mode", "penalty", "gradient"], table)


if __name__ == "__main__":
    main()
