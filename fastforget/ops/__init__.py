from fastforget.ops.ewc_penalty import ewc_penalty, ewc_penalty_, ewc_penalty_accumulate_ref, ewc_penalty_ref
from fastforget.ops.fisher_update import fisher_update_, fisher_update_ref

__all__ = [
    "ewc_penalty",
    "ewc_penalty_",
    "ewc_penalty_accumulate_ref",
    "ewc_penalty_ref",
    "fisher_update_",
    "fisher_update_ref",
]
