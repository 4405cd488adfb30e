"""MoFO in ProtectedAdamW (mofo_fraction): many-step runs against a plain reimplementation of the authors'
AdamW_MoFO (torch.topk per tensor), with EWC and SI in the oracle, protection against the reference backend;
the thresholds bitwise against torch.topk on every backend (ties, zeros, k = 0, fp32/fp64; the CPU's sampled
bracket also where its sample misses); the ops against their references (Triton under the interpreter, tiny);
the fused step's lr-0 pass, which leaves theta unwritten; bf16 params; skipped steps; state dicts; bad input;
FSDP2 (2 gloo ranks). The CUDA kernels run in tests/test_cuda_emulator.py."""

import math

import pytest
import torch
from conftest import FUSED_BACKENDS
from distributed_utils import run_ranks
from test_distributed import LAM as LAM_DIST
from test_distributed import full, importance_task, mlp, sharded_mlp
from test_optim import attach, groups_of, make_model, set_grads, snapshot, step_with_scaler_flags
from test_optim_fsdp import phases, train
from test_optim_fsdp import snapshot as fsdp_snapshot

import fastforget as ff
from fastforget.ops import mofo as mofo_ops
from fastforget.ops.mofo import mofo_thresholds, mofo_update, mofo_update_ref, threshold_values
from fastforget.ops.protected_adamw_step import protected_adamw_step_ref, run_protected_adamw_step
from fastforget.testing import assert_close

BACKENDS = [b for b in FUSED_BACKENDS if b != "triton"] + ["reference"]  # triton: briefly, below
LR, WD, BETAS, EPS = 1e-2, 0.05, (0.9, 0.999), 1e-8


def topk_threshold(m, k):
    """The reference's threshold: torch.topk(|m|, k)[0].min(); +inf for k = 0 (where the reference raises)."""
    return torch.topk(m.abs().reshape(-1), k)[0].min() if k else torch.tensor(math.inf, dtype=m.dtype)


