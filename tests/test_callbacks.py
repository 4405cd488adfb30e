"""ForgettingCallback: its values against a hand computation of the token-weighted cross-entropy, the steps it logs
at, a run with it bitwise the run without, the plot, the errors, and 2-process DDP against one process."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from distributed_utils import free_port

from fastforget.callbacks import PLOT_FILE, ForgettingCallback

VOCAB = 61


def llama(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, attention_dropout=dropout,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def examples(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (n,), generator=g).tolist()} for n in lengths]


def collate(rows):
    """Right-pads with 0; labels -100 on the padding."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def trainer_for(model, folder, train=None, eval_dataset=None, **overrides):
    settings = dict(
        output_dir=str(folder), per_device_train_batch_size=2, per_device_eval_batch_size=3, max_steps=5,
        learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True, save_strategy="no",
        disable_tqdm=True, logging_steps=2, seed=0,
    )  # fmt: skip
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    train = examples([10, 7, 12, 9, 11, 8, 12, 6, 10, 9], seed=5) if train is None else train
    return transformers.Trainer(
        model=model, args=args, train_dataset=train, eval_dataset=eval_dataset, data_collator=collate
    )


def hand_ce(model, rows):
    """sum over every next token of -log p (fp64 softmax), over the number of those tokens: one sequence at a time,
    unpadded."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor(row["input_ids"])[None]
            logp = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
            total -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return total / count


def entries(trainer, name):
    key = f"forgetting/{name}/ce"
    return [(e["step"], e[key], e[f"forgetting/{name}/delta"]) for e in trainer.state.log_history if key in e]


# ------------------------------------------------------------------------------------------------------ values


@pytest.mark.parametrize("batch_size", [1, 3, 4])
def test_values_equal_the_hand_computed_token_weighted_cross_entropy(tmp_path, batch_size):
    """Examples of odd lengths padded by the Trainer's collator: the CE is sum of token losses / tokens (not a mean
    of per-sequence means), the same as one unpadded sequence at a time, for any batch size."""
    model = llama()
    old, prose = examples([9, 14, 5, 11, 13, 7, 2], seed=1), examples([12, 3, 8], seed=2)
    trainer = trainer_for(model, tmp_path)
    callback = ForgettingCallback(trainer, {"old": old, "prose": prose}, batch_size=batch_size, max_batches=None)
    values = callback.measure()
    assert values["old"] == pytest.approx(hand_ce(model, old), rel=1e-5)
    assert values["prose"] == pytest.approx(hand_ce(model, prose), rel=1e-5)
    per_sequence_means = sum(hand_ce(model, [r]) for r in old) / len(old)
    assert abs(per_sequence_means - values["old"]) > 1e-4  # the weighting matters on these lengths


def test_ready_batches_with_and_without_labels_and_max_batches(tmp_path):
    """Ready batches are used as they are; without labels the attention mask picks the tokens; max_batches bounds
    the batches (the first ones)."""
    model = llama()
    old = examples([9, 14, 5, 11, 13, 7], seed=1)
    with_labels = [collate(old[i : i + 2]) for i in range(0, 6, 2)]
    without = [{k: v for k, v in b.items() if k != "labels"} for b in with_labels]
    trainer = trainer_for(model, tmp_path)
    values = ForgettingCallback(trainer, {"a": with_labels, "b": without}, max_batches=None).measure()
    assert values["a"] == pytest.approx(hand_ce(model, old), rel=1e-5)
    assert values["b"] == pytest.approx(hand_ce(model, old), rel=1e-5)
    first_two = ForgettingCallback(trainer, {"a": with_labels, "e": old}, max_batches=2, batch_size=2).measure()
    assert first_two["a"] == pytest.approx(hand_ce(model, old[:4]), rel=1e-5)
    assert first_two["e"] == pytest.approx(hand_ce(model, old[:4]), rel=1e-5)


def test_a_datasets_dataset_with_a_text_column(tmp_path):
    """A datasets.Dataset of tokenised rows that still has its raw `text` column: the strings are dropped."""
    datasets = pytest.importorskip("datasets")
    model = llama()
    old = examples([9, 14, 5], seed=1)
    table = datasets.Dataset.from_list([{"text": "raw", **row} for row in old])
    values = ForgettingCallback(trainer_for(model, tmp_path), {"old": table}).measure()
    assert values["old"] == pytest.approx(hand_ce(model, old), rel=1e-5)


# ----------------------------------------------------------------------------------------------- in training


def test_logged_at_every_interval_the_last_step_and_before_training(tmp_path):
    """Steps 0 (before training, delta 0), every `interval`, and the last one; the deltas are ce - ce before; the
    default interval is the Trainer's logging_steps (no evaluation by steps)."""
    old = examples([9, 14, 5, 11], seed=1)
    for interval, steps in ((None, [0, 2, 4, 5]), (3, [0, 3, 5])):
        model = llama()
        trainer = trainer_for(model, tmp_path)
        callback = ForgettingCallback(trainer, {"old": old}, interval=interval)
        trainer.add_callback(callback)
        trainer.train()
        logged = entries(trainer, "old")
        assert [step for step, _, _ in logged] == steps
        before = logged[0][1]
        assert logged[0][2] == 0.0
        for _, ce, delta in logged:
            assert delta == pytest.approx(ce - before, abs=1e-12)
        assert logged[-1][1] == pytest.approx(hand_ce(model, old), rel=1e-5)  # measured on the trained model
        assert logged[-1][2] != 0.0  # the model changed


