"""Run a function on several real processes joined by a gloo process group (CPU), and collect what they return.

Each rank runs ``fn(rank, world_size, *args)`` under ``init_process_group("gloo", timeout=60 s)`` and
``destroy_process_group()`` in a ``finally``; its return value comes back through a file. If a rank raises, the
others are terminated and the exception is re-raised here (torch.multiprocessing's ``ProcessRaisedException``);
if the ranks are not done within ``timeout`` seconds they are killed and ``TimeoutError`` is raised, so a hung
collective cannot hang the test suite.

``torchrun`` launches a script under ``torchrun`` instead (when it needs torchrun's environment, e.g. a Trainer's own
DDP), each rank's output in its own log file, so that a failure shows every rank's traceback in full.
"""

import os
import socket
import subprocess
import sys
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


def torchrun(script, *args, log_dir, nproc=2, timeout=400):
    """Run ``script args`` under ``torchrun --nproc_per_node nproc`` with this checkout first on PYTHONPATH.

    Each rank's stdout and stderr go to their own files under `log_dir` (``--redirects 3``). If the launch fails,
    AssertionError carries the end of every rank's stderr -- its traceback -- and torchrun's summary: the rank that
    failed first is then not hidden behind the peer that only saw it go (gloo's "Connection closed by peer")."""
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), f"--master_port={free_port()}",
        "--log-dir", str(log_dir), "--redirects", "3", str(script), *map(str, args),
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if run.returncode != 0:
        logs = sorted(Path(log_dir).glob("*/attempt_*/*/stderr.log"), key=lambda path: path.parent.name)
        ranks = [f"--- local rank {log.parent.name}, {log}:\n{log.read_text()[-5000:]}" for log in logs]
        summary = run.stderr[-3000:]
        raise AssertionError("\n".join([f"torchrun exited with {run.returncode}", *ranks, "--- torchrun:", summary]))
