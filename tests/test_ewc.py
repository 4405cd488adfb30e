"""ff.estimate_fisher and ff.EWC: estimators against brute-force loops, online/separate consolidation, state."""

import io

import pytest
import torch
import torch.nn.functional as F
from conftest import FUSED_BACKENDS, device_of
from torch import nn

import fastforget as ff
from fastforget.testing import assert_close

CLASSES = 3


def tiny_mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES)).to(device)


def batches(sizes=(5, 3, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 4, generator=g), torch.randint(0, CLASSES, (n,), generator=g)) for n in sizes]


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def squared_grads(model, loss):
    grads = torch.autograd.grad(loss, trainable(model))
    return [g.square() for g in grads]


def brute_force(model, data, estimator):
    """The definitions, one sample (or one batch) and one backward at a time, for the trainable parameters."""
    total, count = [torch.zeros_like(p) for p in trainable(model)], 0
    device = next(model.parameters()).device
    for x, y in data:
        x, y = x.to(device), y.to(device)
        if estimator == "batch":
            total = [t + s for t, s in zip(total, squared_grads(model, F.cross_entropy(model(x), y)))]
            count += 1
            continue
        for i in range(len(x)):
            count += 1
            if estimator == "empirical":
                total = [
                    t + s
                    for t, s in zip(total, squared_grads(model, F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])))
                ]
                continue
            probs = torch.softmax(model(x[i : i + 1]), -1)[0].detach()
            for c in range(CLASSES):
                loss = F.cross_entropy(model(x[i : i + 1]), torch.tensor([c], device=device))
                total = [t + probs[c] * s for t, s in zip(total, squared_grads(model, loss))]
    return [t / count for t in total]


@pytest.mark.parametrize("estimator", ["empirical", "batch", "true"])
def test_estimators_match_brute_force(estimator, backend):
    model, data = tiny_mlp(device=device_of(backend)), batches()
    expected = brute_force(model, data, estimator)
    got = ff.estimate_fisher(model, data, F.cross_entropy, estimator=estimator, chunk_size=2, backend=backend)
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("estimator", ["empirical", "true"])
def test_consolidate_on_a_lora_model_matches_brute_force(estimator, backend):
    # per-sample gradients through ff.lora_linear under torch.func (vmap over the samples of grad w.r.t. the
    # adapters): each sample's adapter gradients from its own rows, as one backward per sample gives them
    model = ff.apply_lora(tiny_mlp(device=device_of(backend)), ["0", "2"], r=2, backend=backend)
    adapters = [m for m in model.modules() if isinstance(m, ff.LoRALinear)]
    with torch.no_grad():  # a trained adapter: lora_B = 0 would make every lora_A gradient 0
        for module in adapters:
            module.lora_B.normal_()
    data = batches()
    for module in adapters:  # the truth through PEFT's formula, one sample and one backward at a time
        module.backend = "reference"
    expected = brute_force(model, data, estimator)
    for module in adapters:
        module.backend = backend
    ewc = ff.EWC(model, backend=backend)
    ewc.consolidate(data, F.cross_entropy, estimator=estimator, progress=False, chunk_size=2)
    assert len(ewc.fisher) == 4  # lora_A, lora_B of both layers; the base layers are frozen
    for g, e in zip(ewc.fisher, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)


def test_true_fisher_with_sampled_labels_matches_brute_force():
    model, data = tiny_mlp(), batches()
    got = ff.estimate_fisher(
        model, data, F.cross_entropy, estimator="true", exact_classes=1, generator=torch.Generator().manual_seed(7)
    )
    # the same draws, one sample at a time
    generator, total, count = torch.Generator().manual_seed(7), [torch.zeros_like(p) for p in model.parameters()], 0
    for x, _ in data:
        for chunk in x.split(32):
            labels = torch.multinomial(torch.softmax(model(chunk), -1).detach(), 1, generator=generator).squeeze(1)
            for i in range(len(chunk)):
                total = [
                    t + s
                    for t, s in zip(
                        total, squared_grads(model, F.cross_entropy(model(chunk[i : i + 1]), labels[i : i + 1]))
                    )
                ]
                count += 1
    for g, t in zip(got, total):
        torch.testing.assert_close(g, t / count, rtol=1e-4, atol=1e-7)