class PlainMoFO:
    """AdamW_MoFO's step, written out per tensor in fp32 (params kept in their dtype): decay, moments, then the
    Adam update of the elements with |m_new| >= the k-th largest |m_new| (k = int(numel fraction)) in tensors of
    2+ dimensions, of every element elsewhere. ewc: add 2 lam F (theta - anchor) to the gradient; si: omega -=
    g (theta_new - theta_old)."""

    def __init__(self, params, fraction, ewc=None, si=None, lrs=None, wds=None):
        self.params, self.fraction, self.ewc, self.si = list(params), fraction, ewc, si
        self.lrs, self.wds = lrs, wds
        self.m = [torch.zeros(p.shape) for p in self.params]
        self.v = [torch.zeros(p.shape) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = BETAS
        for i, p in enumerate(self.params):
            lr, wd = self.lrs[i], self.wds[i]
            g = p.grad.float()
            if self.ewc is not None:
                g = g + 2 * self.ewc.lam * self.ewc.fisher[i].float() * (p.float() - self.ewc.anchors[i].float())
            old = p.float().clone()  # p.float() is p itself for fp32
            theta = old * (1 - lr * wd)
            self.m[i].lerp_(g, 1 - b1)
            self.v[i].mul_(b2).addcmul_(g, g, value=1 - b2)
            h = self.v[i].sqrt() / math.sqrt(1 - b2**self.t) + EPS
            m = self.m[i]
            if p.dim() >= 2:
                m = torch.where(m.abs() >= topk_threshold(m, int(p.numel() * self.fraction)), m, 0)
            p.copy_(theta - (lr / (1 - b1**self.t)) * m / h)
            if self.si is not None:
                self.si.omega[i].sub_(p.grad.float() * (p.float() - old))


def lrs_wds(model):
    groups = groups_of(model)
    lrs = [g.get("lr", LR) for g in groups for _ in g["params"]]
    return lrs, [g.get("weight_decay", WD) for g in groups for _ in g["params"]]


def run_ours(dtype, backend, fraction, combination, steps):
    model = make_model(dtype)
    parts = attach(model, combination)
    opt = ff.optim.ProtectedAdamW(
        groups_of(model), lr=LR, weight_decay=WD, backend=backend, mofo_fraction=fraction, **parts
    )
    history = []
    for step in range(steps):
        set_grads(model, step)
        before = snapshot(opt, parts)
        step_with_scaler_flags(opt, step)
        after = snapshot(opt, parts)
        if step == 9:  # test_optim's INF_STEP: a skipped step changes nothing, bitwise
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        history.append(after)
    return model, opt, parts, history


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("combination", [{}, {"ewc": True, "si": True}], ids=str)
@pytest.mark.parametrize("fraction", [0.15, 1.0])
def test_matches_plain_adamw_mofo(backend, combination, fraction):
    steps = 20
    model, opt, parts, _ = run_ours(torch.float32, backend, fraction, combination, steps)
    twin = make_model(torch.float32)
    twin_parts = attach(twin, combination)
    plain = PlainMoFO(twin.parameters(), fraction, twin_parts.get("ewc"), twin_parts.get("si"), *lrs_wds(twin))
    for step in range(steps):
        set_grads(twin, step)
        if step != 9:  # the inf step is skipped by ours
            plain.step()
    for p, q, m, v in zip(model.parameters(), twin.parameters(), plain.m, plain.v):
        assert_close(p, q, torch.float32)
        assert_close(opt.state[p]["exp_avg"], m, torch.float32)
        assert_close(opt.state[p]["exp_avg_sq"], v, torch.float32)
    if "si" in parts:
        for a, b in zip(parts["si"].omega, twin_parts["si"].omega):
            assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("protector", ["tensor", "element"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_with_protection_matches_reference_backend(backend, protector, dtype):
    combination = {"ewc": True, "protector": protector, "si": True}
    *_, want = run_ours(dtype, "reference", 0.2, combination, 12)
    *_, got = run_ours(dtype, backend, 0.2, combination, 12)
    for step, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            assert_close(a, b, dtype if a.dtype == dtype else torch.float32), step


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton backend unavailable")
def test_triton_matches_reference_briefly():
    combination = {"ewc": True, "protector": "element", "si": True}
    *_, want = run_ours(torch.float32, "reference", 0.2, combination, 3)
    *_, got = run_ours(torch.float32, "triton", 0.2, combination, 3)
    for a, b in zip(got[-1], want[-1]):
        assert_close(a, b, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_params_match_plain(backend):
    model, *_ = run_ours(torch.bfloat16, backend, 0.15, {}, 6)
    twin = make_model(torch.bfloat16)
    plain = PlainMoFO(twin.parameters(), 0.15, lrs=lrs_wds(twin)[0], wds=lrs_wds(twin)[1])
    for step in range(6):
        set_grads(twin, step)
        plain.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, torch.bfloat16)


def tensors_with_ties(dtype):
    gen = torch.Generator().manual_seed(3)
    return [
        torch.randn(37, 11, generator=gen, dtype=dtype),
        torch.randint(-3, 4, (501,), generator=gen).to(dtype) * 0.25,  # many ties, zeros, both signs
        torch.zeros(64, dtype=dtype),
        torch.full((5, 5), -2.5, dtype=dtype),
        torch.randn(70_000, generator=gen, dtype=dtype) * 1e-30,  # more than one CPU chunk, tiny values
        torch.tensor([float("inf"), -1.0, 0.0, -0.0], dtype=dtype),
        torch.randn(3, generator=gen, dtype=dtype),
    ]


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("fraction", [1e-3, 0.15, 1.0])
def test_threshold_is_topk_bitwise(backend, dtype, fraction):
    tensors = tensors_with_ties(dtype)
    ks = torch.tensor([int(t.numel() * fraction) for t in tensors])
    got = threshold_values(mofo_thresholds(tensors, ks, backend=backend), dtype)
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    for t, k, value in zip(tensors, ks.tolist(), got):
        assert value.view(bits) == topk_threshold(t, k).view(bits), (t.shape, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_all_update_and_k0_only_decays(backend):
    w = torch.nn.Parameter(torch.ones(4, 4))
    tiny = torch.nn.Parameter(torch.ones(2, 3))  # int(6 * 0.1) = 0: no Adam update, the decay applies
    opt = ff.optim.ProtectedAdamW([w, tiny], lr=0.1, weight_decay=0.5, mofo_fraction=0.1, backend=backend)
    w.grad = torch.zeros(4, 4)
    w.grad[0, :3] = 1.0  # k = int(16 * 0.1) = 1: the threshold is |m| of these three tied elements
    tiny.grad = torch.ones(2, 3)
    opt.step()
    decayed = 1 - 0.1 * 0.5
    updated = decayed - 0.1 * 1.0 / (1.0 + 1e-8)  # the first Adam step moves by lr (m / sqrt(v) = 1)
    want = torch.full((4, 4), decayed)
    want[0, :3] = updated
    assert_close(w.detach(), want, torch.float32)
    assert torch.equal(tiny.detach(), torch.full((2, 3), decayed))
    assert torch.equal(opt.state[tiny]["exp_avg"], torch.full((2, 3), 0.1))  # the moments still update


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_ndim_configures_which_tensors_are_filtered(backend):
    torch.manual_seed(0)
    bias = torch.nn.Parameter(torch.randn(400))
    for min_ndim, filtered in ((2, False), (1, True)):
        p = torch.nn.Parameter(bias.detach().clone())
        opt = ff.optim.ProtectedAdamW([p], mofo_fraction=0.1, mofo_min_ndim=min_ndim, backend=backend)
        p.grad = torch.randn(400)
        opt.step()
        moved = (p.detach() != bias.detach() * (1 - 1e-3 * 1e-2)).sum().item()
        assert moved == (40 if filtered else 400)


def test_state_dicts_keep_the_moments_and_the_setting():
    model = make_model(torch.float32)
    opt = ff.optim.ProtectedAdamW(groups_of(model), lr=LR, mofo_fraction=0.2)
    set_grads(model, 0)
    opt.step()
    saved = opt.state_dict()
    assert [g["mofo_fraction"] for g in saved["param_groups"]] == [0.2, 0.2]
    torch_opt = torch.optim.AdamW(groups_of(make_model(torch.float32)), lr=LR)
    torch_opt.load_state_dict(saved)  # extra group keys are carried along by torch
    fresh = ff.optim.ProtectedAdamW(groups_of(make_model(torch.float32)), lr=LR, mofo_fraction=0.3)
    fresh.load_state_dict(torch.optim.AdamW(groups_of(make_model(torch.float32)), lr=LR).state_dict())
    assert [g["mofo_fraction"] for g in fresh.param_groups] == [0.3, 0.3]  # torch's state dict has none
    fresh.load_state_dict(saved)
    assert [g["mofo_fraction"] for g in fresh.param_groups] == [0.2, 0.2]
    for p, q in zip(opt.param_groups[0]["params"], fresh.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"mofo_fraction": 0.0}, ValueError),
        ({"mofo_fraction": 1.5}, ValueError),
        ({"mofo_fraction": -0.1}, ValueError),
        ({"mofo_fraction": float("nan")}, ValueError),
        ({"mofo_fraction": True}, TypeError),
        ({"mofo_fraction": 0.1, "mofo_min_ndim": -1}, ValueError),
        ({"mofo_fraction": 0.1, "eps": 0.0}, ValueError),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(kwargs, error):
    with pytest.raises(error, match="mofo_fraction|mofo_min_ndim"):
        ff.optim.ProtectedAdamW(make_model(torch.float32).parameters(), **kwargs)
    model = make_model(torch.float32)
    opt = ff.optim.ProtectedAdamW(model.parameters(), mofo_fraction=0.1)
    set_grads(model, 0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0].update(kwargs)
    with pytest.raises(error, match="mofo_fraction|mofo_min_ndim"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.state or all(not s or torch.equal(s["step"], torch.zeros(())) for s in opt.state.values())


def build_fsdp_case(model):
    ewc = ff.EWC(model, LAM_DIST)
    ewc.load_importance(*importance_task(mlp()))
    si = ff.SynapticIntelligence(model, xi=1e-3)
    return ff.optim.ProtectedAdamW(model.parameters(), lr=0.05, weight_decay=0.1, ewc=ewc, si=si, mofo_fraction=0.3)


def fsdp_mofo_scenario(rank, world_size):
    first, second = phases(rank)
    model = sharded_mlp()
    optimizer = build_fsdp_case(model)
    result = {"run": {"penalties": torch.stack(train(model, optimizer, first + second)), **fsdp_snapshot(optimizer)}}
    moments = [optimizer.state[p]["exp_avg"] for p in model.parameters() if p.dim() >= 2]
    ks = torch.tensor([int(m.numel() * 0.3) for m in moments])
    local = [m.to_local() for m in moments]
    result["thresholds"] = mofo_thresholds(local, ks, process_group=optimizer.process_group)
    result["moments"] = [full(m) for m in moments]
    return result


def test_fsdp2_threshold_is_over_the_whole_tensor(tmp_path):
    """2 gloo ranks, FSDP2 (uneven shards): the run equals the single-process one (fp32 reduction-order tolerance)
    and the sharded select equals torch.topk over the full moment, bitwise."""
    results = run_ranks(fsdp_mofo_scenario, tmp_path, timeout=240)
    model = mlp()
    optimizer = build_fsdp_case(model)
    expected = {"penalties": torch.stack(train(model, optimizer, sum(phases(), []))), **fsdp_snapshot(optimizer)}
    for result in results:
        torch.testing.assert_close(result["run"], expected, rtol=1e-5, atol=1e-6)
        values = threshold_values(result["thresholds"], torch.float32)
        for m, value in zip(result["moments"], values):
            assert value.view(torch.int32) == topk_threshold(m, int(m.numel() * 0.3)).view(torch.int32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_histogram_pass_matches_its_reference(backend, dtype):
    """The pass FSDP2 runs per rank (the one-process select is one op): every digit of every pass, both kernels."""
    tensors = tensors_with_ties(dtype)
    prefix = torch.zeros(len(tensors), dtype=torch.int64)
    for shift, digit_bits in mofo_ops._digits(tensors):
        got = mofo_ops.mofo_histogram(tensors, prefix, shift, digit_bits, backend)
        want = mofo_ops.mofo_histogram_ref(tensors, prefix, shift, digit_bits)
        assert torch.equal(got, want)
        prefix = (prefix << digit_bits) + want.argmax(1)  # follow the fullest bin down


RUN, RUNS = 16, 256  # csrc/cpu/mofo.cpp's kRun, kRuns
SAMPLE = RUN * RUNS


def sample_positions(n):
    """csrc/cpu/mofo.cpp's sample: run_start(j, n) + 0 .. RUN - 1 for every run j (a hashed run in each stratum)."""
    stratum = n // RUNS
    hashed = torch.tensor([((j * 0x9E3779B97F4A7C15) % 2**64) >> 40 for j in range(RUNS)], dtype=torch.int64)
    starts = torch.arange(RUNS) * stratum + hashed % (stratum - RUN + 1) // RUN * RUN
    return (starts[:, None] + torch.arange(RUN)).reshape(-1)


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="C++ kernels unavailable")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_select_where_the_sample_misses(dtype):
    """A moment whose sampled elements are exactly its largest: the bracket the sample gives misses the k-th largest
    (too few elements inside it, or too many above it), and the CPU select takes the radix passes instead."""
    gen = torch.Generator().manual_seed(5)
    n = 70_000
    fooled = torch.randn(n, generator=gen, dtype=dtype)
    fooled[sample_positions(n)] = 100 + torch.rand(SAMPLE, generator=gen, dtype=dtype)
    above = torch.randn(n, generator=gen, dtype=dtype)
    above[sample_positions(n)] = 1e-3 * torch.rand(SAMPLE, generator=gen, dtype=dtype)  # the sample: all tiny
    tensors = [fooled, above, torch.randn(n, generator=gen, dtype=dtype)]  # the last: a bracket that holds
    for fraction in (0.01, 0.15, 0.9):
        ks = torch.tensor([int(n * fraction)] * len(tensors))
        got = threshold_values(mofo_thresholds(tensors, ks, backend="cpu"), dtype)
        bits = torch.int64 if dtype == torch.float64 else torch.int32
        for t, k, value in zip(tensors, ks.tolist(), got):
            assert value.view(bits) == topk_threshold(t, k).view(bits), (fraction, k)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("with_si", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_update_op_matches_its_reference(backend, with_si, dtype):
    """mofo_update alone (odd sizes, a list, thresholds from torch.topk, k = 0, SI, grad_scale, maximize)."""
    gen = torch.Generator().manual_seed(1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    shapes = [(37, 11), (5,), (2, 3), (1030,)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    exp_avg = [torch.randn(s, generator=gen, dtype=acc) for s in shapes]
    exp_avg_sq = [torch.rand(s, generator=gen, dtype=acc) for s in shapes]
    steps = [torch.tensor(4.0) for _ in shapes]
    ks = torch.tensor([int(m.numel() * 0.2) for m in exp_avg])  # (2, 3): k = 1; (5,): k = 1
    ks[2] = 0
    thresholds = mofo_thresholds(exp_avg, ks, backend="reference")
    omega = [torch.randn(s, generator=gen, dtype=acc) for s in shapes] if with_si else []

    def run(update):
        p, w = [t.clone() for t in params], [t.clone() for t in omega]
        update(p, exp_avg, exp_avg_sq, steps, thresholds, grads, w, torch.tensor(4.0), None, 0.1, 0.9, 0.999,
               1e-8, 0.05, True)  # fmt: skip
        return p + w

    got = run(lambda *args: mofo_update(*args, backend=backend))
    want = run(mofo_update_ref)
    if backend == "triton" and dtype == torch.bfloat16 and with_si:
        # the interpreter rounds fp32 -> bf16 toward zero (compiled kernels: to nearest even): omega follows the
        # params the kernel stored, g_task = -g / 4 (maximize, grad_scale 4)
        new_params = got[: len(shapes)]
        want[len(shapes) :] = [
            w + g.to(acc) / 4 * (q.to(acc) - p.to(acc)) for w, g, q, p in zip(omega, grads, new_params, params)
        ]
    for a, b in zip(got, want):
        assert_close(a, b, dtype if a.dtype == dtype else acc)
    assert_close(got[2], (params[2].to(acc) * (1 - 0.1 * 0.05)).to(dtype), dtype)  # k = 0: the decay alone


@pytest.mark.skipif("cpu" not in FUSED_BACKENDS, reason="C++ kernels unavailable")
@pytest.mark.parametrize("ewc", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lr0_pass_leaves_theta_as_the_reference(ewc, dtype):
    """MoFO's first pass (the fused step with lr 0, no SI), where the CPU kernel neither writes theta nor, without
    EWC, reads it: theta is unchanged bitwise, also where a non-finite gradient makes 0 * step NaN (that tile is
    written, as by any step: NaN where the reference has it); moments, steps and penalty as the reference."""
    gen = torch.Generator().manual_seed(2)
    shapes = [(3000,), (70, 50)]
    params = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    grads[1][10, 3] = math.inf
    anchors = [p.detach().clone().add_(0.1) for p in params] if ewc else []
    fisher = [torch.rand(s, generator=gen).to(dtype) for s in shapes] if ewc else []

    def run(step):
        p = [t.clone() for t in params]
        m = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in shapes]
        v = [torch.rand(s, generator=torch.Generator().manual_seed(4)) for s in shapes]
        k = [torch.tensor(2.0) for _ in shapes]
        penalty = step(p, grads, m, v, k, anchors, fisher, None, [], [], None, None, [], None, None, 0.0, 0.9, 0.999,
                       1e-8, 0.05, 0.5, 0.1, False)  # fmt: skip
        return [penalty, *p, *m, *v, *k]

    got = run(lambda *args: run_protected_adamw_step(*args, backend="cpu"))
    want = run(protected_adamw_step_ref)
    assert torch.equal(got[1], params[0])  # theta unchanged, bitwise
    nan = want[2].isnan()  # 0 * step of the non-finite moment
    assert nan.sum() == 1 and torch.equal(got[2].isnan(), nan) and torch.equal(got[2][~nan], params[1][~nan])
    for a, b in zip(got[3:], want[3:]):
        assert_close(a, b, torch.float32)  # the moments (the kernel's FMA contractions: not bitwise)
    assert_close(got[0], want[0], torch.float32)
