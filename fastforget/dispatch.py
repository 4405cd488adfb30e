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

from fastforget import _build, _extension

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


def _why_not(backend: str, device_type: str, build: bool = True):
    """None when `backend` can run on tensors of `device_type`, else the reason. The native backends' kernels are
    built here on first use (``build``; once per process, see _extension.py); available_backends() only reports."""
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
        why = _extension.ensure_built() if build else _extension.LOAD_ERROR
        if why:
            return why
        if not _extension.LOADED_FROM:  # not built yet: the first op builds it
            return None if backend == "cpu" else _cuda_build_skipped()
        if not _native_kernel_registered(backend):
            return f"the native kernels ({_extension.LOADED_FROM}) were built without CUDA kernels: " + (
                _cuda_build_skipped() or "torch had no CUDA, or FASTFORGET_SKIP_CUDA_BUILD was set"
            )
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")


def _cuda_build_skipped():
    """Why the just-in-time build leaves the CUDA kernels out, or None when it builds them."""
    with_cuda, why = _extension.CUDA_DECISION or _build.cuda_build_decision()
    return None if with_cuda else f"the CUDA kernels are not built: {why}"


def available_backends() -> dict:
    """Each backend -> BackendStatus(available, reason) on this machine. Reports only: the native kernels, when
    not built yet, count as available (the first op builds them) and the reason says so."""
    cuda = torch.cuda.is_available()
    status = {}
    for backend in BACKENDS:
        device_types = {"cuda": ["cuda"], "cpu": ["cpu"]}.get(backend, ["cuda", "cpu"])
        reasons = {d: _why_not(backend, d, build=False) for d in device_types if d == "cpu" or cuda}
        usable = [d for d, why in reasons.items() if why is None]
        if usable:
            reason = "runs on " + " and ".join(f"{d} tensors" for d in usable)
            if backend in ("cpu", "cuda") and not _extension.LOADED_FROM:
                reason += f"; {_extension.status()}"
            status[backend] = BackendStatus(True, reason)
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


@torch.compiler.assume_constant_result
def has_kernel(op: str, backend: str, device: torch.device) -> bool:
    """Whether the fused `backend`'s flavour of `op` has a kernel for tensors on `device` (an op can be newer than
    the native build or the Triton kernels); warns once per op and backend when it has not."""
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"fastforget::{op}{_FLAVOUR[backend]}", device.type.upper()):
        return True
    if (op, backend) not in _warned:
        _warned.add((op, backend))
        warnings.warn(
            f"fastforget.{op}: the {backend} backend has no kernel of it for {device.type} tensors in this build; "
            "using the pure-torch reference",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def native_op(name: str, backend: str):
    """The torch.library op that implements `name` for a fused backend."""
    return getattr(torch.ops.fastforget, name + _FLAVOUR[backend]).default
