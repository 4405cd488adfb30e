"""fastforget under torch.distributed, for real: 2 gloo processes on the CPU against a single-process run.

Each scenario runs once on 2 ranks (process start-up costs seconds, so one spawn checks many things) and returns
plain tensors; the tests compare them with the same computation in this process, on the union of the ranks' data.
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_utils import run_ranks
from torch import nn
from torch.multiprocessing import ProcessRaisedException
from torch.nn.parallel import DistributedDataParallel

import fastforget as ff

WORLD = 2
STEPS = 4
LAM = 0.7
TOL = dict(rtol=1e-5, atol=1e-6)


def mlp():
    """Hidden 5 and output 3: FSDP2 shards them unevenly over 2 ranks (3 + 2 and 2 + 1 rows)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def global_batches(count, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 3, (size,), generator=g)) for _ in range(count)]


def split(batches, rank, sizes=(4, 4)):
    """Rank `rank`'s part of every batch: the first sizes[0] samples go to rank 0, the next sizes[1] to rank 1."""
    start = sum(sizes[:rank])
    return [(x[start : start + sizes[rank]], y[start : start + sizes[rank]]) for x, y in batches]


def importance_task(model):
    """Anchors and Fisher for load_importance, the same on every rank (seeded)."""
    g = torch.Generator().manual_seed(5)
    anchors = [p.detach() + 0.3 * torch.randn(p.shape, generator=g) for p in model.parameters()]
    return anchors, [torch.rand(p.shape, generator=g) for p in model.parameters()]


def full(t):
    return t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t


def train(model, params, batches, ewc, protectors):
    """STEPS of SGD on cross-entropy + the EWC penalty, in the autograd form on even steps and apply_ on odd ones,
    each protector applied after backward. Returns what each step saw."""
    optimizer = torch.optim.SGD(params, lr=0.2)
    record = {"penalty": [], "grads": [], "importance": [[] for _ in protectors]}
    for step, (x, y) in enumerate(batches[:STEPS]):
        optimizer.zero_grad()
        if step % 2 == 0:
            penalty = ewc.penalty()
            (F.cross_entropy(model(x), y) + penalty).backward()
        else:
            F.cross_entropy(model(x), y).backward()
            penalty = ewc.apply_()
        for importances, protector in zip(record["importance"], protectors):
            importances.append(protector.protect_())
        record["penalty"].append(penalty.detach())
        record["grads"].append([full(p.grad).clone() for p in params])
        optimizer.step()
    record["params"] = [full(p.detach()).clone() for p in params]
    return record


def single_process_run(batches, protector_kw):
    model = mlp()
    params = list(model.parameters())
    ewc = ff.EWC(model, LAM)
    ewc.load_importance(*importance_task(model))
    protectors = [ff.GradientProtector(model, **kw) for kw in protector_kw]
    return train(model, params, batches, ewc, protectors), protectors


def assert_runs_match(got, expected):
    for key in ("penalty", "grads", "params"):
        torch.testing.assert_close(got[key], expected[key], **TOL)
    for ours, theirs in zip(got["importance"], expected["importance"]):
        torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL)


# ---------------------------------------------------------------------------------------------------------- DDP

DDP_PROTECTORS = [dict(window=3, threshold=0.6)]


def ddp_scenario(rank, world_size):
    ddp = DistributedDataParallel(mlp())
    batches = global_batches(STEPS)
    result = {}
    # Fisher: `batch` over equal per-rank halves of each batch, the per-sample ones over unequal parts (5 + 3)
    ewc = ff.EWC(ddp, LAM)
    ewc.consolidate(split(batches, rank), F.cross_entropy, estimator="batch", progress=False)
    result["fisher_batch"] = list(ewc.fisher)
    for estimator in ("empirical", "true"):
        fisher = ff.estimate_fisher(ddp, split(batches, rank, (5, 3)), F.cross_entropy, estimator=estimator)
        result[f"fisher_{estimator}"] = fisher
    # training with EWC and a protector: DDP averages the gradients, so every rank holds the single-process ones
    ewc = ff.EWC(ddp, LAM)
    ewc.load_importance(*importance_task(ddp))
    protectors = [ff.GradientProtector(ddp, **kw) for kw in DDP_PROTECTORS]
    result["run"] = train(ddp, list(ddp.parameters()), split(batches, rank), ewc, protectors)
    # replay: one buffer per rank, fed with that rank's own stream only
    buffer = ff.ReplayBuffer(6, generator=torch.Generator().manual_seed(rank))
    for x, y in split(batches, rank):
        buffer.add((x, y))
    result["replay"] = buffer.sample(len(buffer))
    return result


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_ranks(ddp_scenario, tmp_path_factory.mktemp("ddp"))


def test_ddp_fisher_equals_the_single_process_fisher_over_the_union(ddp_results):
    model, batches = mlp(), global_batches(STEPS)
    for estimator in ("batch", "empirical", "true"):
        expected = ff.estimate_fisher(model, batches, F.cross_entropy, estimator=estimator)
        for result in ddp_results:
            torch.testing.assert_close(result[f"fisher_{estimator}"], expected, **TOL)


def test_ddp_training_with_ewc_and_protector_equals_single_process(ddp_results):
    expected, _ = single_process_run(global_batches(STEPS), DDP_PROTECTORS)
    for result in ddp_results:
        assert_runs_match(result["run"], expected)


def test_ddp_replay_buffers_hold_their_own_ranks_data(ddp_results):
    batches = global_batches(STEPS)
    for rank, result in enumerate(ddp_results):
        own = torch.cat([x for x, _ in split(batches, rank)])
        stored, _ = result["replay"]
        assert len(stored) == 6
        assert all((own == row).all(1).any() for row in stored)


# -------------------------------------------------------------------------------------------------------- hangs


def failing_scenario(rank, world_size):
    if rank == 1:
        raise RuntimeError("rank 1 fails before the collective")
    dist.barrier()  # rank 0 would wait here for the 60 s process-group timeout


def test_a_failing_rank_does_not_hang_the_others(tmp_path):
    # whichever rank's error is reported first (rank 1's, or rank 0's broken connection), the others are ended
    # at once: no wait for the 60 s collective timeout, nor for run_ranks' own 50 s limit (a TimeoutError)
    start = time.monotonic()
    with pytest.raises(ProcessRaisedException, match="rank 1 fails|Connection reset|Connection closed"):
        run_ranks(failing_scenario, tmp_path, timeout=50)
    assert time.monotonic() - start < 40
