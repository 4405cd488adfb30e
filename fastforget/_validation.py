"""Argument checks shared by every op. They run before anything is allocated or written, and name the index."""

import math
import numbers
import os
from collections.abc import Mapping, Sequence

import torch

from fastforget._dtypes import FLOAT_DTYPES  # noqa: F401  (re-exported for the ops)


def tensor_list(name: str, value) -> list:
    """One tensor or a sequence of tensors, as a list."""
    if isinstance(value, torch.Tensor):
        return [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a Tensor or a sequence of Tensors, not {type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] is a {type(t).__name__}, not a Tensor")
    return list(value)


def check_dtype(name: str, i: int, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(allowed))
        raise TypeError(f"{name}[{i}] has dtype {t.dtype}; expected one of {names}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}[{i}] has layout {t.layout}; only dense (strided) tensors are supported")


def check_like_params(name: str, tensors: list, params: list, params_name: str = "params") -> None:
    """Same length as params, and each tensor shaped and placed like its param (named `params_name` in errors)."""
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors but {params_name} has {len(params)}")
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t.shape != p.shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(t.shape)} but {params_name}[{i}] has shape {tuple(p.shape)}"
            )
        if t.device != p.device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {params_name}[{i}] is on {p.device}")


def check_one_device(name: str, tensors: list) -> None:
    for i, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"{name}[{i}] is on {t.device} but {name}[0] is on {tensors[0].device}")


def check_real(name: str, value, *, minimum=None, maximum=None, above=None, below=None) -> float:
    """A finite real number (not a bool, not NaN/inf) as a float; `minimum`/`maximum` bound it inclusively,
    `above`/`below` exclusively. Tensors are refused: a 0-dim tensor would force a host synchronisation."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, not {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    if above is not None and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if below is not None and not value < below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value


def check_scalar(name: str, value, *, minimum=None) -> float:
    """A finite real number >= `minimum` (``check_real``'s common case)."""
    return check_real(name, value, minimum=minimum)


def check_int(name: str, value, *, minimum=None, maximum=None) -> int:
    """An integer (Python or numpy; not a bool, not a float with an integral value) within the bounds, as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_probability(name: str, value, *, zero=True, one=True) -> float:
    """A probability in [0, 1]; `zero=False` / `one=False` exclude that end."""
    value = check_real(name, value)
    if not (value >= 0 if zero else value > 0) or not (value <= 1 if one else value < 1):
        interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_choice(name: str, value, choices):
    """One of `choices` (compared with ==, so strings and dtypes work); the error lists them."""
    if not any(value == c and type(value) is type(c) for c in choices):
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), not {type(value).__name__}")
    return value


def optional(check, name: str, value, **bounds):
    """None, or `value` passed through `check` (e.g. ``optional(check_int, "max_batches", n, minimum=1)``)."""
    return None if value is None else check(name, value, **bounds)


def check_distinct(name: str, tensors: list) -> None:
    """No tensor object may appear twice (not checked while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return
    first = {}
    for i, t in enumerate(tensors):
        j = first.setdefault(id(t), i)
        if j != i:
            raise ValueError(f"{name}[{j}] and {name}[{i}] are the same tensor")


def _span(t):
    """[start, end) byte addresses of t's memory (its extent for a strided view)."""
    start = t.data_ptr()
    extent = t.numel() if t.is_contiguous() else sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def check_writes(written, read=()) -> None:
    """In-place ops: no written tensor shares memory with another written one or with any read one (a read
    operand that aliases an output would be read before or after its update depending on the backend's order).

    ``written`` / ``read``: sequences of (name, tensor list); None entries and empty tensors are skipped. Errors
    name both tensors, e.g. "fisher[2] shares memory with grads[2]". Not checked while torch.compile traces."""
    if torch.compiler.is_compiling():
        return
    spans = []
    for is_written, groups in ((True, written), (False, read)):
        for name, tensors in groups:
            for i, t in enumerate(tensors):
                if t is None or t.numel() == 0:
                    continue
                if is_written and torch._debug_has_internal_overlap(t) == 1:
                    raise ValueError(
                        f"{name}[{i}] has elements that share memory (an expanded view?); it cannot be written"
                    )
                spans.append((*_span(t), is_written, f"{name}[{i}]"))
    spans.sort(key=lambda s: s[0])
    open_end = {True: (0, None), False: (0, None)}  # the furthest-reaching written / read span seen so far
    for start, end, is_written, label in spans:
        for other_written in (True, False) if is_written else (True,):
            other_end, other = open_end[other_written]
            if start < other_end and is_written and other_written:
                raise ValueError(f"{other} and {label} overlap in memory; tensors written in place must not")
            if start < other_end:
                raise ValueError(f"{label} shares memory with {other}, which is written in place")
        if end > open_end[is_written][0]:
            open_end[is_written] = (end, label)


# The Triton launchers' own checks (kernels/), like csrc/common.h's: a direct torch.ops call skips the checks above,
# and a kernel must not read out of bounds. RuntimeError, as the C++ bindings raise.


def check_numel(name: str, t: torch.Tensor, expected: int) -> None:
    """A scalar or per-tensor argument has exactly `expected` elements (kernels index it by tensor)."""
    if t.numel() != expected:
        raise RuntimeError(f"fastforget: {name} has {t.numel()} elements; expected {expected}")


def check_same_layout(name: str, tensors, like, like_name: str) -> None:
    """tensors[i] has the shape of like[i], for every i."""
    if len(tensors) != len(like):
        raise RuntimeError(f"fastforget: {name} has {len(tensors)} tensors but {like_name} has {len(like)}")
    for i, (t, p) in enumerate(zip(tensors, like)):
        if t.shape != p.shape:
            raise RuntimeError(
                f"fastforget: {name}[{i}] has shape {tuple(t.shape)} but {like_name}[{i}] has shape {tuple(p.shape)}"
            )


def check_stacks(fisher, grads) -> None:
    """grads[i] is shaped like fisher[i] or stacks k of them, (k, *fisher[i].shape)."""
    if len(grads) != len(fisher):
        raise RuntimeError(f"fastforget: grads has {len(grads)} tensors but fisher has {len(fisher)}")
    for i, (f, g) in enumerate(zip(fisher, grads)):
        if g.shape != f.shape and g.shape[1:] != f.shape:
            raise RuntimeError(
                f"fastforget: grads[{i}] has shape {tuple(g.shape)}; expected {tuple(f.shape)} or (k, ...)"
            )


def check_state(owner: str, state, keys) -> None:
    """A state dict is a mapping holding every key in `keys` (ValueError naming the missing ones)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner} state must be a dict (a state_dict()), not {type(state).__name__}")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{owner} state lacks {missing}: it was not saved by a {owner}")


def _available_ram() -> int:
    """Bytes the kernel could hand out now: MemAvailable (free pages plus reclaimable cache) where Linux reports
    it, else the free pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_allocation(what: str, nbytes: int, device) -> None:
    """Refuse to allocate, on the user's behalf, more than the device has free (CPU: available RAM)."""
    device = torch.device(device)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    elif device.type == "cpu":
        free = _available_ram()
    else:
        return
    if nbytes > free:
        raise ValueError(
            f"{what} would need {nbytes / 2**30:.1f} GiB but {device.type} has {free / 2**30:.1f} GiB free"
        )


def check_backend(name: str, value) -> str:
    """'auto' or one of the dispatch table's backends (fastforget.dispatch.BACKENDS)."""
    from fastforget.dispatch import BACKENDS  # dispatch imports this module's users

    return check_choice(name, value, ("auto", *BACKENDS))
