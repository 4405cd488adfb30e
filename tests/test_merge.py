"""ff.wise_ft and ff.fisher_merge on whole models (plain, EWC, fastforget LoRA, PEFT LoRA) against fp64 formulas."""

import copy

import pytest
import torch
from conftest import FUSED_BACKENDS

import fastforget as ff
from fastforget import distributed as dist_util
from fastforget.testing import assert_close

BACKENDS = FUSED_BACKENDS + ["reference"]


def make_model(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).to(dtype)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_unchanged(model, before):
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wise_ft_formula(backend, dtype, alpha):
    base, model = make_model(0, dtype), make_model(1, dtype)
    tuned = params_of(model)
    ff.wise_ft(model, base.state_dict(), alpha, backend=backend)
    for n, p in model.named_parameters():
        expected = (1 - alpha) * base.state_dict()[n].double() + alpha * tuned[n].double()
        assert_close(p, expected.to(dtype), dtype=dtype)
    if alpha == 0.0:
        assert all(torch.equal(p, base.state_dict()[n]) for n, p in model.named_parameters())


def test_wise_ft_from_a_module_and_from_ewc():
    base, model = make_model(0, torch.bfloat16), make_model(1, torch.bfloat16)
    ewc = ff.EWC(model, state_dtype=torch.float32)
    ewc.load_importance([p.detach().float() for p in base.parameters()], [torch.ones_like(p).float()
                                                                          for p in base.parameters()])  # fmt: skip
    from_ewc, from_module = copy.deepcopy(model), copy.deepcopy(model)
    ff.wise_ft(from_ewc, ewc, 0.25)  # the EWC object was built on `model`: its names are the same
    ff.wise_ft(from_module, base, 0.25)
    for a, b in zip(from_ewc.parameters(), from_module.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "alpha, error", [(1.5, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.5", TypeError)]
)
def test_wise_ft_bad_alpha_changes_nothing(alpha, error):
    base, model = make_model(0), make_model(1)
    before = params_of(model)
    with pytest.raises(error, match="alpha"):
        ff.wise_ft(model, base.state_dict(), alpha)
    assert_unchanged(model, before)


def test_wise_ft_mismatched_base_changes_nothing():
    base, model = make_model(0), make_model(1)
    before = params_of(model)
    state = base.state_dict()
    with pytest.raises(ValueError, match=r"base has no entry '2.bias'"):
        ff.wise_ft(model, {k: v for k, v in state.items() if k != "2.bias"}, 0.5)
    with pytest.raises(ValueError, match=r"base\['2.weight'\] has shape \(3, 4\); expected \(3, 5\)"):
        ff.wise_ft(model, {**state, "2.weight": torch.zeros(3, 4)}, 0.5)
    with pytest.raises(ValueError, match="base is needed"):
        ff.wise_ft(model, None, 0.5)
    with pytest.raises(ValueError, match="nothing consolidated"):
        ff.wise_ft(model, ff.EWC(model), 0.5)
    assert_unchanged(model, before)


def test_wise_ft_fastforget_lora_scales_the_adapters():
    torch.manual_seed(0)
    model = ff.apply_lora(make_model(0), target_modules=["0", "2"], r=2, alpha=4)
    for _, module in ff.lora.lora_modules(model):
        torch.nn.init.normal_(module.lora_B)
    x = torch.randn(4, 7)
    with ff.lora_disabled(model):
        y_base = model(x).double()
    y_tuned = model(x).double()
    # the network is not linear in its weights, so compare the merged weights: W0 + 0.3 * scale * B A
    expected = {name: m.linear_weight().double() + 0.3 * m.scale * (m.lora_B.double() @ m.lora_A.double())
                for name, m in ff.lora.lora_modules(model)}  # fmt: skip
    ff.wise_ft(model, alpha=0.3)
    assert not torch.allclose(model(x).double(), y_tuned) and not torch.allclose(model(x).double(), y_base)
    ff.merge_lora(model)
    for name, weight in expected.items():
        assert_close(model.get_submodule(name).weight, weight.float())


def test_wise_ft_peft_lora_scales_the_adapters():
    peft = pytest.importorskip("peft")
    base = make_model(0)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    tuned = copy.deepcopy(model).merge_and_unload()
    ff.wise_ft(model, alpha=0.4)
    merged = model.merge_and_unload()
    for p, p_base, p_tuned in zip(merged.parameters(), base.parameters(), tuned.parameters()):
        assert_close(p, (0.6 * p_base.double() + 0.4 * p_tuned.double()).float())


def test_wise_ft_refuses_a_merged_adapter():
    model = ff.apply_lora(make_model(0), target_modules=["0", "2"], r=2)
    model[0].merge()
    before = params_of(model)
    with pytest.raises(ValueError, match="'0' is merged"):
        ff.wise_ft(model, alpha=0.5)
    assert_unchanged(model, before)


def test_wise_ft_lora_with_other_trainable_parameters_needs_base():
    model = ff.apply_lora(make_model(0), target_modules=["0"], r=2)
    model[2].weight.requires_grad_(True)  # a fully trained head beside the adapter
    before = params_of(model)
    with pytest.raises(ValueError, match=r"base is needed .*'2.weight'"):
        ff.wise_ft(model, alpha=0.5)
    assert_unchanged(model, before)
    head = make_model(5)[2]
    ff.wise_ft(model, {"2.weight": head.weight, "2.bias": head.bias}, 0.5)
    assert_close(model[2].weight, (0.5 * head.weight.double() + 0.5 * before["2.weight"].double()).float())


def fisher_formula(thetas, fishers, weights, floors):
    scaled = [w * f.double().clamp_min(fl) for w, f, fl in zip(weights, fishers, floors)]
    return sum(s * t.double() for s, t in zip(scaled, thetas)) / sum(scaled)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("favor_first", [True, False])
def test_fisher_merge_formula(backend, favor_first):
    models = [make_model(k) for k in range(3)]
    fishers = [{n: torch.rand_like(p) * (p.abs() > 0.1) for n, p in m.named_parameters()} for m in models]
    thetas = [params_of(m) for m in models]
    weights = [0.5, 0.2, 0.3]
    ff.fisher_merge(models[0], models, weights, fishers, favor_first=favor_first, backend=backend)
    floors = [1e-6] + [0.0 if favor_first else 1e-6] * 2
    for n, p in models[0].named_parameters():
        expected = fisher_formula([t[n] for t in thetas], [f[n] for f in fishers], weights, floors)
        assert_close(p, expected.float())


def test_fisher_merge_ewc_sources_and_normalize():
    """An EWC object is a source with its own Fisher; normalize divides each weight by its Fisher's L2 norm."""
    models = [make_model(k, torch.bfloat16) for k in range(2)]
    target = make_model(9, torch.bfloat16)
    ewcs = []
    for m in models:
        ewc = ff.EWC(target)  # the state of `m` under the target's names (the same architecture)
        ewc.load_importance([p.detach().float() for p in m.parameters()],
                            [torch.rand_like(p.float()) * 3 for p in m.parameters()])  # fmt: skip
        ewcs.append(ewc)
    ff.fisher_merge(target, ewcs, [0.5, 0.5], normalize=True)
    norms = [torch.cat([f.flatten() for f in e.fisher]).norm().item() for e in ewcs]
    for i, p in enumerate(target.parameters()):
        expected = fisher_formula([e.anchors[i] for e in ewcs], [e.fisher[i] for e in ewcs],
                                  [0.5 / norms[0], 0.5 / norms[1]], [1e-6, 0.0])  # fmt: skip
        assert_close(p, expected.bfloat16(), dtype=torch.bfloat16)


def test_fisher_merge_without_fishers_is_the_weighted_average():
    models = [make_model(k) for k in range(3)]
    thetas = [params_of(m) for m in models]
    target = make_model(7)
    ff.fisher_merge(target, [m.state_dict() for m in models], [1.0, 2.0, 1.0])
    for n, p in target.named_parameters():
        assert_close(p, ((thetas[0][n].double() + 2 * thetas[1][n].double() + thetas[2][n].double()) / 4).float())


def test_fisher_merge_unseen_parameters_keep_the_first_models_value():
    models = [make_model(k) for k in range(2)]
    first = params_of(models[0])
    zeros = [{n: torch.zeros_like(p) for n, p in m.named_parameters()} for m in models]
    ff.fisher_merge(models[0], models, fishers=zeros)
    for n, p in models[0].named_parameters():
        assert_close(p, first[n])


def test_fisher_merge_bad_input_changes_nothing():
    models = [make_model(k) for k in range(2)]
    fishers = [{n: torch.rand_like(p) for n, p in m.named_parameters()} for m in models]
    before = params_of(models[0])
    bad = {
        "weights_length": (dict(weights=[1.0]), ValueError, "weights must be a list of 2"),
        "weight_negative": (dict(weights=[1.0, -1.0]), ValueError, r"weights\[1\]"),
        "weights_zero": (dict(weights=[0.0, 0.0]), ValueError, "must not all be 0"),
        "fishers_length": (dict(fishers=fishers[:1]), ValueError, "fishers must be a list of 2"),
        "fisher_missing": (dict(fishers=[fishers[0], None]), ValueError, r"fishers\[1\] is None"),
        "fisher_name": (dict(fishers=[fishers[0], {**fishers[1], "0.weight": torch.ones(2)}]), ValueError,
                        r"fishers\[1\]\['0.weight'\] has shape"),
        "floor": (dict(fishers=fishers, fisher_floor=0.0), ValueError, "favor_first needs"),
        "floor_nan": (dict(fishers=fishers, fisher_floor=float("nan")), ValueError, "fisher_floor"),
        "normalize": (dict(fishers=fishers, normalize=1), TypeError, "normalize must be a bool"),
    }  # fmt: skip
    for kwargs, error, message in bad.values():
        with pytest.raises(error, match=message):
            ff.fisher_merge(models[0], models, **kwargs)
        assert_unchanged(models[0], before)
    other = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    with pytest.raises(ValueError, match=r"sources\[1\]\['0.weight'\] has shape \(6, 7\); expected \(5, 7\)"):
        ff.fisher_merge(models[0], [models[0], other])
    with pytest.raises(TypeError, match=r"sources\[1\] must be"):
        ff.fisher_merge(models[0], [models[0], [1, 2]])
    assert_unchanged(models[0], before)


def fsdp_merges(rank, world_size):
    """wise_ft and fisher_merge (weighted, favor_first, normalize) on an FSDP2-sharded model, each from the same
    full-tensor sources as the single-process run; sources include the sharded model itself (DTensors)."""
    from test_distributed import full, sharded_mlp

    base, tuned, fishers = merge_sources()
    results = {}
    for case, merge in MERGES.items():
        model = sharded_mlp()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(dist_util.shard_like(tuned[n], p))
        merge(model, base, fishers)
        results[case] = {n: full(p.detach()).clone() for n, p in model.named_parameters()}
    return results


def merge_sources():
    from test_distributed import mlp

    g = torch.Generator().manual_seed(3)
    base = {n: t.clone() for n, t in mlp().state_dict().items()}
    tuned = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    fishers = [{n: torch.rand(t.shape, generator=g) ** 3 for n, t in base.items()} for _ in range(2)]
    return base, tuned, fishers


MERGES = {
    "wise_ft": lambda model, base, fishers: ff.wise_ft(model, base, 0.3),
    "fisher_merge": lambda model, base, fishers: ff.fisher_merge(model, [model, base], [0.7, 0.3], fishers),
    "normalize": lambda model, base, fishers: ff.fisher_merge(
        model, [base, model], [0.5, 0.5], fishers, normalize=True, favor_first=False
    ),
}


def test_merges_under_fsdp2_equal_the_single_process_merge(tmp_path):
    from distributed_utils import run_ranks
    from test_distributed import mlp

    ranks = run_ranks(fsdp_merges, tmp_path)
    base, tuned, fishers = merge_sources()
    for case, merge in MERGES.items():
        model = mlp()
        model.load_state_dict(tuned)
        merge(model, base, fishers)
        for n, p in model.named_parameters():
            for rank in ranks:
                torch.testing.assert_close(rank[case][n], p.detach(), rtol=1e-6, atol=1e-7, msg=f"{case} {n}")
