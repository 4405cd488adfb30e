"""The LM benchmark: corpora and splits, the pre-training cache, every strategy end to end at a tiny size, the
forgetting it must show, and the command line."""

import io
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import fastforget as ff  # noqa: E402
from fastforget.__main__ import _config, _parser  # noqa: E402
from fastforget.demo import DemoConfig, lm, lm_data, lm_report, run_demo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# seconds, not minutes: a 1-layer Llama of width 64 on 32-byte sequences (54k parameters), pre-trained for 300
# steps (CE_A ~2.7 nats/byte) -- enough to have something of A's to forget: fine-tuning 24 steps on B raised CE_A by
# 0.08-0.12 for seeds 0-2, while ewc, replay and combined raised it by at most 0.04. The merges' sweeps cost only
# evaluations; mofo's would train again, so it has none here.
TINY = lm.LMConfig(hidden=64, layers=1, heads=2, intermediate=128, seq_len=32, batch_size=8, pretrain_steps=300,
                   steps=24, eval_sequences=32, fisher_sequences=8, replay_capacity=256, sweep=(10.0,),
                   mofo_sweep=(), wise_ft_sweep=(0.25,), merge_sweep=(0.25,), probe_steps=1,
                   probe_legs=1)  # fmt: skip


@pytest.fixture(scope="module")
def corpora():
    return lm_data.load(TINY.seq_len)


def test_split_holds_out_every_tenth_document_in_sorted_order():
    documents = {f"doc{i:02d}": f"text {i}" for i in range(25)}
    train, held_out = lm_data.split(documents)
    assert held_out == "text 9\n\ntext 19"
    assert train.split("\n\n") == [f"text {i}" for i in range(25) if i not in (9, 19)]


def test_sequences_are_utf8_bytes_cut_without_overlap():
    ids = lm_data.sequences("héllo, wörld", 4)  # 14 bytes: three sequences, the tail dropped
    assert ids.dtype == torch.int64 and ids.shape == (3, 4)
    assert bytes(ids.flatten().tolist()) == "héllo, wörld".encode()[:12]
    example = lm_data.TokenDataset(ids)[1]
    assert torch.equal(example["input_ids"], ids[1]) and torch.equal(example["labels"], ids[1])


def test_corpora_are_prose_then_code_fixed_and_disjoint(corpora):
    a, b = corpora
    assert lm_data.load(TINY.seq_len)[1].digest == b.digest  # fixed: the same text every time
    assert a.name == "pydoc topics" and b.name == "stdlib source"
    for corpus in corpora:
        assert len(corpus.train) > 9 * len(corpus.held_out) // 2 > 0
        assert int(corpus.train.max()) < lm_data.VOCAB
    topics = lm_data.corpus_a()
    held_out_topic = sorted(topics)[lm_data.HELD_OUT_EVERY - 1]
    train_text, held_out_text = lm_data.split(topics)
    assert topics[held_out_topic] in held_out_text and topics[held_out_topic] not in train_text
    prose, code = (bytes(c.held_out[:64].flatten().tolist()).decode("utf-8", "replace") for c in corpora)
    assert prose.count("def ") < code.count("def ") and code.count("    ") > prose.count("    ")


def test_pretraining_is_cached_by_configuration_and_seed(tmp_path, corpora):
    config = replace(TINY, pretrain_steps=2, cache=str(tmp_path))
    state, si_state, _, cached = lm.pretrain(config, corpora, 0, "cpu")
    assert not cached and len(list(tmp_path.glob("lm-*.pt"))) == 1
    again, si_again, _, cached = lm.pretrain(config, corpora, 0, "cpu")
    assert cached and all(torch.equal(state[k], again[k]) for k in state)
    assert si_again.keys() == si_state.keys()
    # the fine-tuning settings are not part of the key; the seed and the pre-training settings are
    assert lm.pretrain(replace(config, steps=8, ewc_lambda=1.0), corpora, 0, "cpu")[3]
    assert not lm.pretrain(config, corpora, 1, "cpu")[3]
    assert not lm.pretrain(replace(config, pretrain_lr=1e-3), corpora, 0, "cpu")[3]
    assert len(list(tmp_path.glob("lm-*.pt"))) == 3 and not list(tmp_path.glob("*.tmp"))


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    config = DemoConfig(benchmarks=("lm",), out=str(out), progress=False,
                        lm=replace(TINY, cache=str(out / "cache")))  # fmt: skip
    printed = io.StringIO()
    summary = run_demo(config, stream=printed)
    return out, summary, printed.getvalue()


