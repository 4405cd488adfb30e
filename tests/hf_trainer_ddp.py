"""A ProtectedHFTrainer run (EWC + element protector, 3 steps of a tiny LLaMA) for tests/test_hf_trainer.py: as one
process with batch 2, or under `torchrun --nproc_per_node 2` (the Trainer's own DDP, gloo) with batch 1 per rank.

    python tests/hf_trainer_ddp.py OUT.pt            (one process)
    torchrun --nproc_per_node 2 tests/hf_trainer_ddp.py OUT.pt
Saves the trained parameters (rank 0's under DDP) to OUT.pt.
"""

import os
import sys
import tempfile

import torch
import transformers

import fastforget as ff
from fastforget.transformers import ProtectedHFTrainer


def collate(examples):
    ids = torch.tensor([e["input_ids"] for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def train(per_device_batch, folder):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=53, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": torch.randint(1, 53, (12,), generator=g).tolist()} for _ in range(16)]
    ewc = ff.EWC(model, lam=50.0)
    ewc.load_importance(
        [p.detach() + 0.01 for p in model.parameters()], [torch.ones_like(p) for p in model.parameters()]
    )
    args = transformers.TrainingArguments(
        output_dir=folder, per_device_train_batch_size=per_device_batch, max_steps=3, learning_rate=1e-3,
        max_grad_norm=1.0, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = ProtectedHFTrainer(
        model=model, args=args, train_dataset=data, data_collator=collate, ewc=ewc,
        protector=ff.GradientProtector(model, mode="element"),
    )  # fmt: skip
    trainer.train()
    return [p.detach().clone() for p in model.parameters()]


if __name__ == "__main__":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as folder:
        params = train(2 // world, folder)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(params, sys.argv[1])
