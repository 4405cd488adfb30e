"""ff.defences: a defence defined only here runs in ProtectedTrainer, ProtectedHFTrainer and ProtectedAdamW's fused
step, each against a hand-written loop; the order in which the consumers call the hooks; state round trips through
the protocol (all parts or none); the one place where the consumers' arguments are validated."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastforget as ff
from fastforget.defences import Defence, FusedOperands, LossTerm
from fastforget.testing import assert_close


class L2ToInit(Defence):
    """lam * sum (theta - theta_0)^2 with theta_0 the parameters at construction, re-anchored at the end of each
    task (the "L2 Init" regulariser, Kumar et al. 2023, "Maintaining Plasticity in Continual Learning via
    Regenerative Regularization"). Gradient form: g += 2 lam (theta - theta_0); fused: EWC's quadratic with F = 1."""

    name, step_timer, task_timer, fused_terms = "l2_init", "l2_init", "reanchor", ("quadratic",)

    def __init__(self, model, lam):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.lam = lam
        self.anchors = [p.detach().clone() for p in self.params]
        self.ones = [torch.ones_like(p) for p in self.params]

    def protect_gradients(self, scale):
        with torch.no_grad():
            penalty = self.lam * sum(((p - a) ** 2).sum() for p, a in zip(self.params, self.anchors))
            for p, a in zip(self.params, self.anchors):
                p.grad.add_(p - a, alpha=2 * self.lam * scale)
        return penalty

    def fused_operands(self, params, grad_scale, found_inf):
        rows = ff.defences.parameter_rows(self, params)
        return FusedOperands(anchors=[self.anchors[i] for i in rows], fisher=[self.ones[i] for i in rows], lam=self.lam)

    def end_task(self, task):
        self.anchors = [p.detach().clone() for p in self.params]

    def state_dict(self):
        return {"anchors": list(self.anchors)}

    def load_state_dict(self, state):
        anchors = state["anchors"]
        if len(anchors) != len(self.params) or any(a.shape != p.shape for a, p in zip(anchors, self.params)):
            raise ValueError("L2ToInit state: anchors are not shaped like the parameters")
        self.anchors = [a.clone() for a in anchors]


class FixedRehearsal(Defence):
    """weight x the loss of one fixed batch (a coreset), given in the consumer's buffer format."""

    name, step_timer = "fixed", "fixed"

    def __init__(self, batch, weight):
        self.batch, self.weight = batch, weight

    def loss(self, ctx):
        return LossTerm("fixed_loss", ctx.loss_of(self.batch), self.weight)


class Recorder(Defence):
    """Records which hook ran, with what the model's gradients looked like."""

    def __init__(self, name, calls, model):
        self.name, self.calls, self.model = name, calls, model

    def loss(self, ctx):
        self.calls.append((self.name, "loss", ctx.batch_size))

    def protect_gradients(self, scale):
        grads = all(p.grad is not None for p in self.model.parameters())
        self.calls.append((self.name, "protect_gradients", scale, grads))

    def end_task(self, task):
        self.calls.append((self.name, "end_task", task.model is self.model))


IN, HIDDEN, OUT, BATCH, LAM = 6, 9, 3, 5, 0.7


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT))


def make_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, IN, generator=g), torch.randint(OUT, (BATCH,), generator=g)) for _ in range(n)]