def test_batch_and_empirical_estimators_differ():
    # two samples whose gradients point in opposite directions: their mean gradient (batch) is ~0, the mean of
    # their squares (empirical) is not
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    data = [(torch.tensor([[1.0], [-1.0]]), torch.tensor([[1.0], [1.0]]))]
    empirical = ff.estimate_fisher(model, data, F.mse_loss, estimator="empirical")[0]
    batch = ff.estimate_fisher(model, data, F.mse_loss, estimator="batch")[0]
    assert empirical.item() == pytest.approx(4.0)  # per sample: d/dw (w x - y)^2 = -2 x y = -2 and +2, squared 4
    assert batch.item() == pytest.approx(0.0)


def test_estimator_options_and_errors(capsys):
    model = tiny_mlp()
    data = batches((2, 2, 2, 2))
    limited = ff.estimate_fisher(model, data, F.cross_entropy, max_batches=2, progress=True)
    expected = ff.estimate_fisher(model, data[:2], F.cross_entropy)
    assert all(torch.equal(a, b) for a, b in zip(limited, expected))
    assert "fisher [empirical]: batch 2/2, 4 samples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no batches"):
        ff.estimate_fisher(model, [], F.cross_entropy)
    with pytest.raises(ValueError, match="unknown estimator"):
        ff.estimate_fisher(model, data, F.cross_entropy, estimator="fisher")
    with pytest.raises(TypeError, match="batch 0 is not an"):
        ff.estimate_fisher(model, [torch.randn(2, 4)], F.cross_entropy)


def test_parameter_list_with_its_own_names_and_a_subset():
    model, data = tiny_mlp(), batches()
    full = ff.estimate_fisher(model, data, F.cross_entropy)
    renamed = ff.EWC([(f"p{i}", p) for i, p in enumerate(model.parameters())])
    renamed.consolidate(data, F.cross_entropy, model=model, progress=False)
    head = ff.EWC([("head", model[2].weight)])
    head.consolidate(data, F.cross_entropy, model=model, progress=False)
    for a, b in zip(renamed.fisher + head.fisher, full + full[2:3]):
        assert_close(a, b)
    stranger = ff.EWC([("w", nn.Parameter(torch.zeros(3)))])
    with pytest.raises(ValueError, match="protected parameter 0 is not a parameter of the model"):
        stranger.consolidate(data, F.cross_entropy, model=model, progress=False)
    with pytest.raises(ValueError, match=r"parameters\[0\] and parameters\[1\] are the same tensor"):
        ff.EWC([("a", model[0].weight), ("b", model[0].weight)])


def test_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, x):
            return self.out(torch.tanh(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Tied()
    x, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    expected = sum(squared_grads(model, F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]))[0] for i in range(5)) / 5
    (got,) = ff.estimate_fisher(model, [(x, y)], F.cross_entropy)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_true_fisher_needs_class_logits():
    model = nn.Sequential(nn.Linear(4, CLASSES), nn.Unflatten(1, (1, CLASSES)))
    with pytest.raises(ValueError, match=r"needs \(batch, classes\) logits, or .* got logits \(5, 1, 3\)"):
        ff.estimate_fisher(model, batches((5,)), F.cross_entropy, estimator="true")


def test_model_mode_restored_and_frozen_parameters_skipped():
    model = tiny_mlp()
    model[0].weight.requires_grad_(False)
    model.train()
    ewc = ff.EWC(model)
    assert ewc.names == ["0.bias", "2.weight", "2.bias"]
    ewc.consolidate(batches(), F.cross_entropy, progress=False)
    assert model.training
    assert [tuple(f.shape) for f in ewc.fisher] == [(6,), (CLASSES, 6), (CLASSES,)]


# ------------------------------------------------------------------------------------------------- consolidation


def random_task(model, seed):
    g = torch.Generator().manual_seed(seed)
    anchors = [torch.randn(p.shape, generator=g) for p in model.parameters()]
    fisher = [torch.rand(p.shape, generator=g) for p in model.parameters()]
    return anchors, fisher


