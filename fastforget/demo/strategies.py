"""What each demo strategy adds to plain sequential training (``finetune``): the ProtectedTrainer's components."""

import torch
from torch import nn

from fastforget.ewc import EWC
from fastforget.lora import LoRALinear, apply_lora
from fastforget.protect import GradientProtector
from fastforget.replay import ReplayBuffer


def protections(strategy, model, config, backend, seed):
    """The strategy's EWC, replay buffer and gradient protector (None where unused), over the model's trainable
    parameters, as keyword arguments of ``ProtectedTrainer``.

    ``ewc``: Kirkpatrick et al.'s EWC, one penalty per past task (fastforget's exact "separate" mode);
    ``online-ewc``: Schwarz et al.'s online EWC (one running Fisher, anchored at the latest parameters);
    ``replay``: a reservoir buffer of ``replay_capacity`` examples, replayed alongside every batch;
    ``protect``: the seed's gradient protector (window 100, threshold 0.1); ``combined``: the seed's loop,
    replay + EWC + protection. (``lora`` changes the model instead: ``begin_task``.)
    """
    ewc = replay = protector = None
    if strategy in ("ewc", "combined"):
        ewc = EWC(model, lam=config.ewc_lambda, mode="separate", backend=backend)
    elif strategy == "online-ewc":
        ewc = EWC(model, lam=config.ewc_lambda, mode="online", decay=config.online_decay, backend=backend)
    if strategy in ("replay", "combined"):
        replay = ReplayBuffer(config.replay_capacity, "reservoir", generator=torch.Generator().manual_seed(seed))
    if strategy in ("protect", "combined"):
        protector = GradientProtector(model, backend=backend)
    return {"ewc": ewc, "replay": replay, "protector": protector}


def copy_states(source, target):
    """Load every component of `source` (a ``protections`` dict) into the same component of `target`."""
    for name, component in source.items():
        if component is not None:
            target[name].load_state_dict(component.state_dict())


def begin_task(strategy, model, task_index, config, backend):
    """``lora``: the whole network learns the first task; then every linear layer is frozen and gets a rank-r
    adapter (``ff.apply_lora``), and only the adapters learn the later tasks."""
    if strategy == "lora" and task_index == 1:
        apply_lora(
            model, lambda name, module: isinstance(module, nn.Linear), r=config.lora_rank, alpha=config.lora_alpha,
            backend=backend,
        )  # fmt: skip


def set_lora_backend(model, backend):
    """The backend of every LoRA layer of `model` (a copy's layers keep the original's)."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.backend = backend