def moved(model):
    """Move the model away from its anchor, so that the pull is not zero."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(50 + i)))
    return model


def assert_models_close(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert_close(p, q, torch.float32)


# ------------------------------------------------------------------------------------------- ProtectedTrainer


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "protected_adamw"])
def test_a_new_defence_in_protected_trainer_equals_the_hand_loop(fused):
    model, twin = make_model(), make_model()
    pull = L2ToInit(model, LAM)
    moved(model), moved(twin)
    anchors = [a.clone() for a in pull.anchors]
    coreset = make_batches(1, seed=9)[0]
    extra = [pull, FixedRehearsal(coreset, 0.5)]
    if fused:
        opt = ff.optim.ProtectedAdamW(model.parameters(), lr=1e-2, defences=[pull])
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    trainer = ff.ProtectedTrainer(model, opt, F.cross_entropy, defences=extra)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    for batch in make_batches(4):
        stats = trainer.step(batch)
        ref.zero_grad()
        loss = F.cross_entropy(twin(batch[0]), batch[1])
        fixed = F.cross_entropy(twin(coreset[0]), coreset[1])
        (loss + 0.5 * fixed).backward()
        with torch.no_grad():
            penalty = LAM * sum(((p - a) ** 2).sum() for p, a in zip(twin.parameters(), anchors))
            for p, a in zip(twin.parameters(), anchors):
                p.grad += 2 * LAM * (p - a)
        ref.step()
        assert stats["loss"] == pytest.approx(loss.item(), rel=1e-6)
        assert stats["fixed_loss"] == pytest.approx(fixed.item(), rel=1e-6)
        assert stats["penalty"] == pytest.approx(float(penalty), rel=1e-5)
        assert ("l2_init" in stats["time_ms"]) != fused and "fixed" in stats["time_ms"]
    assert_models_close(model, twin)
    trainer.end_task(make_batches(1))  # re-anchors at the current parameters
    assert all(torch.equal(a, p) for a, p in zip(pull.anchors, model.parameters()))


def test_protected_trainer_calls_the_hooks_in_order():
    model, calls = make_model(), []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = ff.ProtectedTrainer(
        model, opt, F.cross_entropy, defences=[Recorder("a", calls, model), Recorder("b", calls, model)]
    )
    trainer.step(make_batches(1)[0])
    assert calls == [
        ("a", "loss", BATCH), ("b", "loss", BATCH),  # before backward
        ("a", "protect_gradients", 1.0, True), ("b", "protect_gradients", 1.0, True),  # on complete gradients
    ]  # fmt: skip
    calls.clear()
    trainer.end_task(make_batches(1))
    assert calls == [("a", "end_task", True), ("b", "end_task", True)]


# --------------------------------------------------------------------------------------------- ProtectedAdamW


def test_a_new_defence_in_protected_adamw_equals_adamw_on_the_pulled_gradient():
    model, twin = make_model(), moved(make_model())
    pull = L2ToInit(model, LAM)  # anchored at the parameters before they move
    moved(model)
    opt = ff.optim.ProtectedAdamW(model.parameters(), lr=1e-2, weight_decay=0.05, defences=[pull])
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    assert opt.defences == [pull] and opt.ewc is None
    for batch in make_batches(5, seed=3):
        for m in (model, twin):
            m.zero_grad()
            F.cross_entropy(m(batch[0]), batch[1]).backward()
        with torch.no_grad():
            penalty = LAM * sum(((p - a) ** 2).sum() for p, a in zip(twin.parameters(), pull.anchors))
            for p, a in zip(twin.parameters(), pull.anchors):
                p.grad += 2 * LAM * (p - a)
        opt.step()
        ref.step()
        assert_close(opt.penalty, penalty, torch.float32)
    assert_models_close(model, twin)


def test_protected_adamw_refuses_what_it_cannot_fuse():
    model = make_model()
    with pytest.raises(ValueError, match="hands no operands to the fused step"):
        ff.optim.ProtectedAdamW(model.parameters(), defences=[FixedRehearsal(make_batches(1)[0], 1.0)])
    with pytest.raises(ValueError, match="both fill the fused step's 'quadratic' term"):
        ff.optim.ProtectedAdamW(model.parameters(), ewc=ff.EWC(model), defences=[L2ToInit(model, 1.0)])
    with pytest.raises(ValueError, match="does not cover"):
        ff.optim.ProtectedAdamW(model.parameters(), defences=[L2ToInit(model[0], 1.0)])
    with pytest.raises(TypeError, match="not a ff.defences.Defence"):
        ff.optim.ProtectedAdamW(model.parameters(), defences=[object()])
    # a trainer given the pull while the ProtectedAdamW lacks it: it would be applied by neither, so it raises
    with pytest.raises(ValueError, match="applies its own l2_init"):
        ff.ProtectedTrainer(model, ff.optim.ProtectedAdamW(model.parameters()), F.cross_entropy,
                            defences=[L2ToInit(model, 1.0)])  # fmt: skip


def test_synaptic_intelligence_end_task_goes_to_its_ewc():
    model = make_model()
    ewc = ff.EWC(model, lam=1.0)
    si = ff.SynapticIntelligence(model, ewc=ewc)
    trainer = ff.ProtectedTrainer(model, ff.optim.ProtectedAdamW(model.parameters(), lr=1e-2, si=si),
                                  F.cross_entropy, si=si)  # fmt: skip
    for batch in make_batches(3):
        trainer.step(batch)
    importance = si.importance()
    trainer.end_task(make_batches(1))
    assert ewc.tasks == 1 and all(torch.equal(f, i) for f, i in zip(ewc.fisher, importance))
    assert all(not w.any() for w in si.omega)
    with pytest.raises(ValueError, match="runs inside ff.optim.ProtectedAdamW's step only"):
        ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, si=si)


# ----------------------------------------------------------------------------------------------- state, checks


def parts(model, seed=0):
    ewc = ff.EWC(model, lam=2.0)
    ewc.consolidate(make_batches(2, seed=7 + seed), F.cross_entropy, progress=False)
    replay = ff.ReplayBuffer(8, generator=torch.Generator().manual_seed(seed))
    replay.add(make_batches(1, seed=8 + seed)[0])
    return ewc, replay, L2ToInit(moved(make_model(seed)), 1.0)


def test_state_round_trips_through_the_protocol_all_or_nothing():
    model = make_model()
    ewc, replay, pull = parts(model)
    trainer = ff.ProtectedTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, ewc=ewc,
                                  replay=replay, defences=[pull, FixedRehearsal(None, 1.0)])  # fmt: skip
    state = copy.deepcopy(trainer.protection_state_dict())
    assert set(state) == {"ewc", "replay", "l2_init"}  # the stateless FixedRehearsal has no part
    fresh = make_model()
    ewc2, replay2, pull2 = parts(fresh, seed=1)
    other = ff.ProtectedTrainer(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), F.cross_entropy, ewc=ewc2,
                                replay=replay2, defences=[pull2, FixedRehearsal(None, 1.0)])  # fmt: skip
    before = copy.deepcopy(other.protection_state_dict())
    corrupt = copy.deepcopy(state)
    corrupt["l2_init"]["anchors"] = corrupt["l2_init"]["anchors"][:1]
    with pytest.raises(ValueError, match="anchors are not shaped"):
        other.load_protection_state_dict(corrupt)  # the EWC and the buffer loaded first are rolled back
    assert_equal_states(other.protection_state_dict(), before)
    for bad, match in (({**state, "fixed": {}}, "has a 'fixed' part"), ({"ewc": state["ewc"]}, "lacks a 'replay'")):
        with pytest.raises(ValueError, match=match):
            other.load_protection_state_dict(bad)
    assert_equal_states(other.protection_state_dict(), before)
    other.load_protection_state_dict(state)
    assert_equal_states(other.protection_state_dict(), state)


def assert_equal_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_equal_states(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], list) and a[key] and isinstance(a[key][0], torch.Tensor):
            assert len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


def test_the_consumers_arguments_are_checked_in_one_place():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for kwargs, error, match in (
        ({"replay_weight": float("nan")}, ValueError, "replay_weight must be finite"),
        ({"replay_weight": True}, TypeError, "replay_weight must be a real number"),
        ({"replay_batch_size": 2.0}, TypeError, "replay_batch_size must be an integer"),
        ({"kl_to_base": float("inf"), "batch_loss": lambda m, b: 0}, ValueError, "kl_to_base must be a finite"),
        ({"defences": [L2ToInit(model, 1.0), L2ToInit(model, 2.0)]}, ValueError, "both named 'l2_init'"),
        ({"defences": [ff.EWC(model)], "ewc": ff.EWC(model)}, ValueError, "both named 'ewc'"),
        ({"defences": ["ewc"]}, TypeError, r"defences\[0\] is a str"),
    ):
        with pytest.raises(error, match=match):
            ff.ProtectedTrainer(model, opt, F.cross_entropy, **kwargs)

    class Anchor(Defence):
        name = "anchor"

        def task_loss(self, ctx):
            return None

    with pytest.raises(ValueError, match="at most one defence may compute the task loss"):
        ff.ProtectedTrainer(model, opt, F.cross_entropy, defences=[Anchor(), ff.defences.KLAnchor(0.5, model)])


# ---------------------------------------------------------------------------------------------- HF Trainer


def record_micro_batches(trainer):
    seen, compute_loss = [], trainer.compute_loss

    def recording(model, inputs, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return compute_loss(model, inputs, **kwargs)

    trainer.compute_loss = recording
    return seen


def test_a_new_defence_in_protected_hf_trainer_equals_the_hand_loop(tmp_path):
    pytest.importorskip("transformers")
    from test_hf_trainer import ACCUMULATION, LR, arguments, collate, dataset, hf_loss, llama

    from fastforget.transformers import ProtectedHFTrainer

    coreset = dataset(3, seed=11)
    buffer_format = {"input_ids": [torch.as_tensor(e["input_ids"]) for e in coreset]}
    for fused in (False, True):
        model = llama()
        pull = L2ToInit(model, 0.3)
        moved(model)
        start, anchors, calls = copy.deepcopy(model), [a.clone() for a in pull.anchors], []
        optimizers = (ff.optim.ProtectedAdamW(model.parameters(), lr=LR, weight_decay=0.0, defences=[pull]), None)
        trainer = ProtectedHFTrainer(
            model=model, args=arguments(tmp_path), train_dataset=dataset(12, seed=2), data_collator=collate,
            defences=[pull, FixedRehearsal(buffer_format, 0.5), Recorder("rec", calls, model)],
            optimizers=optimizers if fused else (None, None),
        )  # fmt: skip
        seen = record_micro_batches(trainer)
        trainer.train()
        assert [c[1] for c in calls] == ["loss", "loss", "protect_gradients"] * 3  # per micro-batch; per step
        logged = trainer.state.log_history[0]
        assert "fixed_loss" in logged and "l2_init_penalty" in logged
        # the hand loop: per micro-batch (loss + 0.5 fixed) / ACCUMULATION; the pull added once per step, before
        # clipping (the trainer's own pass) or after it (ProtectedAdamW's fused step); AdamW
        params = list(start.parameters())
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
        start.train()
        for step in range(3):
            opt.zero_grad()
            for micro in range(ACCUMULATION):
                loss = hf_loss(start, seen[step * ACCUMULATION + micro]) + 0.5 * hf_loss(start, collate(coreset))
                (loss / ACCUMULATION).backward()
            if not fused:
                with torch.no_grad():
                    for p, a in zip(params, anchors):
                        p.grad += 2 * 0.3 * (p - a)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if fused:
                with torch.no_grad():
                    for p, a in zip(params, anchors):
                        p.grad += 2 * 0.3 * (p - a)
            opt.step()
        for (name, got), want in zip(model.named_parameters(), start.parameters()):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)
        calls.clear()
        trainer.end_task()
        assert calls == [("rec", "end_task", True)]  # the model as wrapped (here: not wrapped)
        assert all(torch.equal(a, p) for a, p in zip(pull.anchors, model.parameters()))
