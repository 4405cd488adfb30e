"""bench/check.py (`make check`): the grad_ema_protect_ check skips only elements at the threshold, and every
benchmark table is printed even after a failed verification."""

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import check  # noqa: E402


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
