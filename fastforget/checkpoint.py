"""fastforget's state in a checkpoint folder, written so that a kill at any moment leaves a usable checkpoint.

Files, beside the model's weights (``Trainer.save_model``) or inside a Trainer checkpoint folder:

* ``fastforget_state.pt``: the state shared by all ranks (EWC, gradient protector; and the replay buffer in a
  single process), ``torch.save``d by one process. Under FSDP2 that state holds DTensors sharded like the
  parameters; it is then the folder ``fastforget_state/``, a ``torch.distributed.checkpoint`` (DCP) written by
  every rank, each its own shards (no rank gathers the full tensors).
* ``fastforget_state_rank<r>.pt``: with several processes, rank r's own replay buffer (the buffers are per rank).

Each file is written to ``<name>.tmp``, flushed and ``fsync``'ed, then renamed over its final name (``os.replace``,
atomic on POSIX) and its folder ``fsync``'ed so that the rename itself is durable: a final name always holds a
complete state, and a kill leaves at most a stray ``.tmp``. A DCP folder is written to ``fastforget_state.tmp/``
(DCP writes its ``.metadata`` last) and renamed by rank 0 once every rank has finished.

With several processes ``save_state`` ends with a barrier: when it returns on any rank, every rank's files are in
place under their final names, and any rank may load them at once.

A Trainer checkpoint is *complete* when its ``trainer_state.json`` (the Trainer writes it last, before it deletes
older checkpoints) parses and every fastforget file the run needs is there: ``last_complete_checkpoint`` picks the
newest such folder. ``load_state`` turns a missing or torn file into a ``ValueError`` naming the checkpoint.
"""

import json
import os
import pickle
import re
import shutil
import zipfile

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

STATE_FILE = "fastforget_state.pt"
SHARDED_STATE_DIR = "fastforget_state"
TRAINER_STATE_FILE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
PER_RANK = ("replay",)  # the parts each rank keeps for itself
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def rank_file(rank):
    return f"fastforget_state_rank{rank}.pt"


