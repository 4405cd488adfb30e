"""Run a function on several real processes joined by a gloo process group (CPU), and collect what they return.

Each rank runs ``fn(rank, world_size, *args)`` under ``init_process_group("gloo", timeout=60 s)`` and
``destroy_process_group()`` in a ``finally``; its return value comes back through a file. If a rank raises, the
others are terminated and the exception is re-raised here (torch.multiprocessing's ``ProcessRaisedException``);
if the ranks are not done within ``timeout`` seconds they are killed and ``TimeoutError`` is raised, so a hung
collective cannot hang the test suite.
"""

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, out_dir, args):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn, out_dir, *args, world_size=2, timeout=120):
    """[fn's result on rank 0, on rank 1, ...]; `fn` must be importable (a module-level function)."""
    context = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), str(out_dir), args), nprocs=world_size, join=False
    )
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world_size} ranks did not finish within {timeout} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
