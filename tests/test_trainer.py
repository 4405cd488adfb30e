"""ProtectedTrainer: the step equals the loop it stands for, backends agree, AMP skips leave every state alone."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import device_of
from torch import nn

import fastforget as ff

IN, HIDDEN, OUT, BATCH = 12, 16, 4, 8


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def make_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, IN, generator=g), torch.randint(OUT, (BATCH,), generator=g)) for _ in range(n)]


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_bitwise(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def protections(model, backend="auto", seed=0, mode="tensor", estimator="empirical"):
    """EWC (consolidated on one batch), a filled replay buffer and a protector, all over `model`."""
    ewc = ff.EWC(model, lam=5.0, mode="separate", backend=backend)
    ewc.consolidate(make_batches(2, seed=7), F.cross_entropy, estimator=estimator, progress=False)
    replay = ff.ReplayBuffer(20, generator=torch.Generator().manual_seed(seed))
    for batch in make_batches(3, seed=8):
        replay.add(batch)
    protector = ff.GradientProtector(model, window=5, mode=mode, backend=backend)
    return {"ewc": ewc, "replay": replay, "protector": protector}


def state_of(parts):
    """Deep copies of every component's state (the buffer's generator state included)."""
    return {name: copy.deepcopy(part.state_dict()) for name, part in parts.items()}


def assert_states_equal(a, b):
    for name in a:
        left, right = a[name], b[name]
        for key in left:
            x, y = left[key], right[key]
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), (name, key)
            elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
                assert all(torch.equal(u, v) for u, v in zip(x, y)), (name, key)
            else:
                assert x == y, (name, key)


def test_no_protection_equals_a_plain_loop_bitwise():
    batches = make_batches(6)
    plain = make_model()
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()

    model = make_model()
    trainer = ff.ProtectedTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy)
    for batch in batches:
        stats = trainer.step(batch)
        assert stats["replay_loss"] is None and stats["penalty"] == 0.0 and not stats["skipped"]
        assert set(stats["time_ms"]) == {"step"}
    assert_bitwise(params_of(model), params_of(plain))
    assert trainer.steps == len(batches)


def test_step_equals_the_seeds_loop_by_hand():
    """task loss + replay_weight x replay loss, backward, EWC gradient, protection, optimizer step."""
    batches = make_batches(5)
    hand = make_model()
    hand_parts = protections(hand)
    opt = torch.optim.SGD(hand.parameters(), lr=0.1)
    penalties = []
    for x, y in batches:
        opt.zero_grad()
        rx, ry = hand_parts["replay"].sample(len(x))
        (F.cross_entropy(hand(x), y) + 0.5 * F.cross_entropy(hand(rx), ry)).backward()
        penalties.append(float(hand_parts["ewc"].apply_()))
        hand_parts["protector"].protect_()
        opt.step()

    model = make_model()
    parts = protections(model)
    trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                                  replay_weight=0.5, **parts)  # fmt: skip
    for batch, penalty in zip(batches, penalties):
        stats = trainer.step(batch)
        assert stats["penalty"] == penalty  # 0 at the first step, where theta = theta*
        assert stats["replay_loss"] is not None
        assert set(stats["time_ms"]) == {"step", "replay", "ewc", "protect"}
        assert all(ms >= 0 for ms in stats["time_ms"].values())
    assert penalties[-1] > 0
    assert_bitwise(params_of(model), params_of(hand))
    assert_states_equal(state_of(parts), state_of(hand_parts))


def test_replay_batch_size_is_capped_by_the_buffer():
    model = make_model()
    replay = ff.ReplayBuffer(3, generator=torch.Generator().manual_seed(0))
    replay.add(make_batches(1)[0])
    trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                                  replay=replay, replay_batch_size=100)  # fmt: skip
    assert trainer.step(make_batches(1)[0])["replay_loss"] is not None  # 3 replayed, not 100


@pytest.mark.parametrize("mode", ["tensor", "element"])
def test_reference_backend_matches_fused(fused_backend, mode):
    device = device_of(fused_backend)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(8)]
    finals, stats = [], []
    for backend in (fused_backend, "reference"):
        model = make_model().to(device)
        parts = protections(model, backend, mode=mode)
        trainer = ff.ProtectedTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), F.cross_entropy, **parts)
        stats.append([trainer.step(batch) for batch in batches[:4]])
        trainer.end_task(batches[:2])  # a second consolidated task and more examples in the buffer
        stats[-1] += [trainer.step(batch) for batch in batches[4:]]
        finals.append(params_of(model))
    for fused, reference in zip(*stats):
        assert fused["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-6)
        assert fused["penalty"] == pytest.approx(reference["penalty"], rel=1e-4, abs=1e-6)
    for fused, reference in zip(*finals):
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)


def test_end_task_consolidates_and_fills_the_buffer():
    model = make_model()
    ewc = ff.EWC(model, lam=1.0)
    replay = ff.ReplayBuffer(10, generator=torch.Generator().manual_seed(0))
    trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                                  ewc=ewc, replay=replay)  # fmt: skip
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*make_batches(1)[0]), batch_size=3)
    stats = trainer.end_task(loader)  # a DataLoader yields [x, y] lists
    assert ewc.tasks == 1 and len(replay) == BATCH and replay.seen == BATCH
    assert set(stats["time_ms"]) == {"consolidate", "fill"}
    expected = ff.estimate_fisher(model, loader, F.cross_entropy)
    assert all(torch.equal(f, e) for f, e in zip(ewc.fisher, expected))


def _amp_trainer(model, parts, scale):
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return ff.ProtectedTrainer(model, optimizer, F.cross_entropy, scaler=scaler, autocast_dtype=torch.bfloat16,
                               **parts)  # fmt: skip


def test_amp_skipped_step_leaves_every_state_alone():
    model = make_model()
    parts = protections(model)
    trainer = _amp_trainer(model, parts, 2.0**10)
    for batch in make_batches(3):
        assert not trainer.step(batch)["skipped"]
    before_params, before_states = params_of(model), state_of(parts)
    before_opt = copy.deepcopy(trainer.optimizer.state_dict())
    x, y = make_batches(1, seed=5)[0]
    x[0, 0] = float("inf")  # a non-finite loss: every gradient is NaN
    stats = trainer.step((x, y))
    assert stats["skipped"] and trainer.steps == 3
    assert trainer.scaler.get_scale() == 2.0**9  # backed off
    assert bool(parts["protector"].found_inf)
    assert_bitwise(params_of(model), before_params)
    after_states = state_of(parts)
    before_states["replay"].pop("generator")  # the replay draw of the skipped step advanced the generator
    after_states["replay"].pop("generator")
    assert_states_equal(after_states, before_states)
    after_opt = trainer.optimizer.state_dict()
    for index, state in before_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(after_opt["state"][index][key], value)
    assert not trainer.step(make_batches(1, seed=6)[0])["skipped"]  # training goes on


def test_grad_scaler_gives_the_unscaled_step():
    """EWC and protection act on unscaled gradients: a power-of-two loss scale changes nothing, bitwise."""
    finals = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = make_model()
        trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy,
                                      scaler=scaler, **protections(model))  # fmt: skip
        for batch in make_batches(5):
            trainer.step(batch)
        finals.append(params_of(model))
    assert_bitwise(*finals)


def test_lora_model_only_adapters_are_protected_and_updated():
    model = ff.apply_lora(make_model(), target_modules=["0", "2"], r=2, alpha=4)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    parts = protections(model)
    assert parts["ewc"].names == parts["protector"].names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in parts["ewc"].names)
    before = [p.detach().clone() for p in trainable]
    trainer = ff.ProtectedTrainer(model, torch.optim.Adam(trainable, lr=1e-2), F.cross_entropy, **parts)
    for batch in make_batches(4):
        trainer.step(batch)
    trainer.end_task(make_batches(2))  # the empirical Fisher: per-sample gradients through the fused op
    assert parts["ewc"].tasks == 2
    assert all(not torch.equal(p, b) for p, b in zip(trainable, before))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]) and p.grad is None, name


def test_batch_loss_for_other_batch_structures():
    batches = make_batches(3)
    plain = make_model()
    ff.ProtectedTrainer(plain, torch.optim.SGD(plain.parameters(), lr=0.1), F.cross_entropy).step(batches[0])
    model = make_model()
    trainer = ff.ProtectedTrainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1),
        batch_loss=lambda m, batch: F.cross_entropy(m(batch["inputs"]), batch["labels"]),
    )  # fmt: skip
    trainer.step({"inputs": batches[0][0], "labels": batches[0][1]})
    assert_bitwise(params_of(model), params_of(plain))


def test_bad_arguments():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="loss_fn"):
        ff.ProtectedTrainer(model, opt)
    with pytest.raises(ValueError, match="replay_weight"):
        ff.ProtectedTrainer(model, opt, F.cross_entropy, replay_weight=-1.0)
    with pytest.raises(ValueError, match="replay_batch_size"):
        ff.ProtectedTrainer(model, opt, F.cross_entropy, replay_batch_size=0)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ff.ProtectedTrainer(model.requires_grad_(False), opt, F.cross_entropy)