def _holds_dtensors(state):
    if isinstance(state, DTensor):
        return True
    if isinstance(state, dict):
        return any(_holds_dtensors(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return any(_holds_dtensors(v) for v in state)
    return False


def _copy(state):
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _copy(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy(value) for value in state)
    return state


def _fsync_folder(folder):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_atomically(state, path):
    """torch.save to path + '.tmp', fsync, rename over `path`, fsync the folder."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _fsync_folder(os.path.dirname(path) or ".")


def _save_sharded(state, folder, rank):
    """DCP save by every rank into <folder>/fastforget_state.tmp/, renamed by rank 0 after all finished."""
    import torch.distributed.checkpoint as dcp

    final = os.path.join(folder, SHARDED_STATE_DIR)
    temporary, previous = final + ".tmp", final + ".old"
    if rank == 0:
        shutil.rmtree(temporary, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=temporary)
    dist.barrier()
    if rank == 0:
        if os.path.exists(final):  # a directory cannot be renamed over another: move the old one aside first
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(temporary, final)
        _fsync_folder(folder)
        shutil.rmtree(previous, ignore_errors=True)
    # the other ranks wait in save_state's closing barrier until the rename is done


def save_state(state, folder, *, rank=0, world_size=1, writer=True):
    """Write `state` (a dict of parts: 'ewc', 'protector', 'replay', ...) into `folder`, every rank calling.

    `writer`: whether this rank writes the shared file (the Trainer's ``args.should_save``). With world_size > 1 each
    rank writes its PER_RANK parts to its own file; a shared state that holds DTensors (FSDP2) goes through DCP on
    every rank. With world_size > 1 every rank must call (collectives): it returns once all ranks' files are
    written, so that any rank may load them right away."""
    os.makedirs(folder, exist_ok=True)
    own = {name: state[name] for name in PER_RANK if name in state and world_size > 1}
    shared = {name: part for name, part in state.items() if name not in own}
    if _holds_dtensors(shared):
        _save_sharded(shared, folder, rank)
    elif writer:
        _write_atomically(shared, os.path.join(folder, STATE_FILE))
    if own:
        _write_atomically(own, os.path.join(folder, rank_file(rank)))
    if world_size > 1:
        dist.barrier()


def _torn(path):
    """Whether a torch.save file is cut short: its zip central directory (written last) is missing."""
    return not zipfile.is_zipfile(path)


def _load_file(path, checkpoint):
    if not os.path.exists(path):
        raise ValueError(
            f"checkpoint {checkpoint} has no {os.path.basename(path)}: it was not saved by a fastforget trainer "
            "(ProtectionMixin), or its save was interrupted; resume from an earlier checkpoint"
        )
    if _torn(path):
        raise ValueError(f"checkpoint {checkpoint}: {os.path.basename(path)} is torn (cut short while written)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ValueError(f"checkpoint {checkpoint}: {os.path.basename(path)} is corrupt ({error})") from error


def load_state(folder, template, *, rank=0, world_size=1):
    """The state saved by save_state in `folder`, with the parts of `template` (this run's state_dict: DCP loads
    sharded tensors into its DTensors, resharding them). Raises ValueError naming `folder` if a file is missing or
    torn. The parts come back as saved; validating them is the caller's load_state_dict."""
    sharded = os.path.join(folder, SHARDED_STATE_DIR)
    if os.path.isdir(sharded):
        import torch.distributed.checkpoint as dcp

        if not os.path.exists(os.path.join(sharded, ".metadata")):
            raise ValueError(f"checkpoint {folder}: {SHARDED_STATE_DIR}/ is incomplete (no DCP .metadata)")
        # copies: DCP loads in place, and the live state must stay as it is until the caller validated the load
        shared = _copy({name: part for name, part in template.items() if name not in PER_RANK})
        dcp.load(shared, checkpoint_id=sharded)
    else:
        shared = _load_file(os.path.join(folder, STATE_FILE), folder)
    missing = [name for name in PER_RANK if name in template and name not in shared]
    if missing:  # saved by several processes: this rank's own file (rank 0's when loaded by one process)
        shared |= _load_file(os.path.join(folder, rank_file(rank if world_size > 1 else 0)), folder)
    return shared


def missing_parts(folder, *, world_size=1, per_rank=False):
    """Why `folder` is not a complete checkpoint (a list of reasons; empty if it is)."""
    reasons = []
    try:
        with open(os.path.join(folder, TRAINER_STATE_FILE)) as file:
            json.load(file)
    except (OSError, ValueError):
        reasons.append(f"{TRAINER_STATE_FILE} missing or unreadable")
    sharded = os.path.join(folder, SHARDED_STATE_DIR)
    if os.path.isdir(sharded):
        if not os.path.exists(os.path.join(sharded, ".metadata")):
            reasons.append(f"{SHARDED_STATE_DIR}/ incomplete")
    else:
        path = os.path.join(folder, STATE_FILE)
        if not os.path.exists(path) or _torn(path):
            reasons.append(f"{STATE_FILE} missing or torn")
    if per_rank and world_size > 1:
        for rank in range(world_size):
            path = os.path.join(folder, rank_file(rank))
            if not os.path.exists(path) or _torn(path):
                reasons.append(f"{rank_file(rank)} missing or torn")
    return reasons


def checkpoints(output_dir):
    """The Trainer's checkpoint-<step> folders in `output_dir`, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(steps, reverse=True)]


def last_complete_checkpoint(output_dir, *, world_size=1, per_rank=False):
    """(the newest complete checkpoint folder or None, [(skipped newer folder, its reasons), ...])."""
    skipped = []
    for folder in checkpoints(output_dir):
        reasons = missing_parts(folder, world_size=world_size, per_rank=per_rank)
        if not reasons:
            return folder, skipped
        skipped.append((folder, reasons))
    return None, skipped
