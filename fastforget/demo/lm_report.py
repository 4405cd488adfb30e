"""The LM benchmark's summary rows, table and trade-off plot (forgetting against learning, Biderman et al. 2024).

forgetting = CE_A(after) - CE_A(before) and learning = CE_B(before) - CE_B(after), held-out cross-entropy in nats
per byte (A: the old skill, B: the new domain); lower-right is better. Perplexity = exp(CE).
"""

import math
import statistics

from fastforget.demo.report import _cell, mean_std


def summarise(runs):
    """One row per strategy: mean/std/n over seeds of the CEs, forgetting, learning and throughputs."""
    rows = []
    for strategy in dict.fromkeys(r["strategy"] for r in runs):
        mine = [r for r in runs if r["strategy"] == strategy]
        row = {"scenario": mine[0]["scenario"], "strategy": strategy, "lambda": mine[0]["lambda"]}
        for key in ("forgetting", "learning"):
            row[key] = mean_std([r[key] for r in mine])
        for when in ("before", "after"):
            for corpus in "AB":
                row[f"ce_{corpus.lower()}_{when}"] = mean_std([r[f"ce_{when}"][corpus] for r in mine])
        row["tokens_per_s"] = {side: mean_std([r["tokens_per_s"][side] for r in mine]) for side in
                               ("fused", "reference")}  # fmt: skip
        row["speedup"] = mean_std([r["tokens_per_s"]["fused"] / r["tokens_per_s"]["reference"] for r in mine])
        rows.append(row)
    return rows


def _ce(before, after):
    return (f"{before['mean']:.3f} → {after['mean']:.3f} ({math.exp(before['mean']):.2f} → "
            f"{math.exp(after['mean']):.2f})")  # fmt: skip


def table(rows, fused_label):
    """A Markdown table: one row per strategy."""
    lines = [
        f"| strategy | λ | CE A nats/byte (ppl) before → after | CE B before → after | forgetting | learning "
        f"| B tokens/s {fused_label} | reference | speed-up |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lam = "" if row["lambda"] is None else f"{row['lambda']:g}"
        cells = [row["strategy"], lam, _ce(row["ce_a_before"], row["ce_a_after"]),
                 _ce(row["ce_b_before"], row["ce_b_after"]), _cell(row["forgetting"], 3), _cell(row["learning"], 3),
                 _cell(row["tokens_per_s"]["fused"], 0), _cell(row["tokens_per_s"]["reference"], 0),
                 _cell(row["speedup"], 2) + "×"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_curves(rows, sweep):
    """{strategy: [(lambda, learning, forgetting), ...] sorted by lambda}: each swept strategy's main point and its
    sweep points, mean over seeds."""
    curves = {}
    for row in rows:
        points = [p for p in sweep if p["strategy"] == row["strategy"]]
        if not points:
            continue
        by_lambda = {row["lambda"]: (row["learning"]["mean"], row["forgetting"]["mean"])}
        for lam in dict.fromkeys(p["lambda"] for p in points):
            same = [p for p in points if p["lambda"] == lam]
            by_lambda[lam] = (statistics.fmean(p["learning"] for p in same),
                              statistics.fmean(p["forgetting"] for p in same))  # fmt: skip
        curves[row["strategy"]] = [(lam, *by_lambda[lam]) for lam in sorted(by_lambda)]
    return curves


def plot(path, rows, sweep):
    """Forgetting against learning: one point per strategy, each swept strategy's lambdas as a labelled curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves = sweep_curves(rows, sweep)
    for strategy, points in curves.items():
        line = ax.plot([p[1] for p in points], [p[2] for p in points], "-", lw=1, alpha=0.6,
                       label=f"{strategy}: λ sweep")[0]  # fmt: skip
        for lam, x, y in points:
            ax.annotate(f"λ={lam:g}", (x, y), fontsize=6, color=line.get_color(), xytext=(3, -8),
                        textcoords="offset points")  # fmt: skip
    for row in rows:
        x, y = row["learning"]["mean"], row["forgetting"]["mean"]
        ax.plot([x], [y], "o", ms=5)
        ax.annotate(row["strategy"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="0.7", lw=0.6)
    if curves:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("learning: CE_B before − after (nats/byte; more is better)")
    ax.set_ylabel("forgetting: CE_A after − before (nats/byte; less is better)")
    ax.set_title("prose → Python source: the learning-forgetting trade-off", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
