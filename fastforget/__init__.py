"""fastforget: fused multi-tensor kernels against catastrophic forgetting."""

from fastforget import (
    _extension,  # noqa: F401  (loads the C++/CUDA kernels when built; else they build on first use)
    _schemas,  # noqa: F401  (defines every op before kernels register on them)
    defences,
    ops,
    optim,
)
from fastforget._version import __version__  # noqa: F401
from fastforget.arguments import ProtectionArguments
from fastforget.dispatch import BACKENDS, BackendStatus, available_backends
from fastforget.ewc import EWC
from fastforget.fisher import estimate_fisher
from fastforget.lora import LoRALinear, apply_lora, lora_disabled, lora_state_dict, merge_lora
from fastforget.lora_peft import load_peft_adapter, save_peft_adapter
from fastforget.merge import fisher_merge, wise_ft
from fastforget.ops import *  # noqa: F403  (every op and its reference: ops.__all__)
from fastforget.protect import GradientProtector, SeedGradientProtector
from fastforget.replay import ReplayBuffer
from fastforget.si import SynapticIntelligence
from fastforget.trainer import ProtectedTrainer

try:
    import fastforget.kernels  # noqa: F401  (registers the Triton kernels)
except ImportError:  # no triton: available_backends() says why
    pass


__all__ = [
    "BACKENDS",
    "BackendStatus",
    "EWC",
    "GradientProtector",
    "LoRALinear",
    "ProtectedTrainer",
    "ProtectionArguments",
    "ReplayBuffer",
    "SeedGradientProtector",
    "SynapticIntelligence",
    "apply_lora",
    "defences",
    "available_backends",
    "estimate_fisher",
    "fisher_merge",
    "load_peft_adapter",
    "lora_state_dict",
    "merge_lora",
    "lora_disabled",
    "save_peft_adapter",
    "optim",
    "wise_ft",
    *ops.__all__,
]