def test_a_given_baseline_is_not_measured(tmp_path):
    """baseline={name: ce}: no measurement at on_train_begin, the deltas against it."""
    old = examples([9, 14, 5], seed=1)
    trainer = trainer_for(llama(), tmp_path)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old}, interval=5, baseline={"old": 3.0}))
    trainer.train()
    ((step, ce, delta),) = entries(trainer, "old")
    assert step == 5 and delta == pytest.approx(ce - 3.0, abs=1e-12)


def test_default_interval_is_eval_steps_when_evaluating_by_steps(tmp_path):
    old = examples([9, 14, 5], seed=1)
    trainer = trainer_for(llama(), tmp_path, eval_dataset=old, eval_strategy="steps", eval_steps=3, logging_steps=1)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old}))
    trainer.train()
    assert [step for step, _, _ in entries(trainer, "old")] == [0, 3, 5]


def test_training_with_the_callback_is_bitwise_training_without(tmp_path):
    """Dropout on (the RNG matters): the same parameters bitwise and the same train losses, with and without."""
    runs = []
    for with_callback in (False, True):
        model = llama(dropout=0.3)
        trainer = trainer_for(model, tmp_path)
        if with_callback:
            trainer.add_callback(ForgettingCallback(trainer, {"old": examples([9, 14, 5], seed=1)}, interval=1))
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs.append(([p.detach().clone() for p in model.parameters()], losses, torch.get_rng_state()))
    (params0, losses0, rng0), (params1, losses1, rng1) = runs
    assert len(losses0) == 2 and losses0 == losses1
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    assert torch.equal(rng0, rng1)


def test_measure_restores_each_modules_mode_and_the_rng(tmp_path):
    model = llama(dropout=0.3)
    model.train()
    model.model.layers[0].eval()  # a mixed state: restored module by module, not by model.train()
    modes = [m.training for m in model.modules()]
    callback = ForgettingCallback(trainer_for(model, tmp_path), {"old": examples([9, 4], seed=1)})
    torch.manual_seed(3)
    callback.measure()
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))
    assert [m.training for m in model.modules()] == modes


