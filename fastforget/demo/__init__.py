"""The continual-learning demo: catastrophic forgetting on scikit-learn's digits, and each defence against it.

``python -m fastforget demo`` (or the ``fastforget`` console script) trains every strategy through every scenario
(``data.py``), prints a table of average accuracy, forgetting, backward transfer and the per-step cost of the
protections with the fused kernels and with the pure-torch reference, and writes ``results.json``,
``accuracy.png`` and ``table.md`` to the output folder.
"""

import math
import sys
from pathlib import Path

import torch

from fastforget.demo import report
from fastforget.demo.config import STRATEGIES, DemoConfig
from fastforget.demo.data import BENCHMARKS
from fastforget.demo.run import probe_overhead, run
from fastforget.dispatch import resolve

__all__ = ["DemoConfig", "STRATEGIES", "run_demo"]


def _steps(scenario, config):
    epochs = config.epochs_for(scenario.benchmark)
    per_task = [math.ceil(len(task.train_x) / config.batch_size) * epochs for task in scenario.tasks]
    return sum(per_task) * len(config.strategies) * config.seeds


def _summarise(scenario, strategy, results):
    row = {"scenario": scenario, "strategy": strategy}
    for metric in report.METRICS:
        row[metric] = report.mean_std([r["metrics"][metric] for r in results])
    row["probe"] = {
        side: {key: report.mean_std([r["probe"][side][key] for r in results]) for key in ("protection", "step")}
        for side in ("fused", "reference")
    }
    return row


def run_demo(config: DemoConfig, stream=None):
    """Run the demo, printing to `stream` (default stdout); returns the summary rows (also written, with every
    run's numbers, to the output folder)."""
    threads = torch.get_num_threads()
    if torch.device(config.device).type == "cpu":
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config, stream)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config, stream):
    from tqdm import tqdm

    stream = stream or sys.stdout
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    scenarios = [s for name in config.benchmarks for s in BENCHMARKS[name](device)]
    fused = resolve(config.backend, device, "demo")
    runs, summary = [], []
    total = sum(_steps(s, config) for s in scenarios)
    with tqdm(total=total, unit="step", disable=not config.progress, dynamic_ncols=True) as bar:
        for scenario in scenarios:
            for strategy in config.strategies:
                results = []
                for seed in range(config.seeds):
                    bar.set_description(f"{scenario.name} {strategy} seed {seed}")
                    result = run(scenario, strategy, config, seed, bar)
                    args = (scenario, strategy, config, seed, result["model"], result["parts"])
                    fused_probe, fused_params = probe_overhead(*args, config.backend)
                    reference_probe, reference_params = probe_overhead(*args, "reference")
                    results.append(
                        {
                            "scenario": scenario.name,
                            "strategy": strategy,
                            "seed": seed,
                            "matrix": result["matrix"],
                            "curve": result["curve"],
                            "metrics": report.metrics(result["matrix"]),
                            "ms_per_step": result["ms_per_step"],
                            "probe": {"fused": fused_probe, "reference": reference_probe},
                            # the fused and reference probes must end at the same parameters (fp32 rounding)
                            "probe_max_abs_param_diff": max(
                                float((a - b).abs().max()) for a, b in zip(fused_params, reference_params)
                            ),
                        }
                    )
                runs += results
                summary.append(_summarise(scenario.name, strategy, results))
    text = report.table(summary, fused)
    print(text, file=stream)
    (out / "table.md").write_text(text + "\n")
    report.write_json(out / "results.json", config.to_dict() | {"fused_backend": fused}, runs, summary)
    epochs = {s.name: config.epochs_for(s.benchmark) for s in scenarios}
    report.plot(out / "accuracy.png", runs, epochs, config.strategies)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'accuracy.png'}", file=stream)
    return summary
