"""Every Fisher estimator under DDP (2 gloo processes) against one process on the union of the ranks' samples,
bitwise identical on the ranks; an unwrapped model under multi-process torch.distributed raises."""

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastforget as ff
from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # the spawned ranks import this module, not conftest, before transformers
transformers = pytest.importorskip("transformers")

VOCAB = 37
PARTS = (5, 3)  # per-sample estimators: unequal numbers of samples per rank (batches of 8)
ESTIMATORS = ("empirical", "true", "mas", "batch")


def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=VOCAB, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def pairs():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]


def token_batches():
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (7, 6), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def part(batch, rank, sizes):
    start = sum(sizes[:rank])
    rows = slice(start, start + sizes[rank])
    return {k: v[rows] for k, v in batch.items()} if isinstance(batch, dict) else tuple(t[rows] for t in batch)


def hf_loss(model, batch):
    return model(**batch).loss


def estimate(model, batches, estimator, lm):
    if lm:
        loss = {} if estimator == "mas" else {"batch_loss": hf_loss}
        return ff.estimate_fisher(model, batches, estimator=estimator, **loss)
    return ff.estimate_fisher(model, batches, None if estimator == "mas" else F.cross_entropy, estimator=estimator)


def scenario(rank, world_size):
    result = {}
    for lm, make, data in ((False, classifier, pairs()), (True, llama, token_batches())):
        ddp = DistributedDataParallel(make())
        for estimator in ESTIMATORS if not lm else ("empirical", "mas"):
            sizes = (4, 4) if estimator == "batch" else PARTS
            if lm and estimator != "batch":
                sizes = (4, 3)
            local = [part(b, rank, sizes) for b in data]
            result[lm, estimator] = estimate(ddp, local, estimator, lm)
        ewc = ff.EWC(ddp, lam=1.0)
        result[lm, "stats"] = ewc.consolidate(
            [part(b, rank, PARTS if not lm else (4, 3)) for b in data], None if lm else F.cross_entropy,
            batch_loss=hf_loss if lm else None, progress=False,
        )  # fmt: skip
        try:
            estimate(ddp.module, data, "empirical", lm)
        except ValueError as error:
            result[lm, "unwrapped"] = str(error)
    return result


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(scenario, tmp_path_factory.mktemp("fisher_ddp"), timeout=300)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_ddp_classifier_fisher_is_the_union_fisher_identical_on_the_ranks(results, estimator):
    want = estimate(classifier(), pairs(), estimator, lm=False)
    first, second = (r[False, estimator] for r in results)
    assert all(torch.equal(a, b) for a, b in zip(first, second))  # bitwise, every rank
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["empirical", "mas"])
def test_ddp_language_model_fisher_is_the_union_fisher(results, estimator):
    want = estimate(llama(), token_batches(), estimator, lm=True)
    first, second = (r[True, estimator] for r in results)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for got, expected in zip(first, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-12)


@pytest.mark.parametrize("lm", [False, True], ids=["classifier", "llama"])
def test_ddp_consolidation_stats_and_the_unwrapped_model_error(results, lm):
    assert results[0][lm, "stats"] == results[1][lm, "stats"]
    assert results[0][lm, "stats"]["estimator"] == "empirical"
    for result in results:
        assert "not wrapped" in result[lm, "unwrapped"] and "DistributedDataParallel" in result[lm, "unwrapped"]