def test_every_strategy_writes_its_row_table_and_plot(tiny_demo):
    out, _, printed = tiny_demo
    results = json.loads((out / "results.json").read_text())
    assert [row["strategy"] for row in results["summary"]] == list(lm.LM_STRATEGIES)
    for row in results["summary"]:
        assert row["scenario"].startswith("lm")
        for metric in ("forgetting", "learning"):
            assert row[metric]["n"] == 1 and math.isfinite(row[metric]["mean"]), (row["strategy"], metric)
        assert row["tokens_per_s"]["fused"]["mean"] > 0 and row["tokens_per_s"]["reference"]["mean"] > 0
    for run in results["runs"]:
        before, after = run["ce_before"], run["ce_after"]
        merged = [TINY.steps] if run["strategy"] in lm.MERGES else []  # the merged model: a last point
        assert [point["step"] for point in run["curve"]] == [TINY.steps // 2, TINY.steps, *merged]  # stages' ends
        assert {name: run["curve"][-1][name] for name in "AB"} == after
        assert run["forgetting"] == pytest.approx(after["A"] - before["A"])
        assert run["learning"] == pytest.approx(before["B"] - after["B"])
        assert run["probe_max_abs_param_diff"] < 1e-3, run["strategy"]  # fused and reference: the same steps
    assert sorted({(p["strategy"], p["lambda"]) for p in results["lm"]["sweep"]}) == [
        ("ewc", 10 * TINY.ewc_lambda), ("fisher-merge", 0.25), ("kl", 10 * TINY.kl_lambda),
        ("wise-ft", 0.25)]  # fmt: skip
    for strategy in lm.MERGES:  # the fused merge against the reference op, on the fine-tuned model
        (run,) = [r for r in results["runs"] if r["strategy"] == strategy]
        assert run["merge"]["max_abs_param_diff"] < 1e-6 and run["merge"]["ms"]["fused"] > 0
        assert run["curve"][-1]["merge"] == {"wise-ft": "α=0.5", "fisher-merge": "w_B=0.5"}[strategy]
    (fisher_merge,) = [r for r in results["runs"] if r["strategy"] == "fisher-merge"]
    assert [f["estimator"] for f in fisher_merge["fisher"]] == ["empirical", "empirical"]  # the Fishers of A and B
    points = [(r["learning"]["mean"], r["forgetting"]["mean"]) for r in results["summary"]]
    points += [(p["learning"], p["forgetting"]) for p in results["lm"]["sweep"]]
    front = [(p["learning"], p["forgetting"]) for p in results["lm"]["pareto"]]
    assert front and all(p in points for p in front)
    for x, y in front:  # no measured point learns at least as much and forgets at most as much, and differs
        assert not any(u >= x and v <= y and (u, v) != (x, y) for u, v in points), (x, y)
    assert all(x < u for x, u in zip([p[0] for p in front], [p[0] for p in front][1:]))
    assert results["lm"]["parameters"] == sum(p.numel() for p in lm.make_model(TINY, 0, "cpu").parameters())
    assert results["lm"]["pretraining"][0]["cached"] is False
    table = (out / "table.md").read_text()
    assert all(f"| {s} |" in table for s in lm.LM_STRATEGIES)
    assert "| mofo | fraction=0.15 |" in table and "| wise-ft | α=0.5 |" in table and "Pareto front" in table
    assert "| empirical | " in table  # ewc's Fisher scale
    assert table.strip() in printed
    assert (out / "lm_tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "accuracy.png").exists()  # no digits benchmark ran


def test_finetune_forgets_and_ewc_replay_combined_forget_less(tiny_demo):
    _, summary, _ = tiny_demo
    forgetting = {row["strategy"]: row["forgetting"]["mean"] for row in summary}
    assert forgetting["finetune"] > 0.05
    for strategy in ("ewc", "replay", "combined", "wise-ft", "fisher-merge"):
        assert forgetting[strategy] < forgetting["finetune"] / 2, (strategy, forgetting)


def test_the_merges_average_finetunes_model_and_trace_a_curve(tiny_demo):
    """wise-ft and fisher-merge merge the model that finetune trained (the same curve up to the merge), and WiSE-FT
    forgets less the closer alpha is to the pre-trained model (alpha 0)."""
    out, summary, _ = tiny_demo
    results = json.loads((out / "results.json").read_text())
    runs = {r["strategy"]: r for r in results["runs"]}
    for strategy in lm.MERGES:
        assert runs[strategy]["curve"][:-1] == runs["finetune"]["curve"]
        assert runs[strategy]["tokens_per_s"] == runs["finetune"]["tokens_per_s"]
    (quarter,) = [p for p in results["lm"]["sweep"] if p["strategy"] == "wise-ft"]
    assert quarter["forgetting"] < runs["wise-ft"]["forgetting"] < runs["finetune"]["forgetting"]


class RecordingBar:
    """What run_lm tells its progress bar: the descriptions, in order, and the steps."""

    def __init__(self):
        self.descriptions, self.steps = [], 0

    def set_description(self, text):
        self.descriptions.append(text)

    def update(self, n=1):
        self.steps += n


def test_progress_names_what_runs(tmp_path):
    config = replace(TINY, pretrain_steps=4, steps=4, cache=str(tmp_path))
    strategies = ("finetune", "kl", "wise-ft")
    for cached in (False, True):
        bar = RecordingBar()
        lm.run_lm(config, strategies, 1, "cpu", "auto", bar)
        assert bar.steps == lm.total_steps(config, strategies, 1)
        pretraining = "lm pre-training seed 0" + (": loaded from the cache" if cached else " (not cached yet)")
        assert bar.descriptions == [
            pretraining, "lm finetune seed 0", "lm finetune seed 0: timing fused vs reference",
            "lm kl seed 0", "lm kl seed 0: timing fused vs reference", "lm kl λ=10 seed 0",
            "lm wise-ft seed 0: merging",
        ]  # fmt: skip


def test_the_forgetting_callback_measures_what_evaluate_does(tmp_path, corpora):
    """The fine-tuning CEs come from ForgettingCallback at the end of every stage: the last equals `evaluate` on the
    fine-tuned model (the same sequences, the same token-weighted mean), and its deltas are against `before`."""
    config = replace(TINY, pretrain_steps=4, steps=4, cache=str(tmp_path))
    state, si_state, _, _ = lm.pretrain(config, corpora, 0, "cpu")
    before = lm.evaluate(lm.pretrained_model(state, config, 0, "cpu"), corpora, config)
    result = lm.run_strategy("finetune", state, si_state, corpora, config, 0, "cpu", "auto", str(tmp_path), before)
    assert [point["step"] for point in result["curve"]] == [2, 4]
    after = lm.evaluate(result["model"], corpora, config)
    for name in "AB":
        assert result["ce"][name] == pytest.approx(after[name], rel=1e-6, abs=1e-6)
        assert result["curve"][-1][name] == result["ce"][name]


def test_ewc_logs_each_estimators_fisher_scale_and_sweeps_lambda_with_it(tmp_path, corpora, monkeypatch):
    """Every EWC consolidation's Fisher scale is in the run (A's first): equal to ff.estimate_fisher of the
    pre-trained model on the sequences the trainer's end_task reads; estimator_sweep runs ewc's lambdas again with
    each estimator, and the batch Fisher is the smaller."""
    from fastforget import ewc as ewc_module
    from fastforget.transformers import hf_batch_loss

    monkeypatch.setattr(ewc_module, "_warned", set())  # the batch-scale warning is once per process
    config = replace(TINY, pretrain_steps=4, steps=4, cache=str(tmp_path), estimator_sweep=("batch",))
    with pytest.warns(UserWarning, match="estimator='batch' squares each batch's mean gradient"):
        result = lm.run_lm(config, ("ewc",), 1, "cpu", "auto")
    (run,) = result["runs"]
    assert [p["lambda"] for p in result["estimators"]] == [TINY.ewc_lambda, 10 * TINY.ewc_lambda]
    state = lm.pretrain(config, corpora, 0, "cpu")[0]
    model = lm.pretrained_model(state, config, 0, "cpu")
    first = lm.finetune_sets(config, corpora, 0)[0].ids[: config.fisher_sequences]
    batches = [{"input_ids": b, "labels": b} for b in first.split(config.batch_size)]
    for point in (run, *result["sweep"], *result["estimators"]):
        stats = point["fisher"][0]
        fisher = ff.estimate_fisher(model, batches, batch_loss=hf_batch_loss, estimator=stats["estimator"])
        assert stats["elements"] == sum(f.numel() for f in fisher) == result["parameters"]
        assert stats["mean"] == pytest.approx(float(sum(f.sum() for f in fisher)) / stats["elements"], rel=1e-4)
        assert stats["max"] == pytest.approx(max(float(f.max()) for f in fisher), rel=1e-4)
        assert len(point["fisher"]) == config.stages  # A, then B's first stage
    assert result["estimators"][0]["fisher"][0]["estimator"] == "batch"
    assert result["estimators"][0]["fisher"][0]["mean"] < run["fisher"][0]["mean"]
    rows = lm_report.estimator_rows(result["runs"], result["sweep"], result["estimators"])
    assert [(r["estimator"], r["lambda"]) for r in rows] == [
        ("empirical", TINY.ewc_lambda), ("empirical", 10 * TINY.ewc_lambda), ("batch", TINY.ewc_lambda),
        ("batch", 10 * TINY.ewc_lambda)]  # fmt: skip
    for row in rows:
        assert row["strength"] == pytest.approx(row["lambda"] * row["fisher_mean"]) and row["ewc_penalty"] > 0
    assert lm_report.estimator_table(rows).count("\n| batch |") == 2


def test_cli_selects_the_lm_benchmark_and_its_settings(tmp_path):
    args = _parser().parse_args(["demo", "--benchmark", "lm", "--strategies", "kl,si", "--lm-steps", "8",
                                 "--lm-cache", str(tmp_path)])  # fmt: skip
    config = _config(args)
    assert config.benchmarks == ("lm",) and config.strategies_for("lm") == ("kl", "si")
    assert config.lm.steps == 8 and config.lm.cache_dir() == tmp_path
    every = _config(_parser().parse_args(["demo"]))
    assert every.benchmarks == ("split", "permuted", "lm") and every.strategies_for("lm") == lm.LM_STRATEGIES
    with pytest.raises(SystemExit, match="none of --strategies kl runs on split, permuted"):
        _config(_parser().parse_args(["demo", "--benchmark", "digits", "--strategies", "kl"]))
    with pytest.raises(SystemExit, match="--lm-steps must be >= 1"):
        _config(_parser().parse_args(["demo", "--lm-steps", "0"]))
    assert every.ewc_lambda == 100 and every.lm.ewc_lambda == 1e4  # each benchmark's own default
    assert every.lm.ewc_estimator == "empirical" and every.lm.estimator_sweep == ()
    fisher = _config(_parser().parse_args(["demo", "--benchmark", "lm", "--ewc-lambda", "500", "--ewc-estimator",
                                           "true", "--estimator-sweep", "batch, mas"]))  # fmt: skip
    assert fisher.lm.ewc_lambda == 500 and fisher.lm.ewc_estimator == "true"
    assert fisher.lm.estimator_sweep == ("batch", "mas")
    with pytest.raises(SystemExit, match="unknown --estimator-sweep"):
        _config(_parser().parse_args(["demo", "--estimator-sweep", "empirical,fisher"]))
    with pytest.raises(SystemExit, match="--ewc-lambda must be >= 0"):
        _config(_parser().parse_args(["demo", "--ewc-lambda", "nan"]))


def test_the_model_builds_from_the_repository_root():
    """`python -m fastforget demo` run from the checkout has the repository's kernels/ folder on sys.path, which
    shadows the Hugging Face `kernels` package that transformers imports."""
    code = ("from fastforget.demo import lm; "
            "print(sum(p.numel() for p in lm.make_model(lm.LMConfig(hidden=32, layers=1, heads=2), 0, 'cpu')"
            ".parameters()))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 0
