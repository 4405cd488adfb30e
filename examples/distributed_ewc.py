"""EWC + gradient protection on two tasks under DDP or FSDP2, on CPUs (gloo), with a DCP checkpoint at the end.

    torchrun --nproc_per_node 2 examples/distributed_ewc.py            # DDP
    torchrun --nproc_per_node 2 examples/distributed_ewc.py --fsdp     # FSDP2 (fully_shard)

Each rank trains on its own part of each batch; the printed numbers are the same on every rank.
"""

import argparse
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fastforget as ff


def task(seed, batches=20, size=32):
    """A synthetic 4-class task: labels from a random linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(16, 4, generator=g)
    data = []
    for _ in range(batches):
        x = torch.randn(size, 16, generator=g)
        data.append((x, (x @ weights).argmax(1)))
    return data


def train(model, data, ewc=None, protector=None):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if ewc is not None:
            loss = loss + ewc.penalty()  # the global penalty (under FSDP2: one scalar all-reduce)
        loss.backward()
        if protector is not None:
            protector.protect_()
        optimizer.step()


@torch.no_grad()
def accuracy(model, data):
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    total = torch.tensor([correct, sum(len(y) for _, y in data)])
    dist.all_reduce(total)
    return float(total[0] / total[1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of replicating with DDP")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    if args.fsdp:
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(model)
    else:
        model = DistributedDataParallel(model)

    def mine(data):  # this rank's share of every batch
        return [(x[rank::world], y[rank::world]) for x, y in data]

    task_a, task_b = mine(task(1)), mine(task(2))
    train(model, task_a)
    ewc = ff.EWC(model, lam=50.0)
    ewc.consolidate(task_a, F.cross_entropy, estimator="batch", progress=False)  # all ranks' gradients
    protector = ff.GradientProtector(model, window=10, threshold=0.6)
    before = accuracy(model, task_a)
    train(model, task_b, ewc, protector)
    with torch.no_grad():
        penalty = ewc.penalty().item()
    with tempfile.TemporaryDirectory() as directory:
        path = [directory]
        dist.broadcast_object_list(path)  # one checkpoint directory for all ranks
        dcp.save({"ewc": ewc.state_dict(), "protector": protector.state_dict()}, checkpoint_id=path[0])
        dist.barrier()
    summary = (
        f"{'FSDP2' if args.fsdp else 'DDP'} x{world}: task A accuracy {before:.3f} -> {accuracy(model, task_a):.3f}, "
        f"task B {accuracy(model, task_b):.3f}, EWC penalty {penalty:.4f}"
    )
    if rank == 0:
        print(summary)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
