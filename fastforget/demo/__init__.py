"""The continual-learning demo: catastrophic forgetting on scikit-learn's digits and in a small language model,
and each defence against it.

``python -m fastforget demo`` (or the ``fastforget`` console script) trains every strategy through every scenario
(``data.py``; the LM benchmark: ``lm.py``), prints a table of average accuracy, forgetting, backward transfer and
the per-step cost of the protections with the fused kernels and with the pure-torch reference (the LM: held-out
cross-entropy on the old and the new corpus, forgetting, learning, tokens/s), and writes ``results.json``,
``table.md``, ``accuracy.png`` (digits) and ``lm_tradeoff.png`` (LM) to the output folder.
"""

import logging
import math
import os
import sys
import warnings
from pathlib import Path

import torch

from fastforget.demo import lm, lm_report, report
from fastforget.demo.config import STRATEGIES, DemoConfig
from fastforget.demo.data import BENCHMARKS
from fastforget.demo.run import probe_overhead, run
from fastforget.dispatch import resolve

__all__ = ["DemoConfig", "STRATEGIES", "run_demo"]


def _steps(scenario, config):
    epochs = config.epochs_for(scenario.benchmark)
    per_task = [math.ceil(len(task.train_x) / config.batch_size) * epochs for task in scenario.tasks]
    return sum(per_task) * len(config.strategies_for(scenario.benchmark)) * config.seeds


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
    try:
        return _run_demo(config, stream, threads)
    finally:
        torch.set_num_threads(threads)


def _threads(config, benchmark, cores):
    if torch.device(config.device).type == "cpu":
        torch.set_num_threads(config.threads or (cores if benchmark == "lm" else 1))


def _run_demo(config, stream, cores):
    from tqdm import tqdm

    stream = stream or sys.stdout
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(config.device)
    scenarios = [s for name in config.benchmarks if name != "lm" for s in BENCHMARKS[name](device)]
    lm_strategies = config.strategies_for("lm") if "lm" in config.benchmarks else ()
    fused = resolve(config.backend, device, "demo")
    runs, summary, extra, tables = [], [], {}, []
    total = sum(_steps(s, config) for s in scenarios) + lm.total_steps(config.lm, lm_strategies, config.seeds)
    with tqdm(total=total, unit="step", disable=not config.progress, dynamic_ncols=True) as bar:
        _threads(config, "digits", cores)
        for scenario in scenarios:
            for strategy in config.strategies_for(scenario.benchmark):
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
        if summary:
            tables.append(report.table(summary, fused))
        if lm_strategies:
            _threads(config, "lm", cores)
            result = _quiet(lm.run_lm, config.lm, lm_strategies, config.seeds, device, config.backend, bar)
            lm_runs = result.pop("runs")
            rows = lm_report.summarise(lm_runs)
            runs += lm_runs
            summary += rows
            front = lm_report.pareto_front(rows, result["sweep"])
            result["pareto"] = [{"point": label, "learning": x, "forgetting": y} for label, x, y in front]
            extra["lm"] = result
            names = ", ".join(label for label, _, _ in front)
            tables.append(lm_report.table(rows, fused) + f"\n\nPareto front (learning ↑, forgetting ↓): {names}")
            if "ewc" in lm_strategies:
                estimators = lm_report.estimator_rows(lm_runs, result["sweep"], result["estimators"])
                tables.append(lm_report.estimator_table(estimators))
    text = "\n\n".join(tables)
    print(text, file=stream)
    (out / "table.md").write_text(text + "\n")
    report.write_json(out / "results.json", config.to_dict() | {"fused_backend": fused}, runs, summary, **extra)
    written = [out / "table.md", out / "results.json"]
    if scenarios:
        epochs = {s.name: config.epochs_for(s.benchmark) for s in scenarios}
        report.plot(out / "accuracy.png", runs, epochs, config.strategies_for(scenarios[0].benchmark))
        written.append(out / "accuracy.png")
    if lm_strategies:
        lm_report.plot(out / "lm_tradeoff.png", [r for r in summary if r["scenario"] == lm.SCENARIO],
                       extra["lm"]["sweep"])  # fmt: skip
        written.append(out / "lm_tradeoff.png")
    print(f"wrote {', '.join(map(str, written))}", file=stream)
    return summary


def _quiet(fn, *args):
    """fn(*args) without the Hugging Face stack's per-run chatter: transformers' info and warnings, bitsandbytes'
    note on its optional CPU kernels, and vmap's fallback note for SDPA (the per-sample Fisher)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="There is a performance drop")
            return fn(*args)
    finally:
        transformers.logging.set_verbosity(verbosity)
