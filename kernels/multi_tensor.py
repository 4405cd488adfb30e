"""One Triton launch over a whole tensor list: int64 pointer tables and a block -> (tensor, start) map.

Tensors are grouped by their dtype signature (one role per argument, e.g. param/anchor/fisher/grad dtypes), since
a Triton kernel is specialised on element types, and by alignment: a group is `aligned` when every data pointer of
its tensors is a multiple of ALIGNMENT bytes (a view with a storage offset may not be), and only then do its
kernels tell the compiler so, which lets full blocks use 16-byte vector loads. A model normally has one group, so
one launch. Within a group:

    tables[r, t]          address of tensor t in role r    (r < roles)
    tables[roles + r, t]  numel of tensor t in role r
    tables[2 * roles, t]  index of tensor t in the caller's list (for per-tensor inputs and outputs)
    blocks[0, b], blocks[1, b]  tensor index and first element of program b (programs cover BLOCK elements each)
    blocks[2, b]          index of program b's tensor in the caller's list (whose partial it writes)

All offsets are int64, zero-size tensors get no program, and each program writes one reduction partial, so
partials have a fixed order and sums of them are reproducible. The tables of a call are cached (LRU, keyed on
everything they encode), so a training loop that passes the same tensors each step builds and copies them once.
"""

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastforget import dispatch

TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
    torch.uint8: tl.uint8,  # the codes of a block-wise 8-bit state
}
ACCUMULATE_TYPES = {torch.float32: tl.float32, torch.float64: tl.float64}
ALIGNMENT = tl.constexpr(16)  # bytes: one ld.global.v4.b32
CACHE_ENTRIES = 64
CACHE_BYTES = 256 << 20  # device memory the cached tables may hold in all


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


@triton.jit
def program_block(blocks, num_blocks, BLOCK: tl.constexpr):
    """(tensor index in the group, first element) of this program's block. Kernels address the block as
    pointer + start (int64) + tl.arange(0, BLOCK) (int32): fewer registers than int64 offsets per element, and
    start is a multiple of BLOCK, which keeps an aligned pointer aligned."""
    pid = tl.program_id(0)
    return tl.load(blocks + pid), tl.multiple_of(tl.load(blocks + num_blocks + pid), BLOCK)


@triton.jit
def role_pointer(tables, num_tensors, t, role, start, TYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address of element `start` of tensor t in `role`; in an aligned group the compiler knows the data
    pointer to be ALIGNMENT-aligned (and start is a multiple of BLOCK)."""
    ptr = tl.load(tables + role * num_tensors + t).to(tl.pointer_type(TYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, ALIGNMENT)
    return ptr + start


@triton.jit
def block_offsets(count, BLOCK: tl.constexpr, FULL: tl.constexpr):
    """(offsets, mask) of a block of `count` elements; mask None when the block is full, whose loads are then
    unmasked (so vectorisable). A partial block's offsets are clamped to its last element, so its loads need no
    mask either (with masked loads ptxas spills the predicates of a thread's 8 elements): past the end they read
    the last element again. Stores take the mask; a sum must zero those lanes, a max may keep them."""
    offs = tl.arange(0, BLOCK)
    if FULL:
        return offs, None
    else:
        last = count.to(tl.int32) - 1  # count < BLOCK here
        return tl.minimum(offs, last), offs <= last


@dataclass
class LaunchGroup:
    dtypes: tuple  # Triton element type of each role
    aligned: bool  # every data pointer of the group is ALIGNMENT-aligned (and any caller condition holds)
    tables: torch.Tensor  # (2 * roles + 1, num_tensors) int64
    blocks: torch.Tensor  # (3, num_blocks) int64
    num_tensors: int
    num_blocks: int
    first_block: int  # offset of this group's programs in the call's partials
    members: list  # index in the caller's list of each tensor of the group
    blocks_per_tensor: list  # programs of each member (0 for an empty tensor)


class TableCache:
    """Least-recently-used launch tables: at most `entries` calls' and `max_bytes` bytes of device tables."""

    def __init__(self, entries, max_bytes):
        self.entries, self.max_bytes, self.bytes = entries, max_bytes, 0
        self._items = OrderedDict()  # key -> (value, bytes)
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._items)

    def __contains__(self, key):
        return key in self._items

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key, value, nbytes):
        with self._lock:
            if key in self._items:
                self.bytes -= self._items.pop(key)[1]
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            while len(self._items) > self.entries or (self.bytes > self.max_bytes and self._items):
                self.bytes -= self._items.popitem(last=False)[1][1]

    def clear(self):
        with self._lock:
            self._items.clear()
            self.bytes = 0


TABLES = TableCache(CACHE_ENTRIES, CACHE_BYTES)


def launch_groups(roles, block_size, aligned=None):
    """roles: sequences of equal length (one per kernel argument role), e.g. (params, anchors, fisher); aligned:
    optional per-tensor conditions a group's vector path needs besides aligned data pointers. Returns (groups,
    total blocks); the groups' tables are shared with later calls on the same tensors: read them, never write."""
    device = roles[0][0].device
    key = (
        device,
        block_size,
        len(roles),
        None if aligned is None else tuple(aligned),
        tuple((x.data_ptr(), x.numel(), x.dtype) for role in roles for x in role),
    )
    entry = TABLES.get(key)
    if entry is None:
        *entry, nbytes = _build(roles, block_size, aligned, device)
        TABLES.put(key, entry, nbytes)
    return entry[0], entry[1]


def _build(roles, block_size, aligned, device):
    by_group = {}
    for t, tensors in enumerate(zip(*roles)):
        is_aligned = all(x.data_ptr() % ALIGNMENT.value == 0 for x in tensors) and (aligned is None or aligned[t])
        by_group.setdefault((tuple(x.dtype for x in tensors), is_aligned), []).append(t)
    groups, first_block, device_bytes = [], 0, 0
    for (signature, is_aligned), members in by_group.items():
        rows = [[role[t].data_ptr() for t in members] for role in roles]
        rows += [[role[t].numel() for t in members] for role in roles]
        rows.append(members)
        tables = torch.tensor(rows, dtype=torch.int64).reshape(2 * len(roles) + 1, -1)
        numels = tables[len(roles)]
        counts = (numels + block_size - 1) // block_size
        tensor_of_block = torch.repeat_interleave(torch.arange(len(members)), counts)
        first_of_tensor = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        start_of_block = (torch.arange(len(tensor_of_block)) - first_of_tensor) * block_size
        blocks = torch.stack([tensor_of_block, start_of_block, torch.tensor(members)[tensor_of_block]])
        num_blocks = blocks.shape[1]
        groups.append(
            LaunchGroup(
                dtypes=tuple(TRITON_DTYPES[d] for d in signature),
                aligned=is_aligned,
                tables=_to_device(tables, device),
                blocks=_to_device(blocks, device),
                num_tensors=len(members),
                num_blocks=num_blocks,
                first_block=first_block,
                members=members,
                blocks_per_tensor=counts.tolist(),
            )
        )
        first_block += num_blocks
        device_bytes += 8 * (tables.numel() + blocks.numel())
    return groups, first_block, device_bytes


def _to_device(table, device):
    """A host table on `device`: through pinned memory on CUDA, so the copy does not wait for the device."""
    if device.type != "cuda":
        return table
    return table.pin_memory().to(device, non_blocking=True)


def contiguous(tensors):
    return [t.contiguous() for t in tensors]


def copy_back(tensors, work):
    """After an in-place update of work = contiguous(tensors): write back each work[i] that is a copy."""
    for t, w in zip(tensors, work):
        if w is not t:
            t.copy_(w)
