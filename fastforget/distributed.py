"""torch.distributed support: FSDP2 (DTensor) parameters seen through their local shards, and small collectives.

Under DDP parameters are plain tensors, identical on every rank, and gradients are all-reduced (averaged) by DDP
itself: nothing here is needed. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) each parameter is a DTensor
sharded over a one-dimensional device mesh; fastforget's ops run on the local shards (``to_local()``, no
all-gather), state tensors are DTensors sharded like their parameters (so ``torch.distributed.checkpoint``
saves and reshards them), and only per-tensor statistics and scalars cross ranks.
"""

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def is_sharded(t) -> bool:
    return isinstance(t, DTensor)


def local(t):
    """The local shard of a DTensor (differentiable: its gradient is a DTensor sharded like `t`), else `t`."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_parameters(names, params):
    """The process group the parameters are sharded over, or None for plain tensors (single process, DDP).

    Sharded parameters must all be DTensors sharded (Shard placements only) over one one-dimensional mesh, as
    FSDP2 makes them: the sum of the local penalties over that mesh is then the global penalty."""
    sharded = [is_sharded(p) for p in params]
    if not any(sharded):
        return None
    if not all(sharded):
        plain = names[sharded.index(False)]
        raise ValueError(f"parameter {plain!r} is a plain tensor among DTensors: shard all of them or none")
    mesh = params[0].device_mesh
    for name, p in zip(names, params):
        if p.device_mesh != mesh:
            raise ValueError(f"parameter {name!r} lives on another device mesh than {names[0]!r}")
        if mesh.ndim != 1 or not all(isinstance(placement, Shard) for placement in p.placements):
            raise ValueError(
                f"parameter {name!r} has placements {p.placements} on a {mesh.ndim}-D mesh; "
                "only sharding over a 1-D mesh (FSDP2's fully_shard) is supported"
            )
    return mesh.get_group()


def like(local_tensor, param):
    """`local_tensor` (a shard of a tensor shaped like `param`) as a DTensor sharded like `param`, if it is one."""
    if not is_sharded(param):
        return local_tensor
    return DTensor.from_local(
        local_tensor, param.device_mesh, param.placements, shape=param.shape, stride=param.stride(), run_check=False
    )


def shard_like(full, param):
    """A full (unsharded) tensor sharded like `param` (rank 0's copy is the one distributed), if it is a DTensor."""
    if not is_sharded(param):
        return full
    if is_sharded(full):
        return full.redistribute(param.device_mesh, param.placements)
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements)


def copy_like(value, template, dtype):
    """A copy of `value` (a full tensor or a DTensor) on `template`'s device, in `dtype`, sharded like `template`."""
    shard = local(shard_like(value, template))
    return like(shard.to(local(template).device, dtype, copy=True), template)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of a value whose every rank holds one addend; the backward passes the gradient through.

    When every rank backpropagates the global sum, each rank's addend receives gradient 1 from its own rank
    (not world_size: the other ranks' backward passes reach their own addends only), as in a single process."""

    @staticmethod
    def forward(ctx, value, group):
        total = value.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(value, group):
    """Differentiable all-reduce (sum) over `group`; `value` itself when group is None."""
    return value if group is None else _SumOverRanks.apply(value, group)


def all_reduce_max(value, group):
    """Element-wise max over the ranks of `group` (in place); `value` itself when group is None."""
    if group is not None:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


def merge_moments(moments, group):
    """Per-tensor (count, mean, M2) of sharded tensors from each rank's (T, 3) moments of its shards, in fp64.

    One all_gather for all T tensors; the ranks' rows are merged in rank order with Chan et al.'s pairwise update
    (no sum-of-squares cancellation), so every rank gets the same, deterministic result."""
    if group is None:
        return moments
    gathered = [torch.empty_like(moments) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, moments.contiguous(), group=group)
    n, mean, m2 = gathered[0].unbind(-1)
    for other in gathered[1:]:
        n_b, mean_b, m2_b = other.unbind(-1)
        total = n + n_b
        delta = mean_b - mean
        share = torch.where(total > 0, n_b / total.clamp(min=1), 0.0)  # an empty shard changes nothing
        mean, m2 = mean + delta * share, m2 + m2_b + delta.square() * n * share
        n = total
    return torch.stack([n, mean, m2], -1)
