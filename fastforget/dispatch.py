"""The one backend table shared by every op.

Backends: ``triton`` (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda`` (native CUDA kernels in
``fastforget._C``), ``cpu`` (native C++ kernels in ``fastforget._C``), ``reference`` (pure torch, any device).

Selection: the op's ``backend=`` argument, else the ``FASTFORGET_BACKEND`` environment variable, else ``auto``:
CUDA tensors -> triton, cuda, reference; CPU tensors -> cpu, reference (falling back warns once). A backend asked for
by name that cannot run raises ``RuntimeError`` with the reason.
"""

import functools
import os
import warnings
from dataclasses import dataclass

import torch

from fastforget import _extension

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "FASTFORGET_BACKEND"
# The native op flavour each backend runs (see _schemas.py); reference runs plain torch.
_FLAVOUR = {"triton": "_triton", "cuda": "", "cpu": ""}
_AUTO_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str  # what it runs on, or why it cannot run here

    def __bool__(self):
        return self.available


def triton_interpreted() -> bool:
    """Whether Triton kernels defined now run in the interpreter (read by kernels/ when it defines them)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _triton_import_error():
    try:
        import fastforget.kernels  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    return None


def _native_kernel_registered(device_type: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastforget::ewc_penalty", device_type.upper())


def _why_not(backend: str, device_type: str):
    """None when `backend` can run on tensors of `device_type`, else the reason."""
    if backend == "reference":
        return None
    if backend == "triton":
        if _triton_import_error():
            return _triton_import_error()
        from fastforget.kernels.multi_tensor import DEVICE_TYPES  # decided when the kernels were defined

        if device_type == "cpu" and "cpu" not in DEVICE_TYPES:
            return "Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before import"
        if device_type not in ("cpu", "cuda"):
            return f"Triton kernels do not run on {device_type} tensors"
        return None
    if backend in ("cpu", "cuda"):
        if backend != device_type:
            return f"the {backend} backend runs on {backend} tensors, not {device_type} tensors"
        if _extension.LOAD_ERROR:
            return _extension.LOAD_ERROR
        if not _native_kernel_registered(backend):
            return "fastforget._C was built without CUDA kernels (torch had no CUDA, or FASTFORGET_SKIP_CUDA_BUILD)"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")


def available_backends() -> dict:
    """Each backend -> BackendStatus(available, reason) on this machine."""
    cuda = torch.cuda.is_available()
    status = {}
    for backend in BACKENDS:
        device_types = {"cuda": ["cuda"], "cpu": ["cpu"]}.get(backend, ["cuda", "cpu"])
        reasons = {d: _why_not(backend, d) for d in device_types if d == "cpu" or cuda}
        usable = [d for d, why in reasons.items() if why is None]
        if usable:
            status[backend] = BackendStatus(True, "runs on " + " and ".join(f"{d} tensors" for d in usable))
        else:
            why = "; ".join(reasons.values()) if reasons else "no CUDA device is available"
            status[backend] = BackendStatus(False, why)
    return status


_warned = set()


@torch.compiler.assume_constant_result  # decided once while tracing; the compiled graph calls that backend's op
def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that runs `op` on tensors of `device`, per the selection rules above."""
    requested = backend if backend not in (None, "auto") else os.environ.get(ENV_VAR, "auto") or "auto"
    if requested != "auto":
        why = _why_not(requested, device.type)
        if why:
            raise RuntimeError(f"fastforget.{op}: backend {requested!r} cannot run on {device.type} tensors: {why}")
        return requested
    reasons = []
    for candidate in _AUTO_ORDER.get(device.type, ()):
        why = _why_not(candidate, device.type)
        if why is None:
            return candidate
        reasons.append(f"{candidate}: {why}")
    if device.type not in _warned:
        _warned.add(device.type)
        warnings.warn(
            f"fastforget: no fused backend for {device.type} tensors ({'; '.join(reasons) or 'none exists'}); "
            "using the pure-torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


def native_op(name: str, backend: str):
    """The torch.library op that implements `name` for a fused backend."""
    return getattr(torch.ops.fastforget, name + _FLAVOUR[backend]).default
