"""Triton kernels (installed as fastforget.kernels). Importing registers them on the fastforget::*_triton ops."""

from fastforget.kernels import (  # noqa: F401
    anchored_lm_loss,
    ewc_penalty,
    fisher_update,
    grad_ema,
    grad_moments,
    lora_linear,
    mofo,
    protected_adamw8bit_step,
    protected_adamw_step,
    scale_grads,
    weight_merge,
)
