"""Continual-learning metrics from the accuracy matrix, and the demo's table, JSON file and plot.

R[i][j] is the test accuracy (%) on task j after training on tasks 0..i (T tasks):

* average accuracy   = mean_j R[T-1][j]
* forgetting         = mean over j < T-1 of ( max_{i >= j} R[i][j] - R[T-1][j] )   (best-ever minus final;
                       Chaudhry et al. 2018)
* backward transfer  = mean over j < T-1 of ( R[T-1][j] - R[j][j] )               (Lopez-Paz & Ranzato 2017)
"""

import json
import statistics

METRICS = ("accuracy", "forgetting", "bwt")


def metrics(matrix):
    last, old = matrix[-1], range(len(matrix) - 1)
    return {
        "accuracy": statistics.fmean(last),
        "forgetting": statistics.fmean(max(matrix[i][j] for i in range(j, len(matrix))) - last[j] for j in old),
        "bwt": statistics.fmean(last[j] - matrix[j][j] for j in old),
    }


def mean_std(values):
    """Mean and sample standard deviation (0 for one value) over seeds."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}  # fmt: skip


def _cell(stat, digits=1):
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def table(summary, fused_label):
    """A Markdown table: one row per scenario and strategy (mean ± std over seeds)."""
    header = (
        "| benchmark | strategy | avg accuracy % | forgetting % | backward transfer % "
        f"| protection ms/step {fused_label} | reference | step ms {fused_label} | reference |"
    )
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in summary:
        probe = row["probe"]
        cells = [row["scenario"], row["strategy"], *(_cell(row[m]) for m in METRICS)]
        cells += [
            _cell(probe["fused"]["protection"], 2),
            _cell(probe["reference"]["protection"], 2),
            _cell(probe["fused"]["step"], 2),
            _cell(probe["reference"]["step"], 2),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path, config, runs, summary, **extra):
    with open(path, "w") as f:
        json.dump({"config": config, "summary": summary, "runs": runs, **extra}, f, indent=1)


def plot(path, runs, epochs, strategies):
    """One panel per strategy (columns) and scenario (rows; `epochs` maps each scenario to its epochs per task):
    every task's test accuracy after every epoch, mean over seeds, from the task's first epoch on; dotted lines
    mark task boundaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(epochs)
    fig, axes = plt.subplots(
        len(scenarios), len(strategies), figsize=(2.1 * len(strategies), 1.9 * len(scenarios)),
        sharex="row", sharey=True, squeeze=False,
    )  # fmt: skip
    for r, scenario in enumerate(scenarios):
        for c, strategy in enumerate(strategies):
            ax = axes[r][c]
            curves = [run["curve"] for run in runs if run["scenario"] == scenario and run["strategy"] == strategy]
            mean = [[statistics.fmean(seed[e][j] for seed in curves) for j in range(len(curves[0][0]))]
                    for e in range(len(curves[0]))]  # fmt: skip
            x = range(1, len(mean) + 1)
            for j in range(len(mean[0])):
                start = j * epochs[scenario]
                ax.plot(x[start:], [row[j] for row in mean[start:]], lw=1.0, label=f"task {j + 1}")
            for boundary in range(epochs[scenario], len(mean), epochs[scenario]):
                ax.axvline(boundary + 0.5, color="0.7", lw=0.6, ls=":")
            ax.set_ylim(-3, 103)
            ax.tick_params(labelsize=6)
            if r == 0:
                ax.set_title(strategy, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{scenario}\naccuracy %", fontsize=7)
            if r == len(scenarios) - 1:
                ax.set_xlabel("epoch", fontsize=7)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=90)
    plt.close(fig)
