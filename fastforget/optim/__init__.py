"""Optimizers whose step fuses the forgetting defences (``ProtectedAdamW``)."""

from fastforget.optim.protected_adamw import ProtectedAdamW

__all__ = ["ProtectedAdamW"]
