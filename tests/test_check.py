"""bench/check.py (`make check`): the grad_ema_protect_ check skips only elements at the threshold, and every
benchmark table is printed even after a failed verification; bench/harness.py's interleaved timing and the
LoRA step's table built on it."""

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import check, harness  # noqa: E402


def test_protection_check_passes_and_counts_the_elements_at_the_threshold(capsys):
    numel = check.verify_protection_ops("cpu", torch.device("cpu"), torch.bfloat16, torch.float32)
    printed = capsys.readouterr().out
    assert numel > 0 and "within 8 ulp of the threshold not compared" in printed


def test_a_failed_check_still_prints_every_table(monkeypatch, capsys):
    ran = []

    def fail(*args):
        raise AssertionError("simulated mismatch")

    monkeypatch.setattr(check, "CHECKS", {"ewc_penalty": (fail, ("params", "fisher"), None)})
    for name in ("bench_ewc_penalty", "bench_fisher_update", "bench_grad_moments", "bench_scale_grads",
                 "bench_grad_ema", "bench_protect", "bench_lora_linear"):  # fmt: skip
        monkeypatch.setattr(getattr(check, name), "main", lambda name=name: ran.append(name))
    with pytest.raises(SystemExit, match="verification"):
        check.main()
    assert len(ran) == 7 and "FAIL" in capsys.readouterr().out


def test_each_device_check_part_is_bounded_by_its_own_timeouts():
    """bench/gpu_check.sh: every part (build included) finishes within 420 s by its timeouts, writes under $OUT,
    and never stops at the first failing test."""
    script = (Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh").read_text()
    build = script[script.index("build() {") : script.index("\n}\n")]
    parts = re.findall(r"\n  (\w+)\)\n(.*?);;", script, flags=re.S)
    assert [name for name, _ in parts] == ["tests", "tables"]
    for name, body in parts:
        assert "build" in body
        seconds = sum(int(s) for s in re.findall(r"timeout (\d+)", build + body))
        assert seconds <= 420, f"part {name}: timeouts add up to {seconds} s"
        assert "$OUT" in body and not re.search(r"pytest[^\n]* -x", body)


def test_interleaved_samples_run_every_function_once_per_round():
    calls = []
    samples = harness.interleaved_samples([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(times) for times in samples] == [3, 3] and all(t >= 0 for times in samples for t in times)


def test_median_ratio_is_the_median_of_per_round_ratios():
    # one slow round (the second) hits both functions: the per-round ratio stays 2, the ratio of medians does not
    assert harness.median_ratio([2.0, 40.0, 2.2, 2.4], [1.0, 20.0, 1.1, 1.2]) == pytest.approx(2.0)
    assert harness.median_ratio([1.0, 3.0, 2.0], [1.0, 1.0, 1.0]) == 2.0


def test_lora_step_table_gives_ratios_to_the_bound_and_to_peft(capsys):
    pytest.importorskip("peft")
    from bench import bench_lora_step as lora_step

    lora_step.print_table(lora_step.SMOKE, lora_step.variants(lora_step.SMOKE), repeats=2, warmup=0)
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.split()[:1] in (
        ["fastforget"], ["peft"], ["lower_bound"])}  # fmt: skip
    assert rows["lower_bound"][3] == "1.000" and rows["peft"][4] == "1.000" and len(rows["fastforget"]) == 6
    assert "medians of the per-round ratios" in printed and "the most any adapter can reach over PEFT" in printed
