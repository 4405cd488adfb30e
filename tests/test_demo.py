"""The continual-learning demo: benchmarks, metrics, forgetting and its defences, the command line."""

import json
import subprocess
import sys

import pytest
import torch

from fastforget.__main__ import main
from fastforget.demo import report
from fastforget.demo.config import DemoConfig
from fastforget.demo.data import BENCHMARKS, permuted_digits, split_digits
from fastforget.demo.run import run

CPU = torch.device("cpu")


class NoBar:
    def update(self, steps):
        pass


def test_split_digits_tasks_are_disjoint_class_pairs():
    scenario = split_digits(CPU, task_heads=False)
    assert [t.name for t in scenario.tasks] == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    for i, task in enumerate(scenario.tasks):
        for labels in (task.train_y, task.test_y):
            assert set(labels.tolist()) == {2 * i, 2 * i + 1}
    assert sum(len(t.train_y) + len(t.test_y) for t in scenario.tasks) == 1797
    train = torch.cat([t.train_x for t in scenario.tasks])
    torch.testing.assert_close(train.mean(0), torch.zeros(64), atol=1e-5, rtol=0)  # standardised on train


def test_task_il_answers_within_the_targets_task():
    scenario = split_digits(CPU, task_heads=True)
    logits = torch.tensor([[0.0, 1.0, 9.0, 0.0, 0, 0, 0, 0, 0, 0], [5.0, 0.0, 0.0, 2.0, 0, 0, 0, 0, 0, 0]])
    targets = torch.tensor([0, 3])
    assert scenario.predict(logits, targets).tolist() == [1, 3]  # class 2 (task 2) is not an answer for task 1
    two_way = torch.stack([logits[0, :2], logits[1, 2:4]])
    torch.testing.assert_close(scenario.loss(logits, targets), torch.nn.functional.cross_entropy(two_way, targets % 2))
    class_il = split_digits(CPU, task_heads=False)
    assert class_il.predict(logits, targets).tolist() == [2, 0]


def test_permuted_digits_are_fixed_pixel_permutations_of_the_same_data():
    first, again = permuted_digits(CPU), permuted_digits(CPU)
    base = first.tasks[0].train_x
    for task, same in zip(first.tasks, again.tasks):
        assert torch.equal(task.train_x, same.train_x)  # fixed
        assert torch.equal(task.train_y, first.tasks[0].train_y)
        assert torch.equal(task.train_x.sort(1).values, base.sort(1).values)  # each row is a permutation
    assert len({tuple(t.train_x[0].tolist()) for t in first.tasks}) == 5
    assert set(BENCHMARKS) == {"split", "permuted"}


def test_metrics_of_a_known_matrix():
    matrix = [[90.0, 10.0, 0.0], [60.0, 80.0, 0.0], [70.0, 50.0, 100.0]]
    m = report.metrics(matrix)
    assert m["accuracy"] == pytest.approx((70 + 50 + 100) / 3)
    assert m["forgetting"] == pytest.approx(((90 - 70) + (80 - 50)) / 2)  # best ever since learned, minus final
    assert m["bwt"] == pytest.approx(((70 - 90) + (50 - 80)) / 2)


def test_class_incremental_finetune_forgets_replay_and_ewc_retain():
    """Tiny configuration (5 epochs per task): the first task's accuracy at the end of the sequence."""
    scenario = split_digits(CPU, task_heads=False)
    config = DemoConfig(epochs=5, ewc_lambda=1000.0, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first_task = {s: [row[0] for row in run(scenario, s, config, 0, NoBar())["matrix"]] for s in
                      ("finetune", "replay", "ewc")}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    finetune = first_task["finetune"]
    assert finetune[0] - finetune[-1] >= 20
    for strategy in ("replay", "ewc"):
        assert first_task[strategy][-1] >= finetune[-1] + 20, strategy


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "fastforget", "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in (
        "--benchmark",
        "--strategies",
        "--epochs",
        "--out",
        "--backend",
        "--device",
        "--seeds",
        "--ewc-lambda",
        "--ewc-estimator",
        "--estimator-sweep",
    ):
        assert flag in result.stdout


def test_every_command_and_option_says_what_it_does():
    parser = __import__("fastforget.__main__", fromlist=["_parser"])._parser()
    assert "catastrophic forgetting" in parser.description
    (commands,) = [a for a in parser._actions if a.dest == "command"]
    for choice in commands._choices_actions:
        assert choice.help, f"command {choice.dest} has no help line"
    for name, sub in commands.choices.items():
        undocumented = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
        assert not undocumented, f"{name}: options without help: {undocumented}"


def test_cli_rejects_an_unknown_strategy():
    with pytest.raises(SystemExit, match="unknown strategies"):
        main(["demo", "--strategies", "finetune,forgetless"])


def test_tiny_demo_writes_table_json_and_plot(tmp_path, capsys):
    strategies = ["finetune", "lora", "combined"]
    main(["demo", "--benchmark", "digits", "--epochs", "1", "--seeds", "2", "--strategies", ",".join(strategies),
          "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    printed = capsys.readouterr().out
    table = (tmp_path / "table.md").read_text()
    assert table.strip() in printed
    rows = [line for line in table.splitlines() if line.startswith("| split") or line.startswith("| permuted")]
    assert len(rows) == 3 * len(strategies)
    assert " ± " in table  # two seeds: mean ± std
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["seeds"] == 2 and results["config"]["fused_backend"] == "cpu"
    assert len(results["runs"]) == 3 * len(strategies) * 2 and len(results["summary"]) == 3 * len(strategies)
    for run_ in results["runs"]:
        assert len(run_["matrix"]) == 5 and all(len(row) == 5 for row in run_["matrix"])
        assert len(run_["curve"]) == 5  # one epoch per task
        assert run_["probe_max_abs_param_diff"] < 1e-4  # the fused and reference probes agree
        if run_["strategy"] == "combined":
            assert set(run_["probe"]["reference"]) >= {"replay", "ewc", "protect", "protection", "step"}
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
