"""Triton kernels (installed as fastforget.kernels). Importing registers them on the fastforget::*_triton ops."""

from fastforget.kernels import ewc_penalty, fisher_update, grad_ema, grad_moments, lora_linear, scale_grads  # noqa: F401
from fastforget.kernels import protected_adamw_step  # noqa: F401, E402
