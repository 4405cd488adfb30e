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
        row = {"scenario": mine[0]["scenario"], "strategy": strategy, "lambda": mine[0]["lambda"],
               "setting": mine[0]["setting"]}  # fmt: skip
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


def _setting(row):
    """The strategy's setting as "name=value" (λ=10000, fraction=0.15, α=0.5, w_B=0.5), or "" for none."""
    return "" if row["lambda"] is None else f"{row['setting']}={row['lambda']:g}"


def table(rows, fused_label):
    """A Markdown table: one row per strategy."""
    lines = [
        f"| strategy | setting | CE A nats/byte (ppl) before → after | CE B before → after | forgetting | learning "
        f"| B tokens/s {fused_label} | reference | speed-up |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["strategy"], _setting(row), _ce(row["ce_a_before"], row["ce_a_after"]),
                 _ce(row["ce_b_before"], row["ce_b_after"]), _cell(row["forgetting"], 3), _cell(row["learning"], 3),
                 _cell(row["tokens_per_s"]["fused"], 0), _cell(row["tokens_per_s"]["reference"], 0),
                 _cell(row["speedup"], 2) + "×"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_curves(rows, sweep):
    """{strategy: [(setting, learning, forgetting), ...] sorted by the setting}: each swept strategy's main point
    and its sweep points, mean over seeds."""
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


def pareto_front(rows, sweep):
    """The points no other point beats in both learning (more) and forgetting (less): [(label, learning,
    forgetting), ...] by learning, over every strategy's row and sweep point (means over seeds)."""
    setting = {row["strategy"]: row["setting"] for row in rows}
    points = [(row["strategy"] + (f" {_setting(row)}" if row["lambda"] is not None else ""), row["learning"]["mean"],
               row["forgetting"]["mean"]) for row in rows]  # fmt: skip
    for strategy, curve in sweep_curves(rows, sweep).items():
        main = next(row["lambda"] for row in rows if row["strategy"] == strategy)
        points += [(f"{strategy} {setting[strategy]}={lam:g}", x, y) for lam, x, y in curve if lam != main]
    front = [p for p in points if not any(q[1] >= p[1] and q[2] <= p[2] and q[1:] != p[1:] for q in points)]
    return sorted(front, key=lambda p: p[1])


def estimator_rows(runs, sweep, estimators):
    """ewc's points by Fisher estimator and lambda (means over seeds): the Fisher's mean and max at A's
    consolidation (the first), lambda * mean, the penalty at the end of fine-tuning, forgetting, learning; the run's
    estimator first."""
    points = [p for p in runs + sweep if p["strategy"] == "ewc"] + estimators
    groups = {}
    for p in points:
        groups.setdefault((p["fisher"][0]["estimator"], p["lambda"]), []).append(p)
    rows = []
    for (estimator, lam), same in sorted(groups.items(), key=lambda item: item[0][1]):
        mean = statistics.fmean(p["fisher"][0]["mean"] for p in same)
        means = {key: statistics.fmean(p[key] for p in same) for key in ("ewc_penalty", "forgetting", "learning")}
        rows.append({"estimator": estimator, "lambda": lam, "fisher_mean": mean,
                     "fisher_max": statistics.fmean(p["fisher"][0]["max"] for p in same), "strength": lam * mean,
                     **means})  # fmt: skip
    order = list(dict.fromkeys(p["fisher"][0]["estimator"] for p in points))
    return sorted(rows, key=lambda row: order.index(row["estimator"]))


def estimator_table(rows):
    """A Markdown table of estimator_rows."""
    lines = ["| Fisher estimator | Fisher of A: mean | max | λ | λ · mean | penalty at the end | forgetting "
             "| learning |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['estimator']} | {row['fisher_mean']:.3g} | {row['fisher_max']:.3g} | {row['lambda']:g} "
                     f"| {row['strength']:.3g} | {row['ewc_penalty']:.3g} | {row['forgetting']:.3f} "
                     f"| {row['learning']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def plot(path, rows, sweep):
    """Forgetting against learning: one point per strategy, each swept strategy's settings as a labelled curve, the
    Pareto front dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.6))
    curves = sweep_curves(rows, sweep)
    setting = {row["strategy"]: row["setting"] for row in rows}
    for strategy, points in curves.items():
        line = ax.plot([p[1] for p in points], [p[2] for p in points], "-", lw=1, alpha=0.6,
                       label=f"{strategy}: {setting[strategy]} sweep")[0]  # fmt: skip
        for lam, x, y in points:
            ax.annotate(f"{setting[strategy]}={lam:g}", (x, y), fontsize=6, color=line.get_color(), xytext=(3, -8),
                        textcoords="offset points")  # fmt: skip
    # a strategy that got worse on both corpora beyond every learning one's forgetting would squash the others
    learned = [row["forgetting"]["mean"] for row in rows if row["learning"]["mean"] > 0]
    off = [row for row in rows if learned and row["learning"]["mean"] < 0 and row["forgetting"]["mean"] > max(learned)]
    for row in rows:
        x, y = row["learning"]["mean"], row["forgetting"]["mean"]
        if row in off:
            note = f"{row['strategy']}: off the plot (learning {x:.3f}, forgetting {y:.3f})"
            ax.text(0.99, 0.99 - 0.04 * off.index(row), note, transform=ax.transAxes, ha="right", va="top", fontsize=7)
            continue
        ax.plot([x], [y], "o", ms=5)
        ax.annotate(row["strategy"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = pareto_front(rows, sweep)
    ax.plot([p[1] for p in front], [p[2] for p in front], "--", color="0.4", lw=0.8, label="Pareto front")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("learning: CE_B before − after (nats/byte; more is better)")
    ax.set_ylabel("forgetting: CE_A after − before (nats/byte; less is better)")
    ax.set_title("prose → Python source: the learning-forgetting trade-off", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
