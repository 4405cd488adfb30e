"""A ProtectedHFTrainer run for tests/test_hf_checkpoints.py that saves a checkpoint every 2 steps with
save_total_limit=1: a tiny LLaMA with EWC, an element-wise gradient protector and replay, as after an earlier task.

    python tests/hf_checkpoint_child.py FOLDER POINT THREADS

trains 6 steps in FOLDER on THREADS threads and SIGKILLs itself (by its pid) at POINT of the save of checkpoint-4:
before_state / during_state (half of fastforget_state.pt.tmp written) / after_state (the state renamed into place,
the Trainer's own files not yet written) / before_rotation (checkpoint-4 complete, checkpoint-2 not yet deleted) /
after_rotation (checkpoint-2 deleted; a kill between checkpoints).
"""

import io
import os
import signal
import sys

import torch

import fastforget as ff
from fastforget import checkpoint
from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # before transformers: the checkout's kernels/ would shadow HF's package
import transformers  # noqa: E402

from fastforget.transformers import ProtectedHFTrainer  # noqa: E402

STEPS, SAVE_STEPS, KILL_STEP = 6, 2, 4
POINTS = ("before_state", "during_state", "after_state", "before_rotation", "after_rotation")
VOCAB, LENGTH = 53, 12


def collate(examples):
    ids = torch.stack([torch.as_tensor(e["input_ids"]) for e in examples])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def examples(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (LENGTH,), generator=g).tolist()} for _ in range(n)]


def build(folder):
    """The trainer, with its defences set up as after an earlier task (the same in every process)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    old_task = examples(6, seed=1)
    ewc = ff.EWC(model, lam=50.0)  # anchored away from the parameters, so that the penalty pulls
    ewc.load_importance([p.detach() + 0.01 * torch.randn_like(p) for p in model.parameters()],
                        [torch.rand_like(p) for p in model.parameters()])  # fmt: skip
    replay = ff.ReplayBuffer(16, generator=torch.Generator().manual_seed(3))
    replay.add({"input_ids": [torch.as_tensor(e["input_ids"]) for e in old_task]})
    args = transformers.TrainingArguments(
        output_dir=str(folder), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_grad_norm=1.0,
        learning_rate=1e-3, lr_scheduler_type="constant", optim="adamw_torch", max_steps=STEPS, logging_steps=1,
        save_strategy="steps", save_steps=SAVE_STEPS, save_total_limit=1, report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True,
    )  # fmt: skip
    return ProtectedHFTrainer(
        model=model, args=args, train_dataset=examples(24, seed=2), data_collator=collate, ewc=ewc, replay=replay,
        protector=ff.GradientProtector(model, mode="element"), replay_weight=0.5,
    )  # fmt: skip


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point, folder):
    """Make this process SIGKILL itself at `point` of the save of checkpoint-KILL_STEP."""
    target = os.path.join(str(folder), f"checkpoint-{KILL_STEP}")
    if point in ("before_state", "after_state"):
        write = checkpoint._write_atomically

        def write_then_maybe_die(state, path):
            if os.path.dirname(path) == target and point == "before_state":
                kill()
            write(state, path)
            if os.path.dirname(path) == target:
                kill()

        checkpoint._write_atomically = write_then_maybe_die
    elif point == "during_state":
        save = torch.save

        def torn_save(obj, f, *args, **kwargs):
            if getattr(f, "name", None) == os.path.join(target, checkpoint.STATE_FILE + ".tmp"):
                whole = io.BytesIO()
                save(obj, whole, *args, **kwargs)
                f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
                kill()
            return save(obj, f, *args, **kwargs)

        torch.save = torn_save
    elif point in ("before_rotation", "after_rotation"):
        rotate = transformers.trainer.rotate_checkpoints

        def rotate_and_maybe_die(*args, **kwargs):
            armed = os.path.isdir(target)  # the save of checkpoint-KILL_STEP, not an earlier one
            if armed and point == "before_rotation":
                kill()
            rotate(*args, **kwargs)
            if armed:
                kill()

        transformers.trainer.rotate_checkpoints = rotate_and_maybe_die
    else:
        raise ValueError(f"unknown kill point {point!r}; expected one of {POINTS}")


if __name__ == "__main__":
    folder, point, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)  # the parent's: bitwise comparisons need the same reduction splits
    arm(point, folder)
    build(folder).train()
    sys.exit("the run ended without reaching its kill point")
