"""One Triton launch over a whole tensor list: int64 pointer tables and a block -> (tensor, start) map.

Tensors are grouped by their dtype signature (one role per argument, e.g. param/anchor/fisher/grad dtypes), since
a Triton kernel is specialised on element types; a model normally has one group, so one launch. Within a group:

    tables[r, t]          address of tensor t in role r    (r < roles)
    tables[roles + r, t]  numel of tensor t in role r
    tables[2 * roles, t]  index of tensor t in the caller's list (for per-tensor inputs and outputs)
    blocks[0, b], blocks[1, b]  tensor index and first element of program b (programs cover BLOCK elements each)

All offsets are int64, zero-size tensors get no program, and each program writes one reduction partial, so
partials have a fixed order and sums of them are reproducible.
"""

import contextlib
from dataclasses import dataclass

import torch
import triton.language as tl

from fastforget import dispatch

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
ACCUMULATE_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


def narrows_through_fp32(acc, element_type):
    """fp64 results bound for a 16-bit tensor are narrowed through fp32 (a direct fp64 -> bf16 conversion is
    not available on every GPU, and the interpreter gets it wrong)."""
    return acc == torch.float64 and element_type in (tl.bfloat16, tl.float16)


# Kernels defined under TRITON_INTERPRET=1 run on CPU tensors (tests); compiled ones on CUDA tensors only.
DEVICE_TYPES = ("cuda", "cpu") if dispatch.triton_interpreted() else ("cuda",)


def register(qualified_name, launcher):
    """Registers `launcher` as the kernel of the fastforget::*_triton op `qualified_name`."""
    torch.library.register_kernel(qualified_name, DEVICE_TYPES, launcher)


def on_device(device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class LaunchGroup:
    dtypes: tuple  # Triton element type of each role
    tables: torch.Tensor  # (2 * roles + 1, num_tensors) int64
    blocks: torch.Tensor  # (2, num_blocks) int64
    num_tensors: int
    num_blocks: int
    first_block: int  # offset of this group's programs in the call's partials
    members: list  # index in the caller's list of each tensor of the group
    blocks_per_tensor: list  # programs of each member (0 for an empty tensor)


def launch_groups(roles, block_size):
    """roles: sequences of equal length (one per kernel argument role), e.g. (params, anchors, fisher)."""
    by_signature = {}
    for t, tensors in enumerate(zip(*roles)):
        by_signature.setdefault(tuple(x.dtype for x in tensors), []).append(t)
    groups, first_block = [], 0
    device = roles[0][0].device
    for signature, members in by_signature.items():
        rows = [[role[t].data_ptr() for t in members] for role in roles]
        rows += [[role[t].numel() for t in members] for role in roles]
        rows.append(members)
        tables = torch.tensor(rows, dtype=torch.int64).reshape(2 * len(roles) + 1, -1)
        numels = tables[len(roles)]
        counts = (numels + block_size - 1) // block_size
        tensor_of_block = torch.repeat_interleave(torch.arange(len(members)), counts)
        first_of_tensor = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        start_of_block = (torch.arange(len(tensor_of_block)) - first_of_tensor) * block_size
        blocks = torch.stack([tensor_of_block, start_of_block])
        num_blocks = blocks.shape[1]
        groups.append(
            LaunchGroup(
                dtypes=tuple(TRITON_DTYPES[d] for d in signature),
                tables=tables.to(device, non_blocking=True),
                blocks=blocks.to(device, non_blocking=True),
                num_tensors=len(members),
                num_blocks=num_blocks,
                first_block=first_block,
                members=members,
                blocks_per_tensor=counts.tolist(),
            )
        )
        first_block += num_blocks
    return groups, first_block


def contiguous(tensors):
    return [t.contiguous() for t in tensors]


def copy_back(tensors, work):
    """After an in-place update of work = contiguous(tensors): write back each work[i] that is a copy."""
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)
