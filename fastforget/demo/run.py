"""One run: a strategy trained on a scenario's tasks in sequence, every task evaluated after every epoch."""

import copy
import statistics

import torch
from torch import nn

from fastforget.demo.strategies import begin_task, copy_states, protections, set_lora_backend
from fastforget.trainer import ProtectedTrainer

WARMUP_STEPS = 5  # of the overhead probe, untimed
TIMED = ("replay", "ewc", "protect")


def make_model(hidden, device):
    return nn.Sequential(
        nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
    ).to(device)


def make_optimizer(config, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate)
    return torch.optim.SGD(params, lr=config.learning_rate)


def batches(x, y, size, generator=None):
    """(x, y) mini-batches; shuffled when a generator is given."""
    if generator is not None:
        order = torch.randperm(len(x), generator=generator).to(x.device)
        x, y = x[order], y[order]
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@torch.no_grad()
def evaluate(model, scenario):
    """Test accuracy (%) on every task of the scenario."""
    was_training = model.training
    model.eval()
    accuracy = [
        100.0 * float((scenario.predict(model(task.test_x), task.test_y) == task.test_y).float().mean())
        for task in scenario.tasks
    ]
    model.train(was_training)
    return accuracy


def run(scenario, strategy, config, seed, progress_bar):
    """Train `strategy` through `scenario` with run seed `seed`; returns the accuracy matrix, the per-epoch curve,
    the mean time per step of each protection, and the final model and components (for the overhead probe)."""
    torch.manual_seed(seed)
    model = make_model(config.hidden, config.device)
    parts = protections(strategy, model, config, config.backend, seed)
    matrix, curve, times = [], [], {}
    for t, task in enumerate(scenario.tasks):
        begin_task(strategy, model, t, config, config.backend)
        # a fresh optimizer per task (over the parameters trainable now)
        trainer = ProtectedTrainer(model, make_optimizer(config, model), scenario.loss, **parts)
        order = torch.Generator().manual_seed(1000 * seed + t)
        for _ in range(config.epochs_for(scenario.benchmark)):
            for batch in batches(task.train_x, task.train_y, config.batch_size, order):
                stats = trainer.step(batch)
                for name, ms in stats["time_ms"].items():
                    times.setdefault(name, []).append(ms)
                progress_bar.update(1)
            curve.append(evaluate(model, scenario))
        matrix.append(curve[-1])
        if t + 1 < len(scenario.tasks):  # nothing comes after the last task
            trainer.end_task(batches(task.train_x, task.train_y, config.batch_size))
    return {
        "matrix": matrix,
        "curve": curve,
        "ms_per_step": {name: statistics.fmean(values) for name, values in times.items()},
        "model": model,
        "parts": parts,
    }


def probe_overhead(scenario, strategy, config, seed, model, parts, backend):
    """Median ms per step of each protection, and of the whole step, for `backend`: a copy of the final model and
    of every component's state, trained on the last task for ``config.probe_steps`` steps. Runs of two backends
    see the same batches and replay draws, so their final parameters must agree; they are returned too."""
    model = copy.deepcopy(model)
    set_lora_backend(model, backend)
    probe_parts = protections(strategy, model, config, backend, seed)
    copy_states(parts, probe_parts)
    trainer = ProtectedTrainer(model, make_optimizer(config, model), scenario.loss, **probe_parts)
    task = scenario.tasks[-1]
    stream = batches(task.train_x, task.train_y, config.batch_size, torch.Generator().manual_seed(seed))
    times = {}
    for i in range(WARMUP_STEPS + config.probe_steps):
        stats = trainer.step(stream[i % len(stream)])
        if i >= WARMUP_STEPS:
            stats["time_ms"]["protection"] = sum(stats["time_ms"].get(name, 0.0) for name in TIMED)
            for name, ms in stats["time_ms"].items():
                times.setdefault(name, []).append(ms)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return medians, [p.detach() for p in model.parameters()]
