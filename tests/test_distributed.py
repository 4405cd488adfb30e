"""fastforget under torch.distributed, for real: 2 gloo processes on the CPU against a single-process run.

Each scenario runs once on 2 ranks (process start-up costs seconds, so one spawn checks many things) and returns
plain tensors; the tests compare them with the same computation in this process, on the union of the ranks' data.
"""

import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from distributed_utils import run_ranks
from torch import nn
from torch.distributed.fsdp import fully_shard
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


# -------------------------------------------------------------------------------------------------------- FSDP2

FSDP_PROTECTORS = [dict(window=3, threshold=0.6), dict(mode="element", window=3, normalize="max", threshold=0.6)]


def sharded_mlp():
    model = mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def fsdp_scenario(rank, world_size, checkpoint):
    model = sharded_mlp()
    params = list(model.parameters())
    batches = global_batches(STEPS)
    result = {}
    ewc = ff.EWC(model, LAM)
    ewc.load_importance(*importance_task(mlp()))  # full tensors, sharded like the parameters
    result["state_is_sharded"] = all(
        t.placements == p.placements and t.to_local().shape == p.to_local().shape
        for t, p in zip(ewc.anchors + ewc.fisher, params + params)
    )
    # the penalty alone: every rank backpropagates the global penalty
    penalty = ewc.penalty()
    penalty.backward()
    result["penalty"] = penalty.detach()
    result["penalty_grads"] = [p.grad.full_tensor() for p in params]
    for p in params:
        p.grad = None
    result["apply"] = ewc.apply_()
    result["apply_grads_sharded"] = all(p.grad.placements == p.placements for p in params)
    result["apply_grads"] = [p.grad.full_tensor() for p in params]
    # the batch Fisher: FSDP2 reduce-scatters (averages) each batch's gradient
    fisher_ewc = ff.EWC(model, LAM)
    fisher_ewc.consolidate(split(batches, rank), F.cross_entropy, estimator="batch", progress=False)
    result["fisher_batch"] = [f.full_tensor() for f in fisher_ewc.fisher]
    try:  # per-sample gradients would need the full parameters
        ff.estimate_fisher(model, split(batches, rank), F.cross_entropy, estimator="empirical")
    except ValueError as error:
        result["empirical_error"] = str(error)
    protectors = [ff.GradientProtector(model, **kw) for kw in FSDP_PROTECTORS]
    result["run"] = train(model, params, split(batches, rank), ewc, protectors)
    result["saved_penalty"] = ewc.penalty().detach()
    dcp.save({"ewc": ewc.state_dict(), "protector": protectors[1].state_dict()}, checkpoint_id=checkpoint)
    return result


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    return run_ranks(fsdp_scenario, out, str(out / "checkpoint")), out / "checkpoint"


def test_fsdp_penalty_and_gradients_equal_single_process(fsdp_results):
    results, _ = fsdp_results
    model = mlp()
    ewc = ff.EWC(model, LAM)
    ewc.load_importance(*importance_task(model))
    penalty = ewc.penalty()
    penalty.backward()
    for result in results:
        assert result["state_is_sharded"] and result["apply_grads_sharded"]
        torch.testing.assert_close(result["penalty"], penalty.detach(), **TOL)
        torch.testing.assert_close(result["apply"], penalty.detach(), **TOL)
        # not world_size times the single-process gradient
        torch.testing.assert_close(result["penalty_grads"], [p.grad for p in model.parameters()], **TOL)
        torch.testing.assert_close(result["apply_grads"], [p.grad for p in model.parameters()], **TOL)


def test_fsdp_batch_fisher_equals_the_single_process_fisher_over_the_union(fsdp_results):
    results, _ = fsdp_results
    expected = ff.estimate_fisher(mlp(), global_batches(STEPS), F.cross_entropy, estimator="batch")
    for result in results:
        torch.testing.assert_close(result["fisher_batch"], expected, **TOL)
        assert "use estimator='batch'" in result["empirical_error"]


def test_fsdp_training_with_ewc_and_protectors_equals_single_process(fsdp_results):
    results, _ = fsdp_results
    expected, _ = single_process_run(global_batches(STEPS), FSDP_PROTECTORS)
    for result in results:
        assert_runs_match(result["run"], expected)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp_checkpoint_saved_on_2_ranks_loads_on_1(fsdp_results):
    results, checkpoint = fsdp_results
    expected, protectors = single_process_run(global_batches(STEPS), FSDP_PROTECTORS)
    model = mlp()
    with torch.no_grad():
        for p, trained in zip(model.parameters(), expected["params"]):
            p.copy_(trained)
    ewc, protector = ff.EWC(model, LAM), ff.GradientProtector(model, **FSDP_PROTECTORS[1])
    state = {"ewc": ewc.state_dict(), "protector": protector.state_dict()}  # templates: zeros
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=str(checkpoint))
    ewc.load_state_dict(state["ewc"])
    protector.load_state_dict(state["protector"])
    assert ewc.tasks == 1
    torch.testing.assert_close(ewc.penalty().detach(), results[0]["saved_penalty"], **TOL)
    torch.testing.assert_close(protector.mean + protector.var, protectors[1].mean + protectors[1].var, **TOL)
    torch.testing.assert_close(protector.steps, protectors[1].steps)


