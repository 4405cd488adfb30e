from fastforget.ops.anchored_lm_loss import anchored_lm_loss, anchored_lm_loss_ref
from fastforget.ops.ewc_penalty import ewc_penalty, ewc_penalty_, ewc_penalty_accumulate_ref, ewc_penalty_ref
from fastforget.ops.fisher_update import fisher_update_, fisher_update_ref
from fastforget.ops.grad_ema import grad_ema_protect_, grad_ema_protect_ref, grad_ema_stats_ref
from fastforget.ops.grad_moments import grad_moments, grad_moments_ref
from fastforget.ops.lora_linear import lora_linear, lora_linear_ref
from fastforget.ops.scale_grads import scale_grads_, scale_grads_ref

__all__ = [
    "anchored_lm_loss",
    "anchored_lm_loss_ref",
    "ewc_penalty",
    "ewc_penalty_",
    "ewc_penalty_accumulate_ref",
    "ewc_penalty_ref",
    "fisher_update_",
    "fisher_update_ref",
    "grad_ema_protect_",
    "grad_ema_protect_ref",
    "grad_ema_stats_ref",
    "grad_moments",
    "grad_moments_ref",
    "lora_linear",
    "lora_linear_ref",
    "scale_grads_",
    "scale_grads_ref",
]
from fastforget.ops.protected_adamw_step import protected_adamw_step, protected_adamw_step_ref  # noqa: E402

__all__ += ["protected_adamw_step", "protected_adamw_step_ref"]
from fastforget.ops.protected_adamw8bit_step import (  # noqa: E402
    protected_adamw8bit_step,
    protected_adamw8bit_step_ref,
)

__all__ += ["protected_adamw8bit_step", "protected_adamw8bit_step_ref"]
from fastforget.ops.weight_merge import weight_merge_, weight_merge_ref  # noqa: E402

__all__ += ["weight_merge_", "weight_merge_ref"]
