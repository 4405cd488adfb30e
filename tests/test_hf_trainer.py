"""fastforget.transformers: ProtectedHFTrainer against a hand-written loop over the same batches the Trainer saw,
end_task, logs, checkpoint resume, and bad input. A tiny LLaMA built from a config; CPU."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import free_port

import fastforget as ff

transformers = pytest.importorskip("transformers")
from fastforget.transformers import ProtectedHFTrainer  # noqa: E402

VOCAB, LENGTH = 53, 12
LR, ACCUMULATION, BATCH = 1e-3, 2, 2


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def dataset(n, seed, lengths=None):
    """Examples as a tokenizer would give them: dicts of lists of token ids (equal lengths unless `lengths`)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [LENGTH] * n
    return [{"input_ids": torch.randint(1, VOCAB, (t,), generator=g).tolist()} for t in lengths]


def collate(examples):
    """Right-pads with token 0; labels are the ids, -100 on the padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.as_tensor(e["input_ids"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def arguments(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
        max_grad_norm=1.0, learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", max_steps=3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return transformers.TrainingArguments(**(settings | overrides))


def defences(model, which, old_task):
    """The defences in `which`, set up as after an earlier task (EWC consolidated on it, buffer holding it)."""
    ewc = replay = protector = None
    if "ewc" in which:
        ewc = ff.EWC(model, lam=50.0)
        ewc.consolidate([collate(old_task[i : i + 2]) for i in range(0, 6, 2)], batch_loss=hf_loss, progress=False)
        with torch.no_grad():  # move away from the anchor, so that the penalty pulls
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
    if "replay" in which:
        replay = ff.ReplayBuffer(16, generator=torch.Generator().manual_seed(3))
        replay.add({"input_ids": [torch.as_tensor(e["input_ids"]) for e in old_task]})
    if "protect" in which:
        protector = ff.GradientProtector(model, mode="element")
    return ewc, replay, protector


def hf_loss(model, batch):
    return model(**batch).loss


def record_batches(trainer):
    """The micro-batches the Trainer trained on and the replayed examples it drew, in order."""
    seen, replayed = [], []
    compute_loss, sample = trainer.compute_loss, trainer.replay.sample if trainer.replay else None

    def recording_compute_loss(model, inputs, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return compute_loss(model, inputs, **kwargs)

    def recording_sample(k, **kwargs):
        out = sample(k, **kwargs)
        replayed.append(out)
        return out

    trainer.compute_loss = recording_compute_loss
    if sample is not None:
        trainer.replay.sample = recording_sample
    return seen, replayed


def hand_loop(model, seen, replayed, ewc, protector, replay_weight):
    """What the Trainer must have done: per step, per micro-batch (loss + w * replay loss) / ACCUMULATION backward,
    then EWC, protection, clipping to 1.0 and AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    model.train()
    for step in range(len(seen) // ACCUMULATION):
        opt.zero_grad()
        for micro in range(ACCUMULATION):
            i = step * ACCUMULATION + micro
            loss = hf_loss(model, seen[i])
            if replayed:
                examples = [{"input_ids": ids.tolist()} for ids in replayed[i]["input_ids"]]
                loss = loss + replay_weight * hf_loss(model, collate(examples))
            (loss / ACCUMULATION).backward()
        if ewc is not None:
            ewc.apply_()
        if protector is not None:
            protector.protect_()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model


@pytest.mark.parametrize("which", [("ewc",), ("replay",), ("protect",), ("ewc", "replay", "protect")])
def test_each_defence_and_all_together_equal_the_hand_loop(tmp_path, which):
    old_task, new_task = dataset(6, seed=1), dataset(12, seed=2)
    model = llama()
    ewc, replay, protector = defences(model, which, old_task)
    start = copy.deepcopy((model, ewc, protector))  # one memo: the copies' EWC and protector hold the copied model
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path), train_dataset=new_task, data_collator=collate,
        ewc=ewc, replay=replay, protector=protector, replay_weight=0.5,
    )  # fmt: skip
    seen, replayed = record_batches(trainer)
    trainer.train()
    assert len(seen) == 3 * ACCUMULATION and len(replayed) == (len(seen) if replay else 0)
    model0, ewc0, protector0 = start
    expected = hand_loop(model0, seen, replayed, ewc0, protector0, replay_weight=0.5)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    logged = trainer.state.log_history[0]
    assert ("ewc_penalty" in logged) == ("ewc" in which) and ("replay_loss" in logged) == ("replay" in which)


def test_end_task_consolidates_over_the_dataset_and_fills_the_buffer(tmp_path):
    model, data = llama(), dataset(7, seed=4, lengths=[5, 9, 12, 7, 12, 3, 8])
    ewc, replay = ff.EWC(model, lam=1.0), ff.ReplayBuffer(32)
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path, per_device_eval_batch_size=3), train_dataset=data,
        data_collator=collate, ewc=ewc, replay=replay,
    )  # fmt: skip
    times = trainer.end_task()["time_ms"]
    assert set(times) == {"consolidate", "fill"} and len(replay) == 7 and ewc.tasks == 1
    want = ff.estimate_fisher(model, [collate(data[i : i + 3]) for i in range(0, 7, 3)], batch_loss=hf_loss)
    for got, w in zip(ewc.state_dict()["fisher"], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-9)
    stored = replay.sample(7)["input_ids"]
    assert sorted(len(s) for s in stored) == [3, 5, 7, 8, 9, 12, 12]  # variable lengths kept


