"""The LM benchmark: a small Llama pre-trained on English prose (corpus A) forgets it when fine-tuned on Python
source (corpus B); every strategy fine-tunes through ``fastforget.transformers.ProtectedHFTrainer``.

Protocol (``LMConfig``; seeds fixed): pre-train on A (cached on disk, keyed by the configuration, the corpus and
the seed); then fine-tune on B in ``stages`` consecutive parts (the new domain arriving in chunks), each a fresh
``ff.optim.ProtectedAdamW`` under a constant learning rate, with the strategy's defences. Between A and B -- and
between the parts of B -- every strategy closes the task the same way (``trainer.end_task``: the EWC consolidates,
the buffer takes the examples), so ``ewc`` (one penalty per task) and ``online-ewc`` (one running Fisher anchored
at the latest parameters) differ from B's second part on. Held-out cross-entropy on A and B before fine-tuning,
and during it by ``fastforget.callbacks.ForgettingCallback`` (at the end of every stage; the last is "after").
"""

import copy
import hashlib
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastforget as ff
from fastforget.demo import lm_data

LM_STRATEGIES = ("finetune", "ewc", "online-ewc", "replay", "lora", "protect", "kl", "si", "combined", "dft", "asft",
                 "mofo", "wise-ft", "fisher-merge")  # fmt: skip
MERGES = ("wise-ft", "fisher-merge")  # fine-tune as finetune, then average weights with the pre-trained model
# the name of each swept strategy's setting (the table's and the plot's label)
SETTINGS = {"ewc": "λ", "kl": "λ", "mofo": "fraction", "wise-ft": "α", "fisher-merge": "w_B"}
SCENARIO = "lm/prose→code"
CACHE_VERSION = 1  # bump when pre-training changes in a way the key does not see


@dataclass
class LMConfig:
    hidden: int = 192  # LlamaForCausalLM: 4 layers of width 192, 4 heads, SwiGLU 512, tied embeddings: 1.8 M params
    layers: int = 4
    heads: int = 4
    intermediate: int = 512
    seq_len: int = 128  # bytes per sequence
    batch_size: int = 8
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3  # AdamW, 5 % linear warm-up, cosine decay
    steps: int = 48  # fine-tuning steps on B, in `stages` equal parts
    stages: int = 2
    lr: float = 1e-3  # fine-tuning: constant
    eval_sequences: int = 64  # held-out sequences of each corpus
    fisher_sequences: int = 32  # the empirical Fisher of each task (a random sample of its training sequences)
    ewc_lambda: float = 1e4  # the EWC penalty lam * sum F (theta - theta*)^2, F of the per-sequence mean loss
    ewc_estimator: str = "empirical"  # the Fisher of the EWC strategies and of fisher-merge (ff.fisher.ESTIMATORS)
    estimator_sweep: tuple = ()  # more estimators: ewc's lambda and its sweep again with each (their scales)
    kl_lambda: float = 1.0  # ff.anchored_lm_loss's kl_weight, to the pre-trained model
    si_c: float = 3.0  # SI's c (the EWC lam over the path-integral importance)
    sweep: tuple = (0.1, 10.0)  # extra multiples of ewc_lambda and kl_lambda for the trade-off curve
    state_bits: int = 32  # ProtectedAdamW's moments: 32 (fp32) or 8 (bitsandbytes' block-wise 8-bit)
    fisher_bits: int = 32  # the EWC strategies' Fisher: 32 (fp32, fp32 anchor) or 8 (block-wise 8-bit, bf16 anchor)
    mofo_fraction: float = 0.15  # ProtectedAdamW's mofo_fraction (Chen et al. recommend 0.05-0.2)
    mofo_sweep: tuple = (0.05, 0.5)
    wise_ft_alpha: float = 0.5  # WiSE-FT: (1 - alpha) theta_pretrained + alpha theta_finetuned
    wise_ft_sweep: tuple = (0.25, 0.75)
    merge_weight: float = 0.5  # fisher-merge: the fine-tuned model's weight w_B (the pre-trained one's: 1 - w_B)
    merge_sweep: tuple = (0.25, 0.75)
    replay_capacity: int = 1024  # sequences (reservoir over the stream: A's, then B's)
    replay_weight: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16
    probe_steps: int = 3  # timed steps of each backend per probe leg (after probe_warmup)
    probe_warmup: int = 1
    probe_legs: int = 2  # legs per backend, alternating fused / reference
    cache: str | None = None  # pre-trained models; None: $FASTFORGET_CACHE or ~/.cache/fastforget

    def cache_dir(self):
        return Path(self.cache or os.environ.get("FASTFORGET_CACHE") or Path.home() / ".cache" / "fastforget")