# --------------------------------------------------------------------------------------------------------- LoRA

LORA_STEPS = 3


def lora_mlp():
    """mlp() with rank-2 adapters on both layers (lora_B non-zero, so that the adapters matter from step 0)."""
    model = ff.apply_lora(mlp(), ["0", "2"], r=2, alpha=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def lora_train(model, batches):
    """LORA_STEPS of SGD on the trainable (adapter) parameters only; returns the frozen weights' gradients seen."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    for x, y in batches[:LORA_STEPS]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return [p.grad for p in model.parameters() if not p.requires_grad]


def lora_scenario(rank, world_size):
    batches, probe = global_batches(LORA_STEPS), global_batches(1, seed=9)[0][0]
    result = {}
    ddp = DistributedDataParallel(lora_mlp())
    result["ddp_frozen_grads"] = lora_train(ddp, split(batches, rank))
    result["ddp"] = {k: v.clone() for k, v in ff.lora_state_dict(ddp.module).items()}
    # FSDP2 shards the adapters like every other parameter (dim 0: A's r rows, B's out rows)
    model = lora_mlp()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    lora_train(model, split(batches, rank))
    adapters = ff.lora_state_dict(model)
    result["fsdp_sharded"] = all(isinstance(t, torch.distributed.tensor.DTensor) for t in adapters.values())
    result["fsdp"] = {k: full(v).clone() for k, v in adapters.items()}
    result["fsdp_output"] = model(probe).detach()
    for layer in (model[0], model[2]):
        layer.merge()  # W += s B A on the sharded DTensors
    result["fsdp_merged_output"] = model(probe).detach()
    result["fsdp_merged_weights"] = [full(layer.base_layer.weight).clone() for layer in (model[0], model[2])]
    return result


@pytest.fixture(scope="module")
def lora_results(tmp_path_factory):
    return run_ranks(lora_scenario, tmp_path_factory.mktemp("lora"))


def test_lora_under_ddp_and_fsdp_equals_single_process(lora_results):
    model = lora_mlp()
    lora_train(model, global_batches(LORA_STEPS))
    expected = ff.lora_state_dict(model)
    probe = global_batches(1, seed=9)[0][0]
    output = model(probe).detach()
    for layer in (model[0], model[2]):
        layer.merge()
    merged_weights = [layer.base_layer.weight.detach() for layer in (model[0], model[2])]
    for result in lora_results:
        assert all(grad is None for grad in result["ddp_frozen_grads"])  # only the adapters train
        assert result["fsdp_sharded"]
        torch.testing.assert_close(result["ddp"], expected, **TOL)
        torch.testing.assert_close(result["fsdp"], expected, **TOL)
        torch.testing.assert_close(result["fsdp_output"], output, **TOL)
        torch.testing.assert_close(result["fsdp_merged_output"], output, **TOL)
        torch.testing.assert_close(result["fsdp_merged_weights"], merged_weights, **TOL)


# ------------------------------------------------------------------------------------------- ProtectedTrainer


def trainer_run(model, task_a, task_b):
    """Task A with a ProtectedTrainer (EWC + tensor-mode protector), end_task (batch Fisher), then task B."""
    ewc = ff.EWC(model, LAM)
    protector = ff.GradientProtector(model, window=3, threshold=0.6)
    trainer = ff.ProtectedTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.2), F.cross_entropy, ewc=ewc, protector=protector
    )
    penalties = []
    for batch in task_a:
        trainer.step(batch)
    trainer.end_task(task_a, estimator="batch")
    for batch in task_b:
        penalties.append(torch.tensor(trainer.step(batch)["penalty"]))
    return {"penalties": torch.stack(penalties), "params": [full(p.detach()).clone() for p in model.parameters()]}


def trainer_scenario(rank, world_size):
    task_a, task_b = global_batches(STEPS, seed=11), global_batches(STEPS, seed=12)
    result = {"ddp": trainer_run(DistributedDataParallel(mlp()), split(task_a, rank), split(task_b, rank))}
    result["fsdp"] = trainer_run(sharded_mlp(), split(task_a, rank), split(task_b, rank))
    # rehearsal under DDP: per-rank buffers, each rank replays its own examples
    model = DistributedDataParallel(mlp())
    buffer = ff.ReplayBuffer(8, generator=torch.Generator().manual_seed(rank))
    trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.2), F.cross_entropy, replay=buffer)
    trainer.end_task(split(task_a, rank))
    result["replay_losses"] = torch.tensor([trainer.step(batch)["replay_loss"] for batch in split(task_b, rank)])
    return result


def test_protected_trainer_under_ddp_and_fsdp_equals_single_process(tmp_path):
    results = run_ranks(trainer_scenario, tmp_path)
    expected = trainer_run(mlp(), global_batches(STEPS, seed=11), global_batches(STEPS, seed=12))
    assert expected["penalties"][1:].gt(0).all()  # after its first step, task B is pulled back towards task A
    for result in results:
        for engine in ("ddp", "fsdp"):
            torch.testing.assert_close(result[engine]["penalties"], expected["penalties"], **TOL)
            torch.testing.assert_close(result[engine]["params"], expected["params"], **TOL)
        assert result["replay_losses"].isfinite().all()


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