def test_resume_from_checkpoint_continues_bitwise(tmp_path):
    old_task, new_task = dataset(6, seed=1), dataset(16, seed=2)

    def run(folder, steps, resume=None):
        model = llama()
        ewc, replay, protector = defences(model, ("ewc", "replay", "protect"), old_task)
        trainer = ProtectedHFTrainer(
            model=model, args=arguments(folder, max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=new_task, data_collator=collate, ewc=ewc, replay=replay, protector=protector,
        )  # fmt: skip
        if steps < 4:
            trainer.args.max_steps = steps
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    full, _ = run(tmp_path / "full", 4)
    run(tmp_path / "cut", 2)
    resumed, trainer = run(tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert (tmp_path / "cut" / "checkpoint-2" / "fastforget_state.pt").exists()
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_bad_input(tmp_path):
    model, data = llama(), dataset(4, seed=5)
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate, ewc=ff.EWC(model)
    )
    with pytest.raises(ValueError, match="non-empty dataset"):
        trainer.end_task([])
    assert trainer.ewc.tasks == 0
    pairs = ff.ReplayBuffer(4)
    pairs.add((torch.randn(4, 3), torch.zeros(4, dtype=torch.long)))
    trainer = ProtectedHFTrainer(model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate,
                                 replay=pairs)  # fmt: skip
    with pytest.raises(TypeError, match="holds tuple batches"):
        trainer.train()
    with pytest.raises(ValueError, match="replay_weight"):
        ProtectedHFTrainer(model=model, args=arguments(tmp_path), replay_weight=-1.0)


def test_the_mixin_in_trl_sft_trainer_equals_the_penalty_in_its_loss(tmp_path):
    """ProtectionMixin in front of TRL's SFTTrainer: the EWC gradient it adds equals lam * penalty in the loss."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    from fastforget.transformers import ProtectionMixin

    vocab = {f"t{i}": i for i in range(50)} | {"<pad>": 50, "<unk>": 51, "<eos>": 52}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(0, 50, (10,), generator=g)) for _ in range(8)]
    data = datasets.Dataset.from_list([{"text": t} for t in texts])

    def run(trainer_class, extra):
        model = llama()
        ewc = ff.EWC(model, lam=5.0)
        ewc.load_importance(
            [p.detach() + 0.05 for p in model.parameters()], [torch.ones_like(p) for p in model.parameters()]
        )
        args = trl.SFTConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[], use_cpu=True,
            save_strategy="no", disable_tqdm=True, max_length=32, learning_rate=1e-3,
        )  # fmt: skip
        trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tokenizer, **extra(ewc))
        trainer.train()
        return model

    class Protected(ProtectionMixin, trl.SFTTrainer):
        pass

    class PenaltyInLoss(trl.SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss + self.penalty.penalty()

    def with_penalty(trainer_class):
        class Bound(trainer_class):
            def __init__(self, ewc, **kwargs):
                super().__init__(**kwargs)
                self.penalty = ewc

        return Bound

    protected = run(Protected, extra=lambda ewc: {"ewc": ewc})
    expected = run(with_penalty(PenaltyInLoss), extra=lambda ewc: {"ewc": ewc})
    for a, b in zip(protected.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_under_the_trainers_ddp_equals_one_process(tmp_path):
    """torchrun, 2 gloo processes with batch 1 each, against one process with batch 2: the same parameters."""
    script = Path(__file__).with_name("hf_trainer_ddp.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], check=True, env=env, timeout=240)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
    subprocess.run([*torchrun, str(script), str(tmp_path / "two.pt")], check=True, env=env, timeout=240)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_with_protected_adamw_the_trainer_skips_its_own_passes(tmp_path):
    """ProtectedAdamW as the Trainer's optimizer applies EWC and protection itself: the run equals a hand loop of
    backward, clipping and ProtectedAdamW.step (a second application by the mixin would change it)."""
    old_task, new_task = dataset(6, seed=1), dataset(12, seed=2)
    model = llama()
    ewc, _, protector = defences(model, ("ewc", "protect"), old_task)
    start = copy.deepcopy((model, ewc, protector))
    optimizer = ff.optim.ProtectedAdamW(model.parameters(), lr=LR, weight_decay=0.0, ewc=ewc, protector=protector)
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path), train_dataset=new_task, data_collator=collate, ewc=ewc,
        protector=protector, optimizers=(optimizer, None),
    )  # fmt: skip
    seen, _ = record_batches(trainer)
    trainer.train()
    model0, ewc0, protector0 = start
    hand = ff.optim.ProtectedAdamW(model0.parameters(), lr=LR, weight_decay=0.0, ewc=ewc0, protector=protector0)
    model0.train()
    for step in range(3):
        hand.zero_grad()
        for micro in range(ACCUMULATION):
            (hf_loss(model0, seen[step * ACCUMULATION + micro]) / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model0.parameters(), 1.0)
        hand.step()
    for a, b in zip(model.parameters(), model0.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="applies its own ewc"):
        other = ProtectedHFTrainer(
            model=model, args=arguments(tmp_path), train_dataset=new_task, data_collator=collate,
            ewc=ff.EWC(model), optimizers=(optimizer, None),
        )  # fmt: skip
        other.train()


class _Scaler:
    """What the mixin reads of accelerate's GradScaler under fp16 on a GPU: its scale."""

    def __init__(self, scale):
        self.scale = scale

    def get_scale(self):
        return self.scale

    def is_enabled(self):
        return True


def test_under_a_grad_scaler_ewc_and_protection_act_on_true_gradients(tmp_path):
    """fp16 on a GPU: the gradients are S x g when the protections run; the result must be S x (what they do to g),
    the protector's state that of g, and the logged penalty the true one."""
    model = llama()
    ewc, _, _ = defences(model, ("ewc",), dataset(6, seed=1))
    trainers = []
    for scale in (1.0, 1024.0):
        trainer = ProtectedHFTrainer(
            model=model, args=arguments(tmp_path), data_collator=collate, ewc=ewc,
            protector=ff.GradientProtector(model, mode="element"),
        )  # fmt: skip
        model.zero_grad()
        (hf_loss(model, collate(dataset(4, seed=3))) * scale).backward()
        trainer.accelerator.scaler = _Scaler(scale) if scale != 1.0 else None
        trainer._protect_gradients()
        trainers.append((trainer, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (scaled, scaled_grads) = trainers
    for a, b in zip(plain_grads, scaled_grads):
        torch.testing.assert_close(b / 1024.0, a, rtol=1e-5, atol=1e-8)
    for a, b in zip(plain.protector.state_dict()["mean"], scaled.protector.state_dict()["mean"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    penalties = [float(t._protection_logs["ewc_penalty"][0]) for t, _ in trainers]
    assert penalties[1] == pytest.approx(penalties[0], rel=1e-6)


@pytest.mark.parametrize(("base", "kl_backend"), [("lora_disabled", "auto"), ("base_model", "auto"),
                                                  ("base_model", "reference")])  # fmt: skip
def test_kl_to_base_equals_the_anchored_loss_in_a_hand_loop(tmp_path, base, kl_backend):
    """kl_to_base: CE + lam KL(p_base || p_theta) by the fused anchored loss; the base from the same LoRA model
    under lora_disabled, or from a frozen copy. Against a hand loop on the unfused reference formula."""
    new_task = dataset(8, seed=2)
    model = llama()
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    if base == "lora_disabled":
        ff.apply_lora(model, "all-linear", r=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)  # a trained adapter: the KL is not 0
    start = copy.deepcopy(model)
    extra = {"base_model": frozen} if base == "base_model" else {}
    # SGD: the fused and the unfused loss differ by rounding, which AdamW would blow up where gradients are ~0
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path, max_steps=2, optim="sgd", learning_rate=0.1), train_dataset=new_task,
        data_collator=collate, kl_to_base=0.5, kl_backend=kl_backend, **extra,
    )  # fmt: skip
    seen, _ = record_batches(trainer)
    trainer.train()
    assert "kl_loss" in trainer.state.log_history[0]

    def hidden(m, batch):
        return m(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states[-1]

    params = [p for p in start.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    start.train()
    for step in range(2):
        opt.zero_grad()
        for micro in range(ACCUMULATION):
            batch = seen[step * ACCUMULATION + micro]
            with torch.no_grad():
                if base == "base_model":
                    ref = hidden(frozen, batch)
                else:
                    with ff.lora_disabled(start):
                        ref = hidden(start, batch)
            head = start.get_output_embeddings()
            ref_weight = frozen.get_output_embeddings().weight if base == "base_model" else None
            loss = ff.anchored_lm_loss_ref(hidden(start, batch), head.weight, batch["labels"], ref_hidden=ref,
                                           ref_weight=ref_weight, kl_weight=0.5, shift=True)  # fmt: skip
            (loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for (name, a), b in zip(model.named_parameters(), start.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)


def test_kl_to_base_bad_input(tmp_path):
    model = llama()
    with pytest.raises(ValueError, match="kl_to_base needs the base model's distribution"):
        ProtectedHFTrainer(model=model, args=arguments(tmp_path), data_collator=collate, kl_to_base=0.5)
    with pytest.raises(ValueError, match="kl_to_base must be a finite number >= 0"):
        ProtectedHFTrainer(model=model, args=arguments(tmp_path), kl_to_base=-1.0, base_model=model)
    with pytest.raises(ValueError, match="kl_backend must be one of 'auto'"):
        ProtectedHFTrainer(model=model, args=arguments(tmp_path), kl_to_base=1.0, base_model=model, kl_backend="gpu")
