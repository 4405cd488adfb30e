"""ProtectionMixin on the models and datasets LLM practitioners use: PEFT models (peft.get_peft_model) against hand
loops, kl_to_base through PEFT's disable_adapter() against a hand computation of CE + KL, end_task on SFT datasets
(raw text, conversational, prompt-completion, tokenised) prepared by TRL's SFTTrainer, ProtectionArguments as the
trainer's settings, progress, and TRL's SFTTrainer with its CPU defaults, EWC, replay and ForgettingCallback."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_hf_trainer import ACCUMULATION, LR, arguments, collate, dataset, defences, hand_loop, llama, record_batches

import fastforget as ff

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from fastforget.arguments import ProtectionArguments  # noqa: E402
from fastforget.transformers import ProtectedHFTrainer, ProtectionMixin  # noqa: E402


def peft_llama():
    """A tiny LLaMA wrapped by peft.get_peft_model, its adapters nonzero (so that they change the outputs)."""
    model = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------- PEFT models


@pytest.mark.parametrize("which", [("ewc",), ("replay",), ("protect",), ("ewc", "replay", "protect")])
def test_defences_on_a_peft_model_equal_the_hand_loop(tmp_path, which):
    old_task, new_task = dataset(6, seed=1), dataset(12, seed=2)
    model = peft_llama()
    ewc, replay, protector = defences(model, which, old_task)
    for part in (ewc, protector):  # over the adapters only
        assert part is None or [id(p) for p in part.params] == [id(p) for _, p in trainable(model)]
    start = copy.deepcopy((model, ewc, protector))
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path), train_dataset=new_task, data_collator=collate,
        ewc=ewc, replay=replay, protector=protector, replay_weight=0.5,
    )  # fmt: skip
    seen, replayed = record_batches(trainer)
    trainer.train()
    model0, ewc0, protector0 = start
    expected = hand_loop(model0, seen, replayed, ewc0, protector0, replay_weight=0.5)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)
    if ewc is not None:
        assert trainer.state.log_history[0]["ewc_penalty"] > 0


def test_si_on_a_peft_model_in_protected_adamw_equals_the_hand_loop(tmp_path):
    """SI over the adapters, run by ProtectedAdamW as the Trainer's optimizer; end_task hands its importance to the
    EWC: the weights, omega and the EWC's Fisher equal a hand loop's."""
    new_task = dataset(12, seed=2)
    model = peft_llama()

    def build(m):
        ewc = ff.EWC(m, lam=1.0)
        si = ff.SynapticIntelligence(m, ewc=ewc)
        opt = ff.optim.ProtectedAdamW([p for _, p in trainable(m)], lr=LR, weight_decay=0.0, si=si)
        return ewc, si, opt

    model0 = copy.deepcopy(model)
    ewc, si, optimizer = build(model)
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path), train_dataset=new_task, data_collator=collate, si=si,
        optimizers=(optimizer, None),
    )  # fmt: skip
    seen, _ = record_batches(trainer)
    trainer.train()
    trainer.end_task()
    ewc0, si0, hand = build(model0)
    model0.train()
    for step in range(3):
        hand.zero_grad()
        for micro in range(ACCUMULATION):
            (model0(**seen[step * ACCUMULATION + micro]).loss / ACCUMULATION).backward()
        torch.nn.utils.clip_grad_norm_(model0.parameters(), 1.0)
        hand.step()
    si0.consolidate(ewc0)
    for a, b in zip(model.parameters(), model0.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(ewc.state_dict()["fisher"], ewc0.state_dict()["fisher"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert ewc.tasks == 1 and sum(float(f.sum()) for f in ewc.state_dict()["fisher"]) > 0


def test_end_task_on_a_peft_model_consolidates_its_adapters_and_fills_the_buffer(tmp_path):
    model, data = peft_llama(), dataset(7, seed=4, lengths=[5, 9, 12, 7, 12, 3, 8])
    ewc, replay = ff.EWC(model, lam=1.0), ff.ReplayBuffer(32)
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path, per_device_eval_batch_size=3), train_dataset=data,
        data_collator=collate, ewc=ewc, replay=replay,
    )  # fmt: skip
    trainer.end_task()
    assert len(replay) == 7 and ewc.tasks == 1
    # the hand loop: per batch of 3, the per-sequence squared gradients of the adapters, summed, over the samples
    params = [p for _, p in trainable(model)]
    want = [torch.zeros_like(p) for p in params]
    for example in data:
        grads = torch.autograd.grad(model(**collate([example])).loss, params)
        for w, g in zip(want, grads):
            w += g.square() / len(data)
    for got, w in zip(ewc.state_dict()["fisher"], want):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-9)


def hand_anchored_loss(model, batch, kl_to_base):
    """CE + kl_to_base KL(p_base || p_theta) per counted token, averaged, from the full logits in fp64; the base
    distribution from the same PeftModel with its adapters off."""
    labels = batch["labels"][:, 1:]
    forward = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**forward).logits[:, :-1].double()
    with torch.no_grad(), model.disable_adapter():
        base = model(**forward).logits[:, :-1].double()
    counted = labels != -100
    ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    kl = (base.softmax(-1) * (base.log_softmax(-1) - logits.log_softmax(-1))).sum(-1)
    n = counted.sum()
    return (ce * counted).sum() / n, (kl * counted).sum() / n * kl_to_base


def test_kl_to_base_on_a_peft_model_equals_the_hand_computation(tmp_path):
    """kl_to_base on a PeftModel with no base_model: one SGD step of the Trainer equals one of CE + lam KL computed by
    hand (the base through disable_adapter(), the same weights); the logs hold the CE and the KL term apart."""
    data = dataset(4, seed=3)  # equal lengths, one batch of all: the mean does not depend on the order
    model = peft_llama()
    model0 = copy.deepcopy(model)
    args = arguments(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=1,
                     optim="sgd", learning_rate=0.5, max_grad_norm=0.0)  # fmt: skip
    trainer = ProtectedHFTrainer(model=model, args=args, train_dataset=data, data_collator=collate, kl_to_base=0.7)
    assert trainer.base_model is None
    trainer.train()
    model0.train()
    ce, kl = hand_anchored_loss(model0, collate(data), 0.7)
    assert float(kl) > 1e-4  # the adapters move the distribution: the term is not trivially zero
    (ce + kl).backward()
    logged = trainer.state.log_history[0]
    assert logged["task_loss"] == pytest.approx(float(ce), rel=1e-4)
    assert logged["kl_loss"] == pytest.approx(float(kl), rel=1e-3, abs=1e-6)
    with torch.no_grad():
        for (name, got), want in zip(model.named_parameters(), model0.parameters()):
            expected = want - 0.5 * want.grad if want.grad is not None else want
            torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=1e-5, msg=name)
    with pytest.raises(ValueError, match="PEFT model"):
        ProtectedHFTrainer(model=llama(), args=args, train_dataset=data, data_collator=collate, kl_to_base=0.7)


# ------------------------------------------------------------------------------------------ SFT datasets (TRL)


def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(50)} | {"<pad>": 50, "<unk>": 51, "<eos>": 52}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return tokenizer


def texts(n, seed, length=9):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(f"t{int(i)}" for i in torch.randint(0, 50, (length,), generator=g)) for _ in range(n)]


def sft_trainer(tmp_path, model, train, **kwargs):
    trl = pytest.importorskip("trl")

    class SFTProtected(ProtectionMixin, trl.SFTTrainer):
        pass

    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, report_to=[],
                    use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, max_length=32)  # fmt: skip
    config = trl.SFTConfig(**(settings | kwargs.pop("config", {})))
    return SFTProtected(model=model, args=config, train_dataset=train, processing_class=word_tokenizer(), **kwargs)


def test_end_task_prepares_every_sft_format_as_sft_trainer_does(tmp_path):
    """Raw text, conversational, prompt-completion (as a datasets.Dataset or a list) and tokenised examples: the
    Fisher and the buffer come from what SFTTrainer's own preparation gives (the same tokens in each format), the
    buffer holds token tensors only."""
    datasets = pytest.importorskip("datasets")
    words = texts(4, seed=5)
    model = llama()
    tokenizer = word_tokenizer()
    tokenised = [{"input_ids": tokenizer(t + "<eos>")["input_ids"]} for t in words]
    formats = {
        "text": datasets.Dataset.from_list([{"text": t} for t in words]),
        "list": [{"text": t} for t in words],
        "messages": [{"messages": [{"role": "user", "content": t}]} for t in words],
        "tokenised": tokenised,
    }
    fishers = {}
    for name, data in formats.items():
        ewc, replay = ff.EWC(model, lam=1.0), ff.ReplayBuffer(8)
        trainer = sft_trainer(tmp_path, model, formats["text"], ewc=ewc, replay=replay)
        trainer.end_task(data)
        stored = replay.sample(4)
        assert set(stored) <= {"input_ids", "labels", "attention_mask"} and "input_ids" in stored, name
        assert all(s.dtype == torch.long for part in stored.values() for s in part)
        fishers[name] = ewc.state_dict()["fisher"]
        if name != "messages":  # the chat template renders "content " (no EOS): other tokens
            assert sorted(s.tolist() for s in stored["input_ids"]) == sorted(e["input_ids"] for e in tokenised)
    for name in ("list", "tokenised"):
        for a, b in zip(fishers[name], fishers["text"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert sum(float(f.sum()) for f in fishers["messages"]) > 0

    prompt_completion = [{"prompt": t[:8], "completion": t[8:]} for t in words]
    trainer = sft_trainer(tmp_path, model, formats["text"], ewc=ff.EWC(model, lam=1.0), replay=ff.ReplayBuffer(8))
    trainer.end_task(prompt_completion)
    assert trainer.ewc.tasks == 1 and len(trainer.replay) == 4


def test_end_task_rejects_an_unknown_format_before_anything_runs(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = llama()
    train = datasets.Dataset.from_list([{"text": t} for t in texts(2, seed=1)])
    trainer = sft_trainer(tmp_path, model, train, ewc=ff.EWC(model, lam=1.0), replay=ff.ReplayBuffer(8))
    with pytest.raises(ValueError, match=r"columns \['question'\] are none of the formats"):
        trainer.end_task([{"question": "t1 t2"}])
    with pytest.raises(TypeError, match="dataset of dicts"):
        trainer.end_task(["t1 t2"])
    assert trainer.ewc.tasks == 0 and len(trainer.replay) == 0
    # a plain Trainer feeds its model tokenised examples only
    plain = ProtectedHFTrainer(model=model, args=arguments(tmp_path), train_dataset=dataset(4, seed=1),
                               data_collator=collate, ewc=ff.EWC(model, lam=1.0))  # fmt: skip
    with pytest.raises(ValueError, match="hold none of the model's inputs"):
        plain.end_task(datasets.Dataset.from_list([{"text": "t1 t2"}]))
    assert plain.ewc.tasks == 0


def test_plain_trainer_end_task_stores_model_inputs_only(tmp_path):
    """A tokenised dataset with a text column beside: the Fisher is the one without it, the buffer holds no text."""
    datasets = pytest.importorskip("datasets")
    model, data = llama(), dataset(4, seed=6)
    with_text = datasets.Dataset.from_list([e | {"text": "raw"} for e in data])
    replay = ff.ReplayBuffer(8)
    trainer = ProtectedHFTrainer(model=model, args=arguments(tmp_path), train_dataset=data, data_collator=collate,
                                 replay=replay)  # fmt: skip
    trainer.end_task(with_text)
    assert set(replay.sample(4)) == {"input_ids"}
    trainer.train()  # the stored examples replay through the collator


# -------------------------------------------------------------------------- progress, ProtectionArguments


def test_consolidation_shows_progress_unless_disable_tqdm(tmp_path, capsys):
    model, data = llama(), dataset(4, seed=1)
    for disable in (False, True):
        trainer = ProtectedHFTrainer(
            model=model, args=arguments(tmp_path, disable_tqdm=disable), train_dataset=data, data_collator=collate,
            ewc=ff.EWC(model, lam=1.0), replay=ff.ReplayBuffer(8),
        )  # fmt: skip
        trainer.end_task()
        err = capsys.readouterr().err
        assert ("end_task: Fisher" in err and "end_task: replay buffer" in err) == (not disable)


def test_protection_args_build_the_defences(tmp_path):
    """protection_args= builds what the keywords would, over the model the Trainer trains; the same run."""
    old_task, new_task = dataset(6, seed=1), dataset(12, seed=2)
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, ProtectionArguments))
    training, protection = parser.parse_args_into_dataclasses(
        [f"--output_dir={tmp_path}", "--ewc_lambda=50", "--replay_capacity=16", "--replay_seed=3", "--protect=element",
         "--replay_weight=0.5", "--ewc_max_batches=2"]
    )  # fmt: skip
    assert protection.ewc_lambda == 50.0
    runs = []
    for how in ("args", "keywords"):
        model = llama()
        if how == "args":
            trainer = ProtectedHFTrainer(model=model, args=arguments(tmp_path), train_dataset=old_task,
                                         data_collator=collate, protection_args=protection)  # fmt: skip
        else:
            trainer = ProtectedHFTrainer(
                model=model, args=arguments(tmp_path), train_dataset=old_task, data_collator=collate,
                ewc=ff.EWC(model, lam=50.0), replay=ff.ReplayBuffer(16, generator=torch.Generator().manual_seed(3)),
                protector=ff.GradientProtector(model, mode="element"), replay_weight=0.5, ewc_max_batches=2,
            )  # fmt: skip
        assert trainer.ewc.lam == 50.0 and trainer.replay_weight == 0.5 and trainer.ewc_max_batches == 2
        trainer.end_task()
        trainer.train_dataset = new_task
        trainer.train()
        runs.append(model)
    for a, b in zip(*(m.parameters() for m in runs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ewc= was passed beside protection_args="):
        ProtectedHFTrainer(model=llama(), args=arguments(tmp_path), protection_args=protection, ewc=ff.EWC(llama()))
    with pytest.raises(TypeError, match="ProtectionArguments"):
        ProtectedHFTrainer(model=llama(), args=arguments(tmp_path), protection_args={"ewc_lambda": 1.0})


# ------------------------------------------------------------------ TRL's SFTTrainer: the integration the issue asks


def test_sft_trainer_with_its_defaults_ewc_replay_and_forgetting_callback(tmp_path):
    """SFTTrainer with its own defaults where they run on a CPU (gradient checkpointing on, bf16 on if the CPU
    supports it) on raw text: train task A, end_task on A's raw text, train task B. The Fisher is positive and
    consolidated, the buffer holds token dicts, B's steps log the EWC penalty, the replay loss and the forgetting."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from fastforget.callbacks import ForgettingCallback

    defaults = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True)
    assert defaults.gradient_checkpointing and defaults.bf16  # TRL's defaults, kept below
    task_a = datasets.Dataset.from_list([{"text": t} for t in texts(6, seed=1)])
    task_b = datasets.Dataset.from_list([{"text": t} for t in texts(6, seed=2)])
    tokenizer = word_tokenizer()
    old = [dict(tokenizer(t + "<eos>")) for t in texts(3, seed=3)]
    model = llama()
    ewc, replay = ff.EWC(model, lam=100.0), ff.ReplayBuffer(16, generator=torch.Generator().manual_seed(0))
    trainer = sft_trainer(tmp_path, model, task_a, ewc=ewc, replay=replay)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old}, interval=1, plot=False))
    trainer.train()
    assert model.is_activation_checkpointing  # the Trainer turned it on, as SFTConfig asks

    trainer.end_task(task_a.to_list())  # A's raw text, prepared by SFTTrainer's own processing
    fisher = ewc.state_dict()["fisher"]
    assert ewc.tasks == 1 and all(bool((f >= 0).all()) for f in fisher) and sum(float(f.sum()) for f in fisher) > 0
    assert len(replay) == 6
    stored = replay.sample(6)
    assert set(stored) == {"input_ids", "labels"} and all(s.dtype == torch.long for s in stored["input_ids"])

    trainer.train_dataset = trainer.task_dataset(task_b)
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e][-2:]
    assert len(steps) == 2
    for entry in steps:
        assert entry["replay_loss"] > 0 and "task_loss" in entry and "ewc_penalty" in entry
        assert "mean_token_accuracy" in entry  # SFTTrainer's own metrics stay
    assert steps[-1]["ewc_penalty"] > 0  # B's first step starts at the anchor; its second has moved away
    forgetting = [e for e in trainer.state.log_history if "forgetting/old/ce" in e]
    assert forgetting and all("forgetting/old/delta" in e for e in forgetting)