def test_resuming_keeps_the_baseline_of_the_run_it_continues(tmp_path):
    old = examples([9, 14, 5], seed=1)
    trainer = trainer_for(llama(), tmp_path, save_strategy="steps", save_steps=2)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old}, interval=1))
    trainer.train()
    uninterrupted = entries(trainer, "old")
    resumed = trainer_for(llama(seed=7), tmp_path, save_strategy="no")
    resumed.add_callback(ForgettingCallback(resumed, {"old": old}, interval=1))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    after = [e for e in entries(resumed, "old") if e[0] == 5]
    assert len(after) == 1
    assert after[0][1] == pytest.approx(uninterrupted[-1][1], rel=1e-6)
    assert after[0][2] == pytest.approx(uninterrupted[-1][2], rel=1e-5)


def test_plot_is_written_to_the_output_dir(tmp_path):
    pytest.importorskip("matplotlib")
    trainer = trainer_for(llama(), tmp_path / "out")
    callback = ForgettingCallback(trainer, {"old": examples([9, 14], seed=1), "prose": examples([8], seed=2)})
    trainer.add_callback(callback)
    trainer.train()
    assert callback.plot_path == str(tmp_path / "out" / PLOT_FILE)
    assert (tmp_path / "out" / PLOT_FILE).stat().st_size > 1000
    trainer = trainer_for(llama(), tmp_path / "none")
    trainer.add_callback(ForgettingCallback(trainer, {"old": examples([9], seed=1)}, plot=False))
    trainer.train()
    assert not (tmp_path / "none" / PLOT_FILE).exists()