# ------------------------------------------------------------------------------------------------ the model


def make_model(config, seed, device):
    from fastforget.testing import import_installed_kernels_package

    import_installed_kernels_package()  # `python -m fastforget` from the repository root: its kernels/ on sys.path
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=lm_data.VOCAB, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
        max_position_embeddings=config.seq_len, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(model_config).to(device)


def pretrained_model(state, config, seed, device):
    model = make_model(config, seed, device)
    model.load_state_dict(state)
    return model


@torch.no_grad()
def cross_entropy(model, ids, batch_size):
    """Mean held-out cross-entropy (nats per byte) over every predicted token of the (n, seq_len) ids."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for first in range(0, len(ids), batch_size):
        batch = ids[first : first + batch_size].to(device)
        total += float(model(input_ids=batch, labels=batch).loss) * len(batch)
    model.train(was_training)
    return total / len(ids)


def evaluate(model, data, config):
    return {name: cross_entropy(model, corpus.held_out[: config.eval_sequences], config.batch_size)
            for name, corpus in zip("AB", data)}  # fmt: skip


def held_out_sets(data, config):
    """The evaluation sequences of A and B as datasets, for ForgettingCallback: the same ones `evaluate` reads."""
    return {name: lm_data.TokenDataset(corpus.held_out[: config.eval_sequences]) for name, corpus in zip("AB", data)}


# ------------------------------------------------------------------------------------------------ training


class _StepTimer:
    """A TrainerCallback: the wall time of every optimizer step (forward, backward, protections, clipping, step),
    and one progress-bar tick per step."""

    def __init__(self, bar=None):
        self.times, self.bar, self._start = [], bar, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)
        if self.bar is not None:
            self.bar.update(1)

    def __getattr__(self, name):  # every other callback event: nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def _trainer(model, dataset, steps, lr, config, seed, folder, device, parts=None, backend="auto", timer=None,
             schedule="constant", warmup=0):  # fmt: skip
    """A ProtectedHFTrainer over `dataset` for `steps` optimizer steps, with a fresh ProtectedAdamW that applies the
    parts' EWC, protector and SI (and MoFO's filter) inside its fused step."""
    from transformers import PrinterCallback, TrainingArguments, default_data_collator

    from fastforget.optim import ProtectedAdamW
    from fastforget.transformers import ProtectedHFTrainer

    parts = parts or {}
    args = TrainingArguments(
        output_dir=folder, per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=config.batch_size,
        max_steps=steps, learning_rate=lr, lr_scheduler_type=schedule, warmup_steps=warmup, weight_decay=0.0,
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=seed,
        data_seed=seed, use_cpu=torch.device(device).type == "cpu", dataloader_num_workers=0,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = ProtectedAdamW(
        params, lr=lr, weight_decay=0.0, ewc=parts.get("ewc"), protector=parts.get("protector"), si=parts.get("si"),
        mofo_fraction=parts.get("mofo_fraction"), backend=backend, state_bits=config.state_bits,
    )  # fmt: skip
    trainer = ProtectedHFTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
        optimizers=(optimizer, None), callbacks=[timer] if timer else None,
        ewc=parts.get("ewc") if parts.get("si") is None else None, replay=parts.get("replay"),
        protector=parts.get("protector"), replay_weight=config.replay_weight,
        ewc_estimator=parts.get("estimator", "empirical"), ewc_max_batches=parts.get("fisher_batches"),
        kl_to_base=parts.get("kl"), base_model=parts.get("base_model"), kl_backend=backend,
        loss_type=parts.get("loss_type", "nll"),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, once per trainer
    return trainer


def _cache_key(config, data, seed, device):
    fields = {k: v for k, v in asdict(config).items() if k in _PRETRAIN_FIELDS}
    import transformers

    blob = json.dumps([CACHE_VERSION, fields, data[0].digest, seed, torch.device(device).type,
                       transformers.__version__, torch.__version__.split("+")[0]], sort_keys=True)  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_PRETRAIN_FIELDS = ("hidden", "layers", "heads", "intermediate", "seq_len", "batch_size", "pretrain_steps",
                    "pretrain_lr")  # fmt: skip


def pretrain(config, data, seed, device, bar=None):
    """The model pre-trained on A, and its Synaptic Intelligence state (the path integral over pre-training), from
    the cache when there; returns (state_dict, si_state, seconds spent pre-training, cached)."""
    path = config.cache_dir() / f"lm-{_cache_key(config, data, seed, device)}.pt"
    if path.exists():
        _describe(bar, f"lm pre-training seed {seed}: loaded from the cache")
        saved = torch.load(path, weights_only=True)
        if bar is not None:
            bar.update(config.pretrain_steps)
        return saved["model"], saved["si"], saved["seconds"], True
    _describe(bar, f"lm pre-training seed {seed} (not cached yet)")
    model = make_model(config, seed, device)
    si = ff.SynapticIntelligence(model)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        steps = config.pretrain_steps
        trainer = _trainer(
            model, lm_data.TokenDataset(data[0].train), steps, config.pretrain_lr, config, seed, folder, device,
            parts={"si": si}, timer=_StepTimer(bar), schedule="cosine", warmup=max(1, steps // 20),
        )  # fmt: skip
        trainer.train()
    seconds = time.perf_counter() - start
    saved = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "si": si.state_dict(),
             "seconds": seconds}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)  # atomic: a killed run leaves no half-written cache
    return saved["model"], saved["si"], seconds, False


def _shuffled(ids, seed):
    return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]


def finetune_sets(config, data, seed):
    """B's training sequences of every stage (disjoint, drawn at random), and A's training set in a random order (the
    Fisher of A reads its first fisher_sequences; the buffer takes it all)."""
    per_stage = config.steps // config.stages * config.batch_size
    b = _shuffled(data[1].train, seed)
    if len(b) < per_stage * config.stages:
        need = per_stage * config.stages
        raise ValueError(f"corpus B has {len(b)} training sequences; {config.steps} steps need {need}")
    stages = [lm_data.TokenDataset(b[i * per_stage : (i + 1) * per_stage]) for i in range(config.stages)]
    return lm_data.TokenDataset(_shuffled(data[0].train, seed + 1)), stages


def build_parts(strategy, model, pretrained_state, si_state, config, seed, device, backend, lam=None, estimator=None):
    """The strategy's defences over `model` (already carrying its LoRA adapters): ewc, protector, si, replay, kl,
    base_model, loss_type, mofo_fraction, and the Fisher's estimator and batches; `lam` overrides the strategy's
    setting (ewc / online-ewc / combined: EWC's lambda; kl, asft: the KL weight; mofo: the fraction)."""
    parts = {"fisher_batches": max(1, config.fisher_sequences // config.batch_size),
             "estimator": estimator or config.ewc_estimator}  # fmt: skip
    if strategy in ("ewc", "online-ewc", "combined"):
        mode = "online" if strategy == "online-ewc" else "separate"
        parts["ewc"] = ff.EWC(
            model, lam=config.ewc_lambda if lam is None else lam, mode=mode, backend=backend,
            fisher_bits=config.fisher_bits,
        )  # fmt: skip
    if strategy == "si":
        parts["ewc"] = ff.EWC(model, lam=config.si_c if lam is None else lam, mode="online", backend=backend)
        parts["si"] = ff.SynapticIntelligence(model)
        parts["si"].load_state_dict(si_state)
    if strategy in ("replay", "combined"):
        parts["replay"] = ff.ReplayBuffer(config.replay_capacity, generator=torch.Generator().manual_seed(seed))
    if strategy in ("protect", "combined"):
        parts["protector"] = ff.GradientProtector(model, backend=backend)
    if strategy == "mofo":
        parts["mofo_fraction"] = config.mofo_fraction if lam is None else lam
    if strategy in ("dft", "asft"):  # DFT's token weighting inside the fused loss; asft: with kl's anchor
        parts["loss_type"] = "dft"
    if strategy in ("kl", "asft"):
        parts["kl"] = config.kl_lambda if lam is None else lam
        base = pretrained_model(pretrained_state, config, seed, device)  # the anchor: a frozen copy
        parts["base_model"] = base.requires_grad_(False).eval()
    return parts


def end_task(trainer, parts, dataset):
    """Close a task: the EWC consolidates over `dataset` and the buffer takes it (trainer.end_task); SI turns its
    path integral into the task's importance in its EWC instead (no Fisher pass). Returns the Fisher's scale
    (``EWC.last_fisher_stats``: estimator, mean, max, elements) where a Fisher was estimated, else None."""
    trainer.end_task(dataset)
    if parts.get("si") is not None:
        parts["si"].consolidate(parts["ewc"])
        return None
    return parts["ewc"].last_fisher_stats if "ewc" in parts else None


def prepared_model(strategy, state, config, seed, device, backend):
    model = pretrained_model(state, config, seed, device)
    if strategy == "lora":  # PEFT's all-linear: every projection of every block, the head excluded; base frozen
        ff.apply_lora(model, "all-linear", r=config.lora_rank, alpha=config.lora_alpha, backend=backend)
    return model


def _states(parts):
    return {name: parts[name].state_dict() for name in ("ewc", "protector", "replay", "si") if name in parts}


def run_strategy(strategy, pretrained_state, si_state, data, config, seed, device, backend, folder, before, bar=None,
                 lam=None, estimator=None):  # fmt: skip
    """Fine-tune the pre-trained model on B with `strategy`; returns the held-out CE after, the curve of CE_A and
    CE_B at the end of every stage (ForgettingCallback, its deltas against `before`), the Fisher's scale at every
    consolidation, the EWC penalty at the end, the step times, the defences' states when B's training began (what
    the throughput probe starts from) and the model. `lam`: the strategy's setting instead of its default;
    `estimator`: the Fisher's."""
    from fastforget.callbacks import ForgettingCallback

    model = prepared_model(strategy, pretrained_state, config, seed, device, backend)
    parts = build_parts(strategy, model, pretrained_state, si_state, config, seed, device, backend, lam, estimator)
    old_task, stages = finetune_sets(config, data, seed)
    timer, start_states, curve, fisher = _StepTimer(bar), None, [], []
    for k, stage in enumerate(stages):
        steps = len(stage) // config.batch_size
        trainer = _trainer(model, stage, steps, config.lr, config, seed + k, folder, device, parts, backend, timer)
        watch = ForgettingCallback(trainer, held_out_sets(data, config), interval=steps, max_batches=None,
                                   baseline=before, plot=False)  # fmt: skip
        trainer.add_callback(watch)
        stats = end_task(trainer, parts, old_task)  # A before the first stage, then the stage before
        if stats is not None:
            fisher.append(stats)
        if k == 0:
            start_states = copy.deepcopy(_states(parts))
        trainer.train()
        curve += [{"step": k * steps + step, **ce} for step, ce in watch.history]
        old_task = stage
    after = {name: curve[-1][name] for name in "AB"}
    penalty = float(parts["ewc"].penalty().detach()) if "ewc" in parts else None  # what the last step's loss carried
    return {"ce": after, "curve": curve, "fisher": fisher, "ewc_penalty": penalty, "step_s": timer.times,
            "start_states": start_states, "model": model}  # fmt: skip


def fisher_ewc(model, ids, config):
    """An ``ff.EWC`` over `model` consolidated at its current weights on the first fisher_sequences of `ids` (the
    per-sequence mean loss, as the trainers' end_task): its anchors and Fisher, one source of ``ff.fisher_merge``."""
    from fastforget.transformers import hf_batch_loss

    ewc = ff.EWC(model, lam=0.0)
    batches = [{"input_ids": b, "labels": b} for b in ids[: config.fisher_sequences].split(config.batch_size)]
    ewc.consolidate(batches, batch_loss=hf_batch_loss, estimator=config.ewc_estimator, progress=False)
    return ewc


def merge_points(strategy, finetuned, pretrained_state, values, data, config, seed, device, backend):
    """Merge a copy of finetune's fine-tuned model (`finetuned`: run_strategy's result) with the pre-trained weights
    at each of `values`, each time from the fine-tuned weights, and evaluate: ``ff.wise_ft`` (alpha: (1 - alpha)
    theta_A + alpha theta_B) or ``ff.fisher_merge`` of the fine-tuned model with the Fisher of B (a sample of its
    training sequences) and the pre-trained one with the Fisher of A (weights w_B and 1 - w_B). Returns finetune's
    result with the merge of the first value as "ce" and the curve's last point, "merged": {value: CE}, the
    Fishers' scales appended to "fisher", and "merge": the first value's merge time (ms) with `backend` and with
    "reference" and the largest difference between their results."""
    model = copy.deepcopy(finetuned["model"])
    params = list(model.parameters())
    weights = [p.detach().clone() for p in params]
    fishers = []
    if strategy == "fisher-merge":
        a_train, stages = finetune_sets(config, data, seed)
        seen_b = _shuffled(torch.cat([stage.ids for stage in stages]), seed)
        pretrained = pretrained_model(pretrained_state, config, seed, device)
        fishers = [fisher_ewc(pretrained, a_train.ids, config), fisher_ewc(model, seen_b, config)]

    def merged_at(value, merge_backend):
        with torch.no_grad():
            for param, weight in zip(params, weights):
                param.copy_(weight)
        start = time.perf_counter()
        if strategy == "wise-ft":
            ff.wise_ft(model, pretrained_state, value, backend=merge_backend)
        else:
            ff.fisher_merge(model, fishers[::-1], weights=[value, 1.0 - value], backend=merge_backend)
        return (time.perf_counter() - start) * 1e3

    ms, after = {}, {}
    for side, side_backend in (("fused", backend), ("reference", "reference")):
        ms[side] = merged_at(values[0], side_backend)
        after[side] = [p.detach().clone() for p in params]
    merged = {}
    for value in reversed(values):  # the first value last: the model ends merged at it
        merged_at(value, backend)
        merged[value] = evaluate(model, data, config)
    diff = max(float((a - b).abs().max()) for a, b in zip(after["fused"], after["reference"]))
    point = {"step": finetuned["curve"][-1]["step"], "merge": f"{SETTINGS[strategy]}={values[0]:g}"}
    return finetuned | {
        "ce": merged[values[0]], "curve": [*finetuned["curve"], point | merged[values[0]]], "merged": merged,
        "fisher": finetuned["fisher"] + [f.last_fisher_stats for f in fishers], "model": model,
        "merge": {"ms": ms, "max_abs_param_diff": diff},
    }  # fmt: skip


def probe(strategy, pretrained_state, si_state, start_states, data, config, seed, device, backend, folder):
    """The wall time of each optimizer step with `backend` after probe_warmup: the strategy's first steps on B from
    the pre-trained model and the run's defences as B began -- the same batches and replay draws for every backend.
    Returns (step seconds, the parameters after) so that two backends' final parameters can be compared."""
    model = prepared_model(strategy, pretrained_state, config, seed, device, backend)
    parts = build_parts(strategy, model, pretrained_state, si_state, config, seed, device, backend)
    for name, state in start_states.items():
        parts[name].load_state_dict(state)
    steps = config.probe_warmup + config.probe_steps
    stage = finetune_sets(config, data, seed)[1][0]
    timer = _StepTimer()
    _trainer(model, stage, steps, config.lr, config, seed, folder, device, parts, backend, timer).train()
    return timer.times[config.probe_warmup :], [p.detach() for p in model.parameters()]


def lambdas(strategy, config):
    """The strategy's setting (ewc: lambda, kl: the KL weight, mofo: the fraction, wise-ft: alpha, fisher-merge: the
    fine-tuned model's weight) and its sweep; (None, []) for the strategies without one."""
    base = {"ewc": config.ewc_lambda, "kl": config.kl_lambda}.get(strategy)
    if base is not None:
        return base, [base * f for f in config.sweep]
    swept = {"mofo": (config.mofo_fraction, config.mofo_sweep), "wise-ft": (config.wise_ft_alpha, config.wise_ft_sweep),
             "fisher-merge": (config.merge_weight, config.merge_sweep)}  # fmt: skip
    setting, sweep = swept.get(strategy, (None, ()))
    return setting, list(sweep)


def run_lm(config, strategies, seeds, device, backend, bar=None):
    """Every strategy (with the sweeps of its setting) for every seed, and ewc's lambda sweep with every estimator
    of estimator_sweep; returns a dict of the runs, the sweep points, the estimator points and the pre-training
    facts."""
    data = lm_data.load(config.seq_len)
    out = {"runs": [], "sweep": [], "estimators": [], "pretraining": []}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(seeds):
            for key, values in _run_seed(config, strategies, seed, data, device, backend, folder, bar).items():
                out[key] += values
    parameters = sum(p.numel() for p in make_model(config, 0, "cpu").parameters())
    return out | {"corpora": [c.describe() for c in data], "parameters": parameters,
                  "python": platform.python_version()}  # fmt: skip


def _run_seed(config, strategies, seed, data, device, backend, folder, bar):
    """run_lm's work for one seed: {"runs", "sweep", "estimators", "pretraining"} (lists)."""
    state, si_state, seconds, cached = pretrain(config, data, seed, device, bar)
    before = evaluate(pretrained_model(state, config, seed, device), data, config)
    tokens_per_step = config.batch_size * config.seq_len
    out = {"runs": [], "sweep": [], "estimators": [],
           "pretraining": [{"seed": seed, "seconds": seconds, "cached": cached}]}  # fmt: skip

    def point(strategy, value, result, **facts):
        return {"strategy": strategy, "seed": seed, "lambda": value, "setting": SETTINGS.get(strategy),
                "ce_after": result["ce"], **_trade_off(before, result["ce"]), "fisher": result["fisher"],
                "ewc_penalty": result.get("ewc_penalty"), **facts}  # fmt: skip

    def swept(strategy, value, estimator=None):
        label = f"{SETTINGS[strategy]}={value:g}" + (f", {estimator} Fisher" if estimator else "")
        _describe(bar, f"lm {strategy} {label} seed {seed}")
        return run_strategy(strategy, state, si_state, data, config, seed, device, backend, folder, before, bar,
                            lam=value, estimator=estimator)  # fmt: skip

    def trained(strategy):
        """run_strategy's result and the throughput probe's: the fastest step of each backend, and the largest
        difference between their parameters after the probe."""
        _describe(bar, f"lm {strategy} seed {seed}")
        result = run_strategy(strategy, state, si_state, data, config, seed, device, backend, folder, before, bar)
        _describe(bar, f"lm {strategy} seed {seed}: timing fused vs reference")
        # legs alternate between the backends so that a slow spell of this shared machine hits both; the fastest
        # step of each is its figure (the least disturbed, as timeit advises)
        times, params = {"fused": [], "reference": []}, {}
        for _, (side, side_backend) in itertools.product(
            range(config.probe_legs), (("fused", backend), ("reference", "reference"))
        ):
            leg, params[side] = probe(strategy, state, si_state, result["start_states"], data, config, seed, device,
                                      side_backend, folder)  # fmt: skip
            times[side] += leg
        diff = max(float((a - b).abs().max()) for a, b in zip(params["fused"], params["reference"]))
        return result | {"probe_s": {side: min(leg) for side, leg in times.items()}, "probe_diff": diff}

    finetuned = None  # finetune's result: the merges merge its model (the same training) instead of training again
    for strategy in strategies:
        lam, extra = lambdas(strategy, config)
        merging = strategy in MERGES
        if merging:
            finetuned = finetuned or trained("finetune")
            _describe(bar, f"lm {strategy} seed {seed}: merging")
            result = merge_points(strategy, finetuned, state, [lam, *extra], data, config, seed, device, backend)
        else:
            result = trained(strategy)
            finetuned = result if strategy == "finetune" else finetuned
        out["runs"].append(point(
            strategy, lam, result, scenario=SCENARIO, ce_before=before, curve=result["curve"],
            train_tokens_per_s=tokens_per_step / statistics.median(result["step_s"]),
            tokens_per_s={side: tokens_per_step / s for side, s in result["probe_s"].items()},
            probe_max_abs_param_diff=result["probe_diff"], **({"merge": result["merge"]} if merging else {}),
        ))  # fmt: skip
        for value in extra:  # a merge's sweep merges the same fine-tuned model again; the others train again
            done = {"ce": result["merged"][value], "fisher": result["fisher"]} if merging else None
            out["sweep"].append(point(strategy, value, done or swept(strategy, value)))
        if strategy == "ewc":
            for estimator in config.estimator_sweep:
                for value in (lam, *extra):
                    out["estimators"].append(point(strategy, value, swept(strategy, value, estimator)))
    return out


def _describe(bar, text):
    """Name what runs now on the progress bar (pre-training is minutes long when not cached)."""
    if bar is not None:
        bar.set_description(text)


def _trade_off(before, after):
    """forgetting = CE_A(after) - CE_A(before); learning = CE_B(before) - CE_B(after) (nats per byte)."""
    return {"forgetting": after["A"] - before["A"], "learning": before["B"] - after["B"]}


def total_steps(config, strategies, seeds):
    """Optimizer steps of a run_lm call (the progress bar's total): pre-training, fine-tuning and sweeps (the merges
    train finetune, once, and their sweeps nothing more)."""
    runs = sum(1 + len(lambdas(s, config)[1]) for s in strategies if s not in MERGES)
    runs += "finetune" not in strategies and any(s in MERGES for s in strategies)
    if "ewc" in strategies:
        runs += len(config.estimator_sweep) * (1 + len(lambdas("ewc", config)[1]))
    return seeds * (config.pretrain_steps + runs * (config.steps // config.stages * config.stages))