def test_online_decay_over_three_tasks():
    model = tiny_mlp()
    ewc = ff.EWC(model, lam=0.3, mode="online", decay=0.9)
    tasks = [random_task(model, seed) for seed in range(3)]
    for anchors, fisher in tasks:
        ewc.load_importance(anchors, fisher)
    for i, (f, a) in enumerate(zip(ewc.fisher, ewc.anchors)):
        expected = 0.81 * tasks[0][1][i] + 0.9 * tasks[1][1][i] + tasks[2][1][i]
        assert_close(f, expected)
        assert torch.equal(a, tasks[2][0][i])
    expected = 0.3 * sum((f * (p - a).square()).sum() for p, a, f in zip(model.parameters(), ewc.anchors, ewc.fisher))
    assert_close(ewc.penalty(), expected.detach())


def test_online_consolidate_anchors_at_current_parameters_and_does_not_alias_them():
    model = tiny_mlp()
    ewc = ff.EWC(model, mode="online")
    ewc.consolidate(batches(), F.cross_entropy, progress=False)
    assert ewc.penalty().item() == 0.0
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert ewc.penalty().item() > 0.0


def per_task_penalty(model, tasks, lam):
    return lam * sum(
        (f * (p - a).square()).sum()
        for anchors, fisher in tasks
        for p, a, f in zip(model.parameters(), anchors, fisher)
    )


@pytest.mark.parametrize("use_apply", [False, True])
def test_separate_mode_is_exactly_the_sum_of_per_task_penalties(use_apply):
    model = tiny_mlp()
    tasks = [random_task(model, seed) for seed in range(4)]
    tasks[1][1][0].zero_()  # a parameter with zero Fisher in some tasks
    tasks[2][1][0].zero_()
    tasks[0][1][3][1] = 0.0  # and single elements that are zero in one task only
    ewc = ff.EWC(model, lam=0.7, mode="separate")
    for anchors, fisher in tasks:
        ewc.load_importance(anchors, fisher)
    assert len(ewc.fisher) == len(list(model.parameters()))  # O(1) state: one tensor pair per parameter

    expected = per_task_penalty(model, tasks, 0.7)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    model.zero_grad()
    if use_apply:
        value = ewc.apply_()
    else:
        value = ewc.penalty()
        value.backward()
    torch.testing.assert_close(value.detach(), expected.detach(), rtol=1e-5, atol=1e-5)
    for p, e in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6)


def test_separate_mode_with_zero_fisher_everywhere():
    model = tiny_mlp()
    ewc = ff.EWC(model, mode="separate")
    zeros = [torch.zeros_like(p) for p in model.parameters()]
    ewc.load_importance([p.detach() + 1 for p in model.parameters()], zeros)
    ewc.load_importance([p.detach() - 1 for p in model.parameters()], zeros)
    assert ewc.penalty().item() == 0.0 and ewc.constant == 0.0
    assert all(bool(a.isfinite().all()) for a in ewc.anchors)


def test_bf16_state_error_bound():
    model = tiny_mlp()
    tasks = [random_task(model, seed) for seed in range(3)]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))  # trained away from the anchors
    for mode in ("online", "separate"):
        exact, compact = ff.EWC(model, mode=mode), ff.EWC(model, mode=mode, state_dtype=torch.bfloat16)
        for ewc in (exact, compact):
            for anchors, fisher in tasks:
                ewc.load_importance(anchors, fisher)
        assert all(t.dtype == torch.bfloat16 for t in compact.anchors + compact.fisher)
        relative = abs(compact.penalty().item() - exact.penalty().item()) / exact.penalty().item()
        assert relative < 1e-2, (mode, relative)