def test_with_trl_sft_trainer(tmp_path):
    """TRL's SFTTrainer on raw text, the old dataset tokenised by its tokenizer and padded by its own collator: the
    callback logs through it, and the Trainer's own entries keep SFTTrainer's metrics."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(50)} | {"<pad>": 50, "<unk>": 51, "<eos>": 52}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"t{int(i)}" for i in torch.randint(0, 50, (n,), generator=g)) for n in (10, 7, 12, 9, 11, 8)]
    train = datasets.Dataset.from_list([{"text": t} for t in texts])
    old = [dict(tokenizer(" ".join(f"t{int(i)}" for i in torch.randint(0, 50, (n,), generator=g)))) for n in (9, 5)]
    model = llama()
    config = trl.SFTConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, logging_steps=1, max_length=32,
    )  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer)
    trainer.add_callback(ForgettingCallback(trainer, {"old": old}, interval=1))
    trainer.train()
    logged = entries(trainer, "old")
    assert [step for step, _, _ in logged] == [0, 1, 2, 3]
    assert logged[-1][1] == pytest.approx(hand_ce(model, old), rel=1e-5)
    regular = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in regular] == [1, 2, 3]
    assert all("mean_token_accuracy" in e and "forgetting/old/ce" not in e for e in regular)


def test_beside_protected_hf_trainer_its_logs_stay_in_the_trainers_entries(tmp_path):
    """ProtectedHFTrainer drains its ewc_penalty means into whatever it logs: they stay in its own entries."""
    import fastforget as ff
    from fastforget.transformers import ProtectedHFTrainer

    model = llama()
    ewc = ff.EWC(model, lam=10.0)
    params = list(model.parameters())
    ewc.load_importance([p.detach() + 0.01 for p in params], [torch.ones_like(p) for p in params])
    args = trainer_for(model, tmp_path, max_steps=4).args
    trainer = ProtectedHFTrainer(model=model, args=args, train_dataset=examples([10, 7, 12, 9], seed=5),
                                 data_collator=collate, ewc=ewc)  # fmt: skip
    trainer.add_callback(ForgettingCallback(trainer, {"old": examples([9, 14], seed=1)}, interval=1))
    trainer.train()
    regular = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in regular] == [2, 4] and all(e["ewc_penalty"] > 0 for e in regular)
    assert [step for step, _, _ in entries(trainer, "old")] == [0, 1, 2, 3, 4]
    assert not any("ewc_penalty" in e for e in trainer.state.log_history if "forgetting/old/ce" in e)


# ------------------------------------------------------------------------------------------------------ errors


def test_bad_input_is_refused_at_construction(tmp_path):
    trainer = trainer_for(llama(), tmp_path)
    old = examples([5, 6], seed=1)
    cases = [
        (ValueError, "has no rows", dict(datasets={"old": []})),
        (TypeError, "tokenise raw text first", dict(datasets={"old": [{"text": "raw"}]})),
        (TypeError, "row 0 is str", dict(datasets={"old": ["raw text"]})),
        (TypeError, r"input_ids is \(1, 2, 3\)", dict(datasets={"old": [{"input_ids": torch.zeros(1, 2, 3)}]})),
        (TypeError, "input_ids is str", dict(datasets={"old": [{"input_ids": "abc"}]})),
        (TypeError, "a generator", dict(datasets={"old": (r for r in old)})),
        (TypeError, "non-empty dict", dict(datasets={})),
        (TypeError, "non-empty dict", dict(datasets=old)),
        (TypeError, "non-empty strings", dict(datasets={"": old})),
        (ValueError, "interval must be >= 1", dict(datasets={"old": old}, interval=0)),
        (ValueError, "interval must be >= 1", dict(datasets={"old": old}, interval=-3)),
        (TypeError, "interval must be an integer", dict(datasets={"old": old}, interval=2.5)),
        (TypeError, "interval must be an integer", dict(datasets={"old": old}, interval=True)),
        (ValueError, "max_batches must be >= 1", dict(datasets={"old": old}, max_batches=0)),
        (ValueError, "batch_size must be >= 1", dict(datasets={"old": old}, batch_size=0)),
        (TypeError, "data_collator must be callable", dict(datasets={"old": old}, data_collator=3)),
        (ValueError, "baseline must map every dataset name", dict(datasets={"old": old}, baseline={"new": 1.0})),
        (ValueError, "baseline must map every dataset name", dict(datasets={"old": old}, baseline=[1.0])),
        (ValueError, r"baseline\['old'\] must be finite", dict(datasets={"old": old}, baseline={"old": math.nan})),
    ]
    for error, message, kwargs in cases:
        with pytest.raises(error, match=message):
            ForgettingCallback(trainer, **kwargs)
    with pytest.raises(TypeError, match="must be a transformers.Trainer"):
        ForgettingCallback(object(), {"old": old})


def test_no_counted_token_is_refused_before_the_first_step(tmp_path):
    model = llama()
    trainer = trainer_for(model, tmp_path)
    batch = collate(examples([5, 6], seed=1))
    batch["labels"][:] = -100
    trainer.add_callback(ForgettingCallback(trainer, {"old": [batch]}))
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="'old' has no counted token"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, p) for a, p in zip(start, model.parameters()))


# --------------------------------------------------------------------------------------------------------- DDP


def test_ddp_ranks_log_the_one_process_value(tmp_path):
    """torchrun, 2 gloo processes: each rank evaluates its half of the batches, the sums are all-reduced, both ranks
    log the same values, equal to one process's (the training batches differ per rank, not the measurement: the
    callback measures before training and on a model trained identically, batch 2 vs 1 per rank)."""
    script = Path(__file__).with_name("forgetting_ddp.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    root = str(Path(__file__).resolve().parents[1])  # this checkout's fastforget, not another installed one
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    subprocess.run([sys.executable, str(script), str(tmp_path / "one")], check=True, env=env, timeout=240)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
    subprocess.run([*torchrun, str(script), str(tmp_path / "two")], check=True, env=env, timeout=240)
    (one,) = [torch.load(tmp_path / "one.rank0.pt")]
    rank0, rank1 = torch.load(tmp_path / "two.rank0.pt"), torch.load(tmp_path / "two.rank1.pt")
    assert rank0 == rank1  # the same values, bitwise, on both ranks
    assert [step for step, _ in rank0] == [step for step, _ in one] == [0, 1, 2, 3]
    for (_, a), (_, b) in zip(one, rank0):
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
