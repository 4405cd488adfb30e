"""ProtectionMixin's logs: task_loss, replay_loss, kl_loss (the KL term alone) and ewc_penalty as separate keys,
each the mean per optimizer step since the last log, under gradient accumulation with sequences of unequal length,
against the same quantities computed by hand from the micro-batches the Trainer saw; `loss` stays the Trainer's."""

import copy

import pytest
import torch
import torch.nn.functional as F
from distributed_utils import run_ranks

import fastforget as ff
from fastforget.testing import import_installed_kernels_package

import_installed_kernels_package()  # as conftest does: the ranks of run_ranks import this module without it
pytest.importorskip("transformers")
from test_hf_trainer import arguments, collate, dataset, llama  # noqa: E402

from fastforget.transformers import ProtectedHFTrainer, _mean_over_ranks  # noqa: E402

ACCUMULATION, KL, REPLAY_WEIGHT = 2, 0.5, 0.5


def sums(model, batch, base=None):
    """Under no_grad: the summed shifted CE over the counted tokens, their count, and (with base) the summed KL."""
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        counted = labels != -100
        ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")[counted].sum()
        kl = None
        if base is not None:
            ref = base(**batch).logits[:, :-1].float().log_softmax(-1)
            per = (ref.exp() * (ref - logits.log_softmax(-1))).sum(-1)
            kl = per[counted].sum()
    return ce, counted.sum(), kl


@pytest.mark.parametrize("anchored", [False, True], ids=["plain", "kl_to_base"])
def test_logged_terms_are_the_step_means_of_each_term(tmp_path, anchored):
    model = llama()
    base = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # away from the anchor and the base: every term is nonzero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ewc = ff.EWC(model, lam=5.0)
    ewc.load_importance([p.detach() + 0.01 for p in base.parameters()], [torch.ones_like(p) for p in base.parameters()])
    replay = ff.ReplayBuffer(8, generator=torch.Generator().manual_seed(3))
    replay.add({"input_ids": [torch.as_tensor(e["input_ids"]) for e in dataset(4, seed=1)]})
    data = dataset(8, seed=2, lengths=[12, 7, 9, 12, 5, 11, 12, 8])  # padding: token-weighted means matter
    kwargs = {"kl_to_base": KL, "base_model": base} if anchored else {}
    trainer = ProtectedHFTrainer(
        model=model, args=arguments(tmp_path, max_steps=2, learning_rate=1e-2), train_dataset=data,
        data_collator=collate, ewc=ewc, replay=replay, replay_weight=REPLAY_WEIGHT, **kwargs,
    )  # fmt: skip
    want, micro = [], []  # per step: task, kl, replay, penalty
    compute_loss, sample = trainer.compute_loss, replay.sample

    def recording_compute_loss(m, inputs, **kw):
        micro.append(("task", sums(m, inputs, base if anchored else None)))
        return compute_loss(m, inputs, **kw)

    def recording_sample(k, **kw):
        out = sample(k, **kw)
        examples = [{"input_ids": ids.tolist()} for ids in out["input_ids"]]
        micro.append(("replay", sums(model, collate(examples))))
        return out

    trainer.compute_loss, replay.sample = recording_compute_loss, recording_sample
    protect = trainer._protect_gradients

    def recording_protect():
        with torch.no_grad():
            penalty = float(ewc.penalty())
        tasks = [s for kind, s in micro if kind == "task"]
        replays = [s for kind, s in micro if kind == "replay"]
        tokens = sum(int(n) for _, n, _ in tasks)  # the Trainer's num_items_in_batch: the step's counted tokens
        task = sum(float(ce) for ce, _, _ in tasks) / tokens
        kl = KL * sum(float(k) for _, _, k in tasks) / tokens if anchored else None
        mean_replay = sum(float(ce) / int(n) for ce, n, _ in replays) / len(replays)
        want.append((task, kl, mean_replay, penalty))
        micro.clear()
        protect()

    trainer._protect_gradients = recording_protect
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry and "train_runtime" not in entry]
    assert len(logs) == len(want) == 2
    for logged, (task, kl, replay_loss, penalty) in zip(logs, want):
        assert logged["task_loss"] == pytest.approx(task, rel=1e-4)
        assert logged["replay_loss"] == pytest.approx(replay_loss, rel=1e-4)
        assert logged["ewc_penalty"] == pytest.approx(penalty, rel=1e-4)
        assert ("kl_loss" in logged) == anchored
        total = task + REPLAY_WEIGHT * replay_loss + (kl if anchored else 0.0)
        if anchored:
            assert logged["kl_loss"] == pytest.approx(kl, rel=1e-3)
        assert logged["loss"] == pytest.approx(total, rel=1e-3)  # the Trainer's own: what was differentiated


def _rank_means(rank, world_size):
    """Rank 0 logged a replay loss, rank 1 did not (its buffer was empty): no collective may get out of step."""
    return _mean_over_ranks({"task_loss": 1.0 + rank, "replay_loss": 4.0} if rank == 0 else {"task_loss": 1.0 + rank})


def test_terms_are_averaged_over_the_ranks_that_logged_them(tmp_path):
    assert _mean_over_ranks({"task_loss": 2.0}) == {"task_loss": 2.0}  # one process: as is
    for result in run_ranks(_rank_means, tmp_path, timeout=60):
        assert result == {"task_loss": 1.5, "replay_loss": 4.0}
