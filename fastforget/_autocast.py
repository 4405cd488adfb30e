"""torch.autocast for fastforget's ops: the casts torch applies to the equivalent torch ops.

Under ``torch.autocast(device_type, dtype)`` torch casts the floating inputs of a matmul-like op (``F.linear``,
``mm``: autocast's lower-precision list) to ``dtype`` and those of the softmax family (``log_softmax``,
``cross_entropy``, ``kl_div``: its fp32 list) to fp32; fp64 tensors, integer and bool tensors and tensors on
another device are left alone (``torch.amp.autocast_mode._cast``'s rule). Results keep the dtype they are computed
in, and autograd carries the gradients back through the casts: an fp32 master weight gets an fp32 gradient.

fastforget's ops follow the same rule, at two levels:

* the public functions (``ff.lora_linear``, ``ff.anchored_lm_loss``; the QLoRA branch) cast their inputs with
  ``cast_inputs`` (``cast``) before validating them, so every backend (the reference's plain torch included) and
  the torch.func path see one dtype;
* the ops themselves get a kernel on the ``Autocast<Device>`` dispatch key (``register``), as
  ``torch.library.register_autocast`` gives, except that the dtype is the autocast region's (bf16 or fp16, read
  when the op runs) and each argument has its own rule. It casts, then calls the op with autocast excluded, so
  the kernels below (and the torch ops they call) run on the cast tensors only.
"""

import torch

from fastforget._schemas import NAMESPACE

LOWER = "lower"  # the autocast region's dtype: matmul-like inputs
FP32 = "fp32"  # the softmax family's inputs

_lib = torch.library.Library(NAMESPACE, "IMPL")


def dtype(device_type: str):
    """The autocast dtype of `device_type`'s region, or None outside one."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast(target, device_type, *values):
    """`values` with each autocast-eligible tensor (floating, not fp64, on `device_type`) cast to `target`;
    anything else (None, a non-tensor, which validation then names) unchanged. `target` None: all unchanged."""
    return tuple(
        v.to(target)
        if target is not None
        and isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and v.dtype != torch.float64
        and v.device.type == device_type
        else v
        for v in values
    )


def cast_inputs(*values):
    """`values` cast as an op of autocast's lower-precision list casts its inputs, in the autocast region (if any)
    of the first value's device; all unchanged when that is not a tensor (validation then names it)."""
    if not isinstance(values[0], torch.Tensor):
        return values
    device_type = values[0].device.type
    if device_type not in ("cpu", "cuda"):  # no autocast there (meta, ...): validation names the device
        return values
    if not torch.is_autocast_enabled(device_type):  # the common case, on every call: nothing more to do
        return values
    return cast(torch.get_autocast_dtype(device_type), device_type, *values)


def register(op: str, rules):
    """An ``Autocast<Device>`` kernel for ``fastforget::<op>`` on cpu and cuda: argument i is cast per
    ``rules[i]`` (LOWER, FP32 or None: left alone), then the op runs with that autocast key excluded."""
    overload = getattr(torch.ops.fastforget, op).default
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, excluded=excluded):
            lower = torch.get_autocast_dtype(device_type)
            targets = {LOWER: lower, FP32: torch.float32, None: None}
            # the dispatcher leaves out trailing arguments equal to their schema defaults: rules may be longer
            args = [cast(targets[rule], device_type, a)[0] for a, rule in zip(args, rules[: len(args)], strict=True)]
            with torch._C._ExcludeDispatchKeyGuard(excluded):
                return overload(*args)

        _lib.impl(op, kernel, key)
