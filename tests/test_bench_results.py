"""The figures are data: every benchmark table in the docs is generated from bench/results/*.json, and agrees."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import render_docs  # noqa: E402

RESULTS = sorted((REPO / "bench" / "results").glob("*.json"))


def test_docs_tables_agree_with_the_results():
    assert render_docs.main(["--check"]) == 0, "run python bench/render_docs.py"


@pytest.mark.parametrize("path", RESULTS, ids=[p.name for p in RESULTS])
def test_results_file_says_what_where_and_when(path):
    results = json.loads(path.read_text())
    datetime.date.fromisoformat(results["date"])
    assert results["machine"]["description"] and results["torch"].startswith("2.")
    assert results["tables"]
    for table in results["tables"]:
        assert table["headers"] and all(len(row) == len(table["headers"]) for row in table["rows"]), table


def test_a_benchmark_cli_writes_its_results(tmp_path):
    """A benchmark run as a script (here the cheapest) writes every table it prints, with the machine and torch, to
    <script>.json."""
    env = {k: v for k, v in os.environ.items() if k != "FF_BENCH_SMOKE"}
    env["FF_BENCH_RESULTS"] = str(tmp_path)
    command = [sys.executable, "bench/bench_replay.py", "--scale", "0.002", "--repeats", "1"]
    printed = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=600).stdout
    results = json.loads((tmp_path / "bench_replay.json").read_text())
    assert results["command"] == "python bench/bench_replay.py --scale 0.002 --repeats 1"
    assert results["machine"]["cpus"] == os.cpu_count() and results["torch"] == __import__("torch").__version__
    (table,) = results["tables"]
    assert table["headers"][:2] == ["policy", "implementation"] and len(table["rows"]) >= 6
    lines = [" ".join(line.split()) for line in printed.splitlines()]
    for row in table["rows"]:
        assert " ".join(row) in lines, row  # the printed table, cell for cell
    assert render_docs.render(results, 0).count("\n|") == len(table["rows"]) + 2