def test_apply_and_penalty_give_the_same_gradients(fused_backend):
    model = tiny_mlp(device=device_of(fused_backend))
    ewc = ff.EWC(model, lam=2.0, backend=fused_backend)
    ewc.consolidate(batches(), F.cross_entropy, progress=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.zero_grad()
    ewc.penalty().backward()
    from_autograd = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ewc.apply_()
    for p, g in zip(model.parameters(), from_autograd):
        assert_close(p.grad, g)


def test_penalty_before_consolidation_is_zero_and_changes_nothing():
    model = tiny_mlp()
    ewc = ff.EWC(model)
    assert ewc.penalty().item() == 0.0
    assert ewc.apply_().item() == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_changed_parameter_shape_is_named():
    model = tiny_mlp()
    ewc = ff.EWC(model)
    ewc.consolidate(batches(), F.cross_entropy, progress=False)
    model[2].bias.data = torch.zeros(CLASSES + 1)
    with pytest.raises(ValueError, match=r"parameter '2.bias' has shape \(4,\) but was consolidated with shape \(3,\)"):
        ewc.penalty()


def test_bad_arguments():
    model = tiny_mlp()
    with pytest.raises(ValueError, match="unknown mode"):
        ff.EWC(model, mode="joint")
    with pytest.raises(TypeError, match="state_dtype"):
        ff.EWC(model, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="lam"):
        ff.EWC(model, lam=-1)
    with pytest.raises(ValueError, match="decay applies to the online mode"):
        ff.EWC(model, mode="separate", decay=0.9)
    ewc = ff.EWC(model)
    anchors, fisher = random_task(model, 0)
    with pytest.raises(ValueError, match="fisher has 3 tensors but 4 parameters"):
        ewc.load_importance(anchors, fisher[:3])
    with pytest.raises(ValueError, match=r"anchors for '0.bias' has shape \(7,\)"):
        ewc.load_importance([anchors[0], torch.zeros(7), *anchors[2:]], fisher)
    with pytest.raises(ValueError, match="finite and >= 0"):
        ewc.load_importance(anchors, [-f for f in fisher])
    assert ewc.tasks == 0
    listed = ff.EWC(list(model.named_parameters()))
    with pytest.raises(ValueError, match="pass consolidate"):
        listed.consolidate(batches(), F.cross_entropy)
    listed.consolidate(batches(), F.cross_entropy, model=model, progress=False)
    assert listed.tasks == 1


# ---------------------------------------------------------------------------------------------------------- state


def saved_and_loaded(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", ["online", "separate"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_state_dict_round_trip_is_bitwise(mode, state_dtype):
    model = tiny_mlp()
    ewc = ff.EWC(model, mode=mode, state_dtype=state_dtype)
    for seed in range(2):
        ewc.load_importance(*random_task(model, seed))
    restored = ff.EWC(model, mode=mode, state_dtype=state_dtype)
    restored.load_state_dict(saved_and_loaded(ewc.state_dict()))
    assert restored.tasks == 2 and restored.constant == ewc.constant
    assert all(torch.equal(a, b) for a, b in zip(restored.anchors + restored.fisher, ewc.anchors + ewc.fisher))
    assert torch.equal(restored.penalty(), ewc.penalty())
    ewc.load_importance(*random_task(model, 5))  # they go on identically
    restored.load_importance(*random_task(model, 5))
    assert torch.equal(restored.penalty(), ewc.penalty())


def test_state_dict_mismatches_are_named_and_load_nothing():
    model = tiny_mlp()
    ewc = ff.EWC(model)
    ewc.load_importance(*random_task(model, 0))
    state = ewc.state_dict()
    other = ff.EWC(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, CLASSES + 1)))
    with pytest.raises(ValueError, match=r"anchor of '2.weight' has shape \(3, 6\) but the parameter \(4, 6\)"):
        other.load_state_dict(state)
    renamed = ff.EWC([("first." + n, p) for n, p in model.named_parameters()])
    with pytest.raises(ValueError, match=r"parameter 0 is 'first.0.weight' here but '0.weight' in the state"):
        renamed.load_state_dict(state)
    with pytest.raises(ValueError, match="saved in 'online' mode"):
        ff.EWC(model, mode="separate").load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        ff.EWC(model).load_state_dict({"mode": "online"})
    assert other.tasks == renamed.tasks == 0 and other.anchors == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tasks=1.5), "tasks is 1.5"),
        (dict(tasks=-1), "tasks is -1"),
        (dict(constant=-2.0), "constant is -2.0"),
        (dict(constant=float("nan")), "constant is nan"),
        (dict(constant=5.0), "nonzero constant belongs to the separate mode"),
        ("nan_fisher", "not finite and >= 0"),
        ("int_anchor", "anchor of '0.weight' in the state is not a floating point tensor"),
    ],
    ids=str,
)
def test_corrupt_state_is_rejected_and_loads_nothing(change, message):
    model = tiny_mlp()
    source, target = ff.EWC(model), ff.EWC(model)
    source.load_importance(*random_task(model, 0))
    target.load_importance(*random_task(model, 1))
    before = target.state_dict()
    state = source.state_dict()
    if change == "nan_fisher":
        state["fisher"][1] = torch.full_like(state["fisher"][1], float("nan"))
    elif change == "int_anchor":
        state["anchors"][0] = state["anchors"][0].long()
    else:
        state.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        target.load_state_dict(state)
    after = target.state_dict()
    assert after["tasks"] == before["tasks"] and after["constant"] == before["constant"]
    assert all(
        torch.equal(a, b) for a, b in zip(after["anchors"] + after["fisher"], before["anchors"] + before["fisher"])
    )


