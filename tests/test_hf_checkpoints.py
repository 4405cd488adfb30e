"""fastforget.checkpoint through ProtectedHFTrainer: checkpoints that survive a SIGKILL at fixed points of their
save (a child process kills itself; see hf_checkpoint_child.py), resume that picks the newest complete checkpoint
and continues bitwise, clear errors for missing and torn state files, save_model + load_protection."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
import hf_checkpoint_child as child  # noqa: E402

import fastforget as ff  # noqa: E402
from fastforget import checkpoint  # noqa: E402
from fastforget.transformers import ProtectedHFTrainer  # noqa: E402

CHILD = Path(__file__).with_name("hf_checkpoint_child.py")
ROOT = str(Path(__file__).resolve().parents[1])  # the child imports this checkout's fastforget


def state_tensors(trainer):
    """Every tensor of the model and the defences' state, in a fixed order."""
    flat = [p.detach() for p in trainer.model.parameters()]

    def walk(value):
        if isinstance(value, torch.Tensor):
            flat.append(value)
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(trainer.protection_state_dict())
    return flat


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = child.build(tmp_path_factory.mktemp("uninterrupted"))
    trainer.train()
    return state_tensors(trainer)


# which checkpoints are on disk after the kill, and which one resume must pick
EXPECTED = {
    "before_state": (["checkpoint-2", "checkpoint-4"], "checkpoint-2"),
    "during_state": (["checkpoint-2", "checkpoint-4"], "checkpoint-2"),
    "after_state": (["checkpoint-2", "checkpoint-4"], "checkpoint-2"),
    "before_rotation": (["checkpoint-2", "checkpoint-4"], "checkpoint-4"),
    "after_rotation": (["checkpoint-4"], "checkpoint-4"),
}


