"""The Fisher's scale after each consolidation (ewc.last_fisher_stats, the return value, the fastforget.ewc log) and
the warning that the batch Fisher is about |b| times smaller than the per-sample ones."""

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastforget as ff
from fastforget import ewc as ewc_module


def setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    g = torch.Generator().manual_seed(1)
    return model, [(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(3)]


def test_consolidate_reports_the_fisher_scale(caplog):
    model, batches = setup()
    ewc = ff.EWC(model, lam=3.0)
    assert ewc.last_fisher_stats is None
    with caplog.at_level(logging.INFO, logger="fastforget.ewc"):
        stats = ewc.consolidate(batches, F.cross_entropy, progress=False)
    fisher = ff.estimate_fisher(model, batches, F.cross_entropy)
    flat = torch.cat([f.flatten() for f in fisher]).double()
    assert stats is ewc.last_fisher_stats and stats["estimator"] == "empirical"
    assert stats["elements"] == flat.numel()
    assert stats["mean"] == pytest.approx(float(flat.mean()), rel=1e-12)
    assert stats["max"] == float(flat.max())
    assert any("empirical Fisher" in r.message and f"{stats['mean']:.4g}" in r.message for r in caplog.records)


def test_the_batch_fisher_warns_once_that_it_is_batch_size_times_smaller(monkeypatch):
    monkeypatch.setattr(ewc_module, "_warned", set())
    model, batches = setup()
    per_sample = ff.EWC(model).consolidate(batches, F.cross_entropy, progress=False)
    with pytest.warns(UserWarning, match=r"about \|b\| \(the batch size\) times smaller"):
        batch = ff.EWC(model).consolidate(batches, F.cross_entropy, estimator="batch", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff.EWC(model).consolidate(batches, F.cross_entropy, estimator="batch", progress=False)
    # the warning's claim on this model: batches of 16 samples whose gradients disagree
    assert 4 < per_sample["mean"] / batch["mean"] < 16 * 1.5
