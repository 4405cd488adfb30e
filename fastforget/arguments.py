"""``ProtectionArguments``: the forgetting defences' settings as a dataclass that ``transformers.HfArgumentParser``
reads from the command line, a JSON or a YAML file, beside ``TrainingArguments`` or TRL's ``SFTConfig``.

    parser = transformers.HfArgumentParser((transformers.TrainingArguments, ProtectionArguments))
    training_args, protection = parser.parse_args_into_dataclasses()   # or parse_json_file / parse_yaml_file
    trainer = ProtectedHFTrainer(model=model, args=training_args, ..., **protection.build(model))

Every field is checked in ``__post_init__`` (so a bad value raises, naming the field, when the arguments are
parsed: before a model is loaded or a step is taken); ``build(model)`` makes the defences with today's
constructors (``ff.EWC``, ``ff.ReplayBuffer``, ``ff.GradientProtector``) and returns the keyword arguments of
``ProtectionMixin``. A defence is off until its switch is set: ``ewc_lambda``, ``replay_capacity``, ``protect``,
``kl_to_base``. ``forgetting_callback(trainer, datasets)`` makes the ``ForgettingCallback`` its ``forgetting_*``
fields describe.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch

from fastforget import _validation as check
from fastforget.ewc import EWC, FISHER_BITS, MODES
from fastforget.fisher import ESTIMATORS
from fastforget.protect import GradientProtector
from fastforget.replay import ReplayBuffer

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
REPLAY_POLICIES = ("reservoir", "random_replace")  # the ones that need no callable or key: see ff.ReplayBuffer
PROTECT = ("none", "tensor", "element")


def _option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class ProtectionArguments:
    """The defences' settings (see the module doc). Defaults: every defence off, and each one's own defaults."""

    ewc_lambda: float | None = _option(None, "EWC strength lam (penalty lam * sum F (theta - theta*)^2); unset: no EWC")
    ewc_mode: Literal[MODES] = _option("online", "EWC mode")
    ewc_decay: float = _option(1.0, "online EWC: the old Fisher's weight at each consolidation (gamma), >= 0")
    ewc_estimator: Literal[ESTIMATORS] = _option("empirical", "Fisher estimator of end_task")
    ewc_max_batches: int | None = _option(None, "batches the Fisher is estimated on at end_task; unset: all")
    ewc_state_dtype: Literal[tuple(STATE_DTYPES)] | None = _option(
        None, "EWC anchors' (and 32-bit Fisher's) dtype; unset: float32, or bfloat16 with ewc_fisher_bits 8"
    )
    ewc_fisher_bits: Literal[FISHER_BITS] = _option(
        32,
        "EWC Fisher storage: 32 bits (ewc_state_dtype) or 8 (block-wise quantized, for ProtectedAdamW(state_bits=8))",
    )
    replay_capacity: int | None = _option(None, "replay buffer size in examples; unset: no replay")
    replay_policy: Literal[REPLAY_POLICIES] = _option("reservoir", "replay buffer policy")
    replay_weight: float = _option(1.0, "weight of the replayed examples' loss, >= 0")
    replay_batch_size: int | None = _option(None, "examples replayed per micro-batch; unset: the micro-batch's size")
    replay_seed: int | None = _option(None, "seed of the replay buffer's sampling generator; unset: torch's global RNG")
    protect: Literal[PROTECT] = _option("none", "gradient protection: exact window per tensor, or EMA per element")
    protect_window: int = _option(100, "gradient protection: window of gradient statistics in steps, >= 1")
    protect_threshold: float = _option(0.1, "gradient protection: variability threshold above which it shrinks, >= 0")
    kl_to_base: float | None = _option(
        None, "weight of the KL to the base model's distribution added to the loss; unset: no KL anchor"
    )
    kl_backend: str = _option("auto", "backend of the anchored loss: auto, or a fastforget backend")
    forgetting_interval: int | None = _option(
        None, "ForgettingCallback: measure every this many steps; unset: eval_steps, else logging_steps"
    )
    forgetting_max_batches: int | None = _option(16, "ForgettingCallback: at most this many batches per old dataset")
    forgetting_plot: bool = _option(True, "ForgettingCallback: write forgetting.png to the output dir at the end")

    def __post_init__(self):
        check.optional(check.check_real, "ewc_lambda", self.ewc_lambda, minimum=0.0)
        check.check_choice("ewc_mode", self.ewc_mode, MODES)
        check.check_real("ewc_decay", self.ewc_decay, minimum=0.0)
        if self.ewc_mode == "separate" and self.ewc_decay != 1.0:
            raise ValueError("ewc_decay applies to ewc_mode='online'; 'separate' keeps every task at full weight")
        check.check_choice("ewc_estimator", self.ewc_estimator, ESTIMATORS)
        check.optional(check.check_int, "ewc_max_batches", self.ewc_max_batches, minimum=1)
        check.optional(check.check_choice, "ewc_state_dtype", self.ewc_state_dtype, choices=tuple(STATE_DTYPES))
        check.check_choice("ewc_fisher_bits", self.ewc_fisher_bits, FISHER_BITS)
        check.optional(check.check_int, "replay_capacity", self.replay_capacity, minimum=1)
        check.check_choice("replay_policy", self.replay_policy, REPLAY_POLICIES)
        check.check_real("replay_weight", self.replay_weight, minimum=0.0)
        check.optional(check.check_int, "replay_batch_size", self.replay_batch_size, minimum=1)
        check.optional(check.check_int, "replay_seed", self.replay_seed, minimum=0)
        check.check_choice("protect", self.protect, PROTECT)
        check.check_int("protect_window", self.protect_window, minimum=1)
        check.check_real("protect_threshold", self.protect_threshold, minimum=0.0)
        check.optional(check.check_real, "kl_to_base", self.kl_to_base, minimum=0.0)
        check.check_backend("kl_backend", self.kl_backend)
        check.optional(check.check_int, "forgetting_interval", self.forgetting_interval, minimum=1)
        check.optional(check.check_int, "forgetting_max_batches", self.forgetting_max_batches, minimum=1)
        check.check_bool("forgetting_plot", self.forgetting_plot)

    def build(self, model):
        """The defences for `model` (its trainable parameters) as ``ProtectionMixin``'s keyword arguments:
        ``ProtectedHFTrainer(model=model, args=..., **protection.build(model))``."""
        ewc = replay = protector = None
        if self.ewc_lambda is not None:
            ewc = EWC(
                model, lam=self.ewc_lambda, mode=self.ewc_mode, decay=self.ewc_decay,
                state_dtype=STATE_DTYPES.get(self.ewc_state_dtype), fisher_bits=self.ewc_fisher_bits,
            )  # fmt: skip
        if self.replay_capacity is not None:
            generator = None if self.replay_seed is None else torch.Generator().manual_seed(self.replay_seed)
            replay = ReplayBuffer(self.replay_capacity, self.replay_policy, generator=generator)
        if self.protect != "none":
            protector = GradientProtector(
                model, window=self.protect_window, threshold=self.protect_threshold, mode=self.protect
            )
        return {
            "ewc": ewc, "replay": replay, "protector": protector, "replay_weight": self.replay_weight,
            "replay_batch_size": self.replay_batch_size, "ewc_estimator": self.ewc_estimator,
            "ewc_max_batches": self.ewc_max_batches, "kl_to_base": self.kl_to_base, "kl_backend": self.kl_backend,
        }  # fmt: skip

    def forgetting_callback(self, trainer, datasets):
        """A ``ForgettingCallback`` on `datasets` ({name: dataset}) for `trainer`, with the ``forgetting_*``
        settings; add it with ``trainer.add_callback``."""
        from fastforget.callbacks import ForgettingCallback  # needs transformers; this module does not

        return ForgettingCallback(
            trainer, datasets, interval=self.forgetting_interval, max_batches=self.forgetting_max_batches,
            plot=self.forgetting_plot,
        )  # fmt: skip
