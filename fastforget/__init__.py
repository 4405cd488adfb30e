"""fastforget: fused multi-tensor kernels against catastrophic forgetting."""

from fastforget import (
    _extension,  # noqa: F401  (loads the C++/CUDA kernels when built)
    _schemas,  # noqa: F401  (defines every op before kernels register on them)
)
from fastforget.dispatch import BACKENDS, BackendStatus, available_backends
from fastforget.ewc import EWC
from fastforget.fisher import estimate_fisher
from fastforget.ops import (
    ewc_penalty,
    ewc_penalty_,
    ewc_penalty_accumulate_ref,
    ewc_penalty_ref,
    fisher_update_,
    fisher_update_ref,
    grad_moments,
    grad_moments_ref,
    scale_grads_,
    scale_grads_ref,
)
from fastforget.protect import GradientProtector, SeedGradientProtector

try:
    import fastforget.kernels  # noqa: F401  (registers the Triton kernels)
except ImportError:  # no triton: available_backends() says why
    pass

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "EWC",
    "GradientProtector",
    "SeedGradientProtector",
    "available_backends",
    "estimate_fisher",
    "ewc_penalty",
    "ewc_penalty_",
    "ewc_penalty_accumulate_ref",
    "ewc_penalty_ref",
    "fisher_update_",
    "fisher_update_ref",
    "grad_moments",
    "grad_moments_ref",
    "scale_grads_",
    "scale_grads_ref",
]
