"""Two Trainer runs under `torchrun --nproc_per_node 2` (the Trainer's own DDP, gloo, CPU), for
tests/test_hf_checkpoints.py, plus fastforget's DCP checkpoint of an FSDP2-sharded EWC and protector:

1. TRL's SFTTrainer + ProtectionMixin + EWC on raw text: end_task() before training (the model not wrapped yet),
   2 steps, end_task() (the DDP-wrapped model), 2 more steps. Each rank returns both Fishers and its weights.
2. ProtectedHFTrainer with a replay buffer per rank (generators seeded by the rank): end_task, 4 steps with
   checkpoints at 2 and 4, save_model (rank 0's renames lagging); a fresh trainer restoring through load_protection
   right away; rank 1's replay file removed from checkpoint-4, and a fresh trainer's
   train(resume_from_checkpoint=True) redoing steps 3 and 4.
3. A model sharded by fully_shard with EWC + element protector: fastforget.checkpoint.save_state writes it
   through DCP (every rank its shards; rank 0's renames lagging), load_state + load_state_dict restore it into
   fresh objects right away.

    torchrun --nproc_per_node 2 tests/trainers_ddp.py OUT_DIR
Rank r saves what it saw to OUT_DIR/rank<r>.pt; the folders it wrote stay in OUT_DIR.
"""

import contextlib
import os
import sys
import time
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

import fastforget as ff
from fastforget import checkpoint
from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # before transformers: the checkout's kernels/ would shadow HF's package
import transformers  # noqa: E402

from fastforget.transformers import ProtectedHFTrainer, ProtectionMixin  # noqa: E402

VOCAB = 53


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def word_tokenizer():
    import tokenizers

    vocab = {f"t{i}": i for i in range(50)} | {"<pad>": 50, "<unk>": 51, "<eos>": 52}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def text_dataset():
    """8 raw texts of 10 words (equal lengths: no padding, so the Fisher does not depend on the batching)."""
    import datasets

    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(0, 50, (10,), generator=g)) for _ in range(8)]
    return datasets.Dataset.from_list([{"text": t} for t in texts])


def sft_trainer(folder, model):
    import trl

    class SFTProtected(ProtectionMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(
        output_dir=str(folder), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
        learning_rate=1e-3, lr_scheduler_type="constant", report_to=[], use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", disable_tqdm=True, max_length=32, seed=0,
    )  # fmt: skip
    return SFTProtected(
        model=model, args=args, train_dataset=text_dataset(), processing_class=word_tokenizer(),
        ewc=ff.EWC(model, lam=50.0),
    )  # fmt: skip


def fisher_of(ewc):
    return [f.clone() for f in ewc.state_dict()["fisher"]]


def sft_run(folder):
    model = llama()
    trainer = sft_trainer(folder, model)
    trainer.end_task()
    first = fisher_of(trainer.ewc)
    trainer.train()
    trainer.end_task()
    second = fisher_of(trainer.ewc)
    trainer.train()
    return {"fisher_before": first, "fisher_after": second, "weights": [p.detach().clone() for p in model.parameters()]}


@contextlib.contextmanager
def renames_lag_on_rank0(rank, seconds=2.0):
    """Rank 0's os.replace calls lag, as on a loaded machine (where CI once saw rank 1 look for the DCP folder
    before rank 0 had renamed it into place): a save must return on no rank before every file is in place."""
    if rank != 0:
        yield
        return
    replace = os.replace

    def late_replace(source, target):
        time.sleep(seconds)
        replace(source, target)

    with mock.patch.object(os, "replace", late_replace):
        yield


def collate(examples):
    ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def replay_trainer(folder, rank, max_steps=2):
    model = llama()
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, VOCAB, (12,), generator=g).tolist()} for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=1, per_device_eval_batch_size=2, max_steps=max_steps,
        learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, disable_tqdm=True,
        seed=0,
    )  # fmt: skip
    return ProtectedHFTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, ewc=ff.EWC(model, lam=1.0),
        replay=ff.ReplayBuffer(4, generator=torch.Generator().manual_seed(10 + rank)),
    )  # fmt: skip


def replay_run(folder, rank):
    trainer = replay_trainer(folder / "run", rank, max_steps=4)
    trainer.end_task()
    trainer.train()
    with renames_lag_on_rank0(rank):  # then every rank loads at once
        trainer.save_model(str(folder / "model"))
    saved = trainer.protection_state_dict()
    restored = replay_trainer(folder / "other", rank, max_steps=0)
    restored.load_protection(folder / "model")
    dist.barrier()
    if rank == 0:  # as if killed while rank 1 wrote its replay file: checkpoint-4 is incomplete
        os.remove(folder / "run" / "checkpoint-4" / checkpoint.rank_file(1))
    dist.barrier()
    resumed = replay_trainer(folder / "run", rank, max_steps=4)
    resumed.train(resume_from_checkpoint=True)  # from checkpoint-2, steps 3 and 4 again
    return {
        "replay_saved": saved["replay"],
        "replay_loaded": restored.protection_state_dict()["replay"],
        "replay_resumed": resumed.protection_state_dict()["replay"],
        "ewc_saved": saved["ewc"],
        "ewc_loaded": restored.protection_state_dict()["ewc"],
        "weights": [p.detach().clone() for p in trainer.model.parameters()],
        "weights_resumed": [p.detach().clone() for p in resumed.model.parameters()],
    }


def fsdp_run(folder, rank):
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    def sharded_model():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # uneven shards: 3 + 2 rows, 2 + 1
        fully_shard(model)
        return model

    model = sharded_model()
    ewc, protector = ff.EWC(model, lam=0.5), ff.GradientProtector(model, mode="element")
    g = torch.Generator().manual_seed(5)
    ewc.load_importance(
        [torch.randn(p.shape, generator=g) for p in model.parameters()],
        [torch.rand(p.shape, generator=g) for p in model.parameters()],
    )
    for _ in range(2):  # the protector's statistics
        model.zero_grad()
        model(torch.randn(6, 4, generator=g)).square().mean().backward()
        protector.protect_()
    state = {"ewc": ewc.state_dict(), "protector": protector.state_dict()}
    with renames_lag_on_rank0(rank):  # then every rank loads at once
        checkpoint.save_state(state, str(folder / "fsdp"), rank=rank, world_size=2, writer=rank == 0)
    fresh = sharded_model()
    ewc2, protector2 = ff.EWC(fresh, lam=0.5), ff.GradientProtector(fresh, mode="element")
    loaded = checkpoint.load_state(
        str(folder / "fsdp"), {"ewc": ewc2.state_dict(), "protector": protector2.state_dict()}, rank=rank,
        world_size=2,
    )  # fmt: skip
    ewc2.load_state_dict(loaded["ewc"])
    protector2.load_state_dict(loaded["protector"])

    def full(state):
        return {k: [t.full_tensor() for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v
                for k, v in state.items()}  # fmt: skip

    return {
        "ewc": full(ewc.state_dict()), "ewc_loaded": full(ewc2.state_dict()),
        "protector": full(protector.state_dict()), "protector_loaded": full(protector2.state_dict()),
        "penalty": float(ewc.penalty()), "penalty_loaded": float(ewc2.penalty()),
    }  # fmt: skip


@record  # a failing rank's traceback goes to torchrun's summary (error.json), not only to its own stderr
def main(out):
    torch.set_num_threads(1)
    result = {"sft": sft_run(out / "sft")}
    rank = dist.get_rank()
    result["replay"] = replay_run(out / "replay", rank)
    result["fsdp"] = fsdp_run(out, rank)
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    from pathlib import Path

    main(Path(sys.argv[1]))