def test_state_without_tasks_round_trips():
    model = tiny_mlp()
    restored = ff.EWC(model)
    restored.load_importance(*random_task(model, 0))
    empty = ff.EWC(model, state_dtype=torch.bfloat16).state_dict()
    # zero tensors shaped like the parameters: a template for torch.distributed.checkpoint to load into
    for a, f, p in zip(empty["anchors"], empty["fisher"], model.parameters()):
        assert a.shape == f.shape == p.shape and a.dtype == f.dtype == torch.bfloat16
        assert not a.any() and not f.any()
    restored.load_state_dict(saved_and_loaded(empty))
    assert restored.tasks == 0 and restored.anchors == [] and restored.penalty().item() == 0.0


def test_state_dict_loads_onto_the_parameters_device():
    model = tiny_mlp()
    ewc = ff.EWC(model)
    ewc.load_importance(*random_task(model, 0))
    device = "cuda" if torch.cuda.is_available() else "meta"  # meta: a real second device type without a GPU
    elsewhere = ff.EWC(tiny_mlp().to(device), state_dtype=torch.bfloat16)
    elsewhere.load_state_dict(saved_and_loaded(ewc.state_dict()))
    assert all(t.device.type == device and t.dtype == torch.bfloat16 for t in elsewhere.anchors + elsewhere.fisher)
    if device == "cuda":
        assert torch.equal(elsewhere.anchors[0].cpu(), ewc.anchors[0].bfloat16())


def test_backends_agree_on_consolidation():
    results = []
    for backend in FUSED_BACKENDS + ["reference"]:
        model = tiny_mlp(device=device_of(backend))
        ewc = ff.EWC(model, backend=backend)
        ewc.consolidate(batches(), F.cross_entropy, progress=False)
        results.append([f.cpu() for f in ewc.fisher])
    for fisher in results[1:]:
        for a, b in zip(fisher, results[0]):
            assert_close(a, b)


def test_penalty_and_apply_compile_fullgraph():
    model = tiny_mlp()
    ewc = ff.EWC(model, lam=0.5, mode="separate")
    for seed in range(2):
        ewc.load_importance(*random_task(model, seed))
    x, y = batches((4,))[0]

    def loss_fn():
        return F.cross_entropy(model(x), y) + ewc.penalty()

    expected = loss_fn()
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")()
    got.backward()
    assert_close(got.detach(), expected.detach())
    for p, e in zip(model.parameters(), expected_grads):
        assert_close(p.grad, e)
    model.zero_grad(set_to_none=True)
    applied = torch.compile(ewc.apply_, fullgraph=True, backend="aot_eager")()
    assert_close(applied, ewc.penalty().detach())
    penalty_grads = torch.autograd.grad(ewc.penalty(), list(model.parameters()))
    for p, e in zip(model.parameters(), penalty_grads):
        assert_close(p.grad, e)


def test_consolidate_on_an_empty_loader_changes_nothing():
    model = tiny_mlp()
    ewc = ff.EWC(model)
    ewc.load_importance(*random_task(model, 0))
    before = [t.clone() for t in ewc.anchors + ewc.fisher]
    with pytest.raises(ValueError, match="no batches"):
        ewc.consolidate([], F.cross_entropy, progress=False)
    assert ewc.tasks == 1
    assert all(torch.equal(a, b) for a, b in zip(ewc.anchors + ewc.fisher, before))
