"""A Trainer run with ForgettingCallback (3 steps of a tiny LLaMA, interval 1) for tests/test_callbacks.py: as one
process with batch 2, or under `torchrun --nproc_per_node 2` (the Trainer's own DDP, gloo) with batch 1 per rank.

    python tests/forgetting_ddp.py OUT             (one process)
    torchrun --nproc_per_node 2 tests/forgetting_ddp.py OUT
Each rank saves [(step, {key: value} of the forgetting/ keys)] from its log history to OUT.rank<r>.pt.
"""

import os
import sys
import tempfile

import torch

from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # before transformers: the repository's kernels/ must not shadow it

import transformers  # noqa: E402

from fastforget.callbacks import ForgettingCallback  # noqa: E402


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(per_device_batch, folder):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=53, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, 53, (12,), generator=g).tolist()} for _ in range(16)]
    # odd lengths and an odd number of batches (3 of 2): rank 0 measures batches 0 and 2, rank 1 batch 1
    old = [{"input_ids": torch.randint(1, 53, (n,), generator=g).tolist()} for n in (9, 14, 5, 11, 7)]
    prose = [collate(old[:2]), collate(old[2:])]  # ready batches: one per rank
    args = transformers.TrainingArguments(
        output_dir=folder, per_device_train_batch_size=per_device_batch, per_device_eval_batch_size=2, max_steps=3,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, data_collator=collate)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old, "prose": prose}, interval=1))
    trainer.train()
    return [
        (e["step"], {k: v for k, v in e.items() if k.startswith("forgetting/")})
        for e in trainer.state.log_history
        if any(k.startswith("forgetting/") for k in e)
    ]


if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as folder:
        logged = train(2 // world, folder)
    torch.save(logged, f"{sys.argv[1]}.rank{os.environ.get('RANK', '0')}.pt")