@pytest.mark.parametrize("point", child.POINTS)
def test_a_kill_during_a_checkpoint_resumes_bitwise(tmp_path, point, uninterrupted):
    """SIGKILL at `point` of the save of checkpoint-4 with save_total_limit=1; train(resume_from_checkpoint=True)
    then picks the newest complete checkpoint and ends bitwise equal to the uninterrupted run (weights and the
    EWC, protector and replay states)."""
    run = subprocess.run(
        [sys.executable, str(CHILD), str(tmp_path), point, str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300,
        env=os.environ | {"PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    folders, pick = EXPECTED[point]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == folders
    if point == "during_state":  # a torn temporary file, never a torn final one
        assert (tmp_path / "checkpoint-4" / (checkpoint.STATE_FILE + ".tmp")).exists()
        assert not (tmp_path / "checkpoint-4" / checkpoint.STATE_FILE).exists()
    assert checkpoint.last_complete_checkpoint(str(tmp_path))[0] == str(tmp_path / pick)
    trainer = child.build(tmp_path)
    trainer.train(resume_from_checkpoint=True)
    resumed = state_tensors(trainer)
    assert len(resumed) == len(uninterrupted)
    for a, b in zip(resumed, uninterrupted):
        assert torch.equal(a, b)


def test_missing_or_torn_state_is_a_clear_error_naming_the_checkpoint(tmp_path):
    trainer = child.build(tmp_path)
    trainer.args.max_steps = 2
    trainer.train()
    folder = tmp_path / "checkpoint-2"
    path = folder / checkpoint.STATE_FILE
    before = state_tensors(trainer)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=f"checkpoint {folder}: fastforget_state.pt is torn"):
        trainer.train(resume_from_checkpoint=str(folder))
    with pytest.raises(ValueError, match="no complete checkpoint to resume from"):
        trainer.train(resume_from_checkpoint=True)
    path.unlink()
    with pytest.raises(ValueError, match=f"checkpoint {folder} has no fastforget_state.pt"):
        trainer.train(resume_from_checkpoint=str(folder))
    path.write_bytes(b"not a zip file at all, yet long enough")
    with pytest.raises(ValueError, match="is torn"):
        trainer.load_protection(folder)
    for a, b in zip(state_tensors(trainer), before):  # nothing changed
        assert torch.equal(a, b)
    # a newer incomplete checkpoint (no trainer_state.json) is skipped for the older complete one
    path.write_bytes(whole)
    (tmp_path / "checkpoint-4").mkdir()
    torch.save({}, tmp_path / "checkpoint-4" / checkpoint.STATE_FILE)
    found, skipped = checkpoint.last_complete_checkpoint(str(tmp_path))
    assert found == str(folder) and skipped[0][0] == str(tmp_path / "checkpoint-4")
    assert "trainer_state.json" in skipped[0][1][0]


def test_save_model_writes_the_defences_state_and_load_protection_restores_it(tmp_path):
    trainer = child.build(tmp_path / "run")
    trainer.args.max_steps = 2
    trainer.args.save_strategy = "no"
    trainer.train()
    trainer.save_model(str(tmp_path / "model"))
    assert {"model.safetensors", "config.json", checkpoint.STATE_FILE} <= set(os.listdir(tmp_path / "model"))
    assert not list((tmp_path / "model").glob("*.tmp"))
    saved = trainer.protection_state_dict()

    fresh = child.build(tmp_path / "other")  # the defences as before training: a different state
    fresh.load_protection(tmp_path / "model")
    restored = fresh.protection_state_dict()
    for part in ("ewc", "protector", "replay"):
        assert part in restored
    a, b = [], []
    for tensors, state in ((a, saved), (b, restored)):
        for part in ("ewc", "protector"):
            for key in sorted(state[part]):
                if isinstance(state[part][key], list):
                    tensors.extend(t for t in state[part][key] if isinstance(t, torch.Tensor))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(fresh.replay.sample(6)["input_ids"][0], trainer.replay.sample(6)["input_ids"][0])

    # the state of other defences is rejected as a whole, before anything changes
    model = fresh.model
    other = ProtectedHFTrainer(model=model, args=fresh.args, data_collator=child.collate, ewc=ff.EWC(model, lam=1.0))
    ewc_before = [t.clone() for t in other.ewc.state_dict()["fisher"]]
    with pytest.raises(ValueError, match=r"protection state has parts \['protector', 'replay'\] that no defence"):
        other.load_protection(tmp_path / "model")
    assert other.ewc.tasks == 0 and all(torch.equal(x, y) for x, y in zip(other.ewc.state_dict()["fisher"], ewc_before))


def assert_same(a, b, where="state"):
    """Nested dicts / lists of tensors and plain values, equal bitwise."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_under_ddp_sft_fisher_weights_replay_checkpoints_and_fsdp2_dcp(tmp_path):
    """One torchrun launch, 2 gloo processes (tests/trainers_ddp.py): TRL's SFTTrainer + ProtectionMixin + EWC
    gives both ranks the same Fisher -- the single-process Fisher over all the texts -- and the same weights;
    per-rank replay buffers survive save_model / load_protection, and resume skips a checkpoint that lacks one
    rank's file and continues bitwise; an FSDP2-sharded EWC
    and protector go through DCP (no fastforget_state.pt) and load back on 2 ranks and into one process."""
    pytest.importorskip("trl")
    from distributed_utils import torchrun

    torchrun(Path(__file__).with_name("trainers_ddp.py"), tmp_path, log_dir=tmp_path / "logs", timeout=400)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # SFTTrainer: the same Fisher (before and after training) and weights on both ranks
    sft = [r["sft"] for r in ranks]
    for key in ("fisher_before", "fisher_after", "weights"):
        assert_same(sft[0][key], sft[1][key], key)
    import trainers_ddp

    single = trainers_ddp.sft_trainer(tmp_path / "single", trainers_ddp.llama())
    single.end_task()
    for got, want in zip(sft[0]["fisher_before"], single.ewc.state_dict()["fisher"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    assert sum(float(f.sum()) for f in sft[0]["fisher_after"]) != sum(float(f.sum()) for f in want)

    # per-rank replay buffers: each rank's own file, restored on each rank
    replay = [r["replay"] for r in ranks]
    for folder in (tmp_path / "replay" / "model", tmp_path / "replay" / "run" / "checkpoint-2"):
        files = set(os.listdir(folder))
        assert {checkpoint.STATE_FILE, checkpoint.rank_file(0), checkpoint.rank_file(1)} <= files, folder
        assert "replay" not in torch.load(folder / checkpoint.STATE_FILE, weights_only=True)
    for rank in replay:
        assert_same(rank["replay_saved"], rank["replay_loaded"], "load_protection")
        assert_same(rank["replay_saved"], rank["replay_resumed"], "resume")  # from checkpoint-2, the complete one
        assert_same(rank["weights"], rank["weights_resumed"], "resumed weights")
        assert_same(rank["ewc_saved"], rank["ewc_loaded"], "ewc")
    assert not torch.equal(replay[0]["replay_saved"]["generator"], replay[1]["replay_saved"]["generator"])

    # FSDP2: DCP, every rank its shards; loads back on 2 ranks and into one process (resharded)
    fsdp = [r["fsdp"] for r in ranks]
    for rank in fsdp:
        assert_same(rank["ewc"], rank["ewc_loaded"], "ewc")
        assert_same(rank["protector"], rank["protector_loaded"], "protector")
        assert rank["penalty"] == rank["penalty_loaded"]
    assert not (tmp_path / "fsdp" / checkpoint.STATE_FILE).exists()
    assert (tmp_path / "fsdp" / checkpoint.SHARDED_STATE_DIR / ".metadata").exists()
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    ewc, protector = ff.EWC(plain, lam=0.5), ff.GradientProtector(plain, mode="element")
    loaded = checkpoint.load_state(
        str(tmp_path / "fsdp"), {"ewc": ewc.state_dict(), "protector": protector.state_dict()}
    )
    ewc.load_state_dict(loaded["ewc"])
    protector.load_state_dict(loaded["protector"])
    assert_same(fsdp[0]["ewc"], ewc.state_dict(), "ewc in one process")
    assert_same(fsdp[0]["protector"], protector.state_dict(), "protector in one process")


def test_defences_over_parameters_the_trainer_does_not_train_are_rejected(tmp_path):
    """As when accelerate's FSDP2 preparation replaces the parameters: an EWC over other tensors raises at the
    start of training instead of protecting nothing."""
    trainer = child.build(tmp_path)
    trainer.model = trainer.model_wrapped = child.build(tmp_path).model  # prepared into other tensors
    with pytest.raises(ValueError, match="the ewc holds parameters that the trained model does not have"):
        trainer.train()
    assert trainer.state.global_step == 0
