"""MoFO's parts of the optimizer step (Chen et al., "MoFO: Momentum-Filtered Optimizer for Mitigating Forgetting
in LLM Fine-Tuning", TMLR 2025; the authors' ``AdamW_MoFO``): in each filtered tensor only the elements whose
|exp_avg| is among its k = int(numel * fraction) largest take the Adam update,

    threshold = the k-th largest |m| of the tensor (m: the first moment AFTER this step's update, as AdamW_MoFO
                computes torch.topk(|m|, k) after m.lerp_(g, 1 - beta1)),
    theta <- theta (1 - lr wd) - lr / (1 - beta1^k) * [|m| >= threshold] m / (sqrt(v) / sqrt(1 - beta2^k) + eps),

ties at the threshold included (``>=``, as the reference); k = 0 (a tensor smaller than 1 / fraction, where the
reference's ``topk(...)[0].min()`` of an empty tensor raises) updates no element by Adam, the decay still applies.

The threshold is exact (bitwise torch.topk's k-th value), found over the bit patterns of |m| (a non-negative
float's bit pattern orders like its value), never by a sort or a per-tensor ``torch.topk``:

* the radix select (CUDA, Triton, reference, and every backend under FSDP2): 11 bits per pass (three passes for
  fp32: bits 31-21, 20-10, 9-0; six for fp64); each pass counts, per tensor, the next digit of the elements that
  match the digits chosen so far (``mofo_histogram``, one launch over the whole list, 2048 bins per tensor), then
  picks the digit holding the k-th largest element on the device (no host sync). Under FSDP2 each pass's
  histograms are summed over the shards (``all_reduce``): the threshold is over the whole tensor;
* on the CPU (one process), ``mofo_thresholds`` brackets the k-th largest by a sample, counts and gathers in one
  pass over the list, and selects among the few gathered (Floyd & Rivest 1975; csrc/cpu/mofo.cpp), falling back to
  the radix passes where the sample missed.

The masked update is ``mofo_update``.
"""

import torch
import torch.distributed as dist

from fastforget import dispatch
from fastforget._dtypes import accumulate_dtype
from fastforget._schemas import FLAVOURS, qualname

DIGIT_BITS = 11
BINS = 1 << DIGIT_BITS
NONE_SELECTED = -1  # a threshold no element reaches (k = 0)


def _abs_bits(m):
    """The bit pattern of |m| as int64 (non-negative: the sign bit is clear)."""
    return m.abs().view(torch.int64 if m.dtype == torch.float64 else torch.int32).to(torch.int64)


def _width(exp_avg):
    return 64 if exp_avg[0].dtype == torch.float64 else 32


def _digits(exp_avg):
    """(shift, digit_bits) of each pass, most significant first."""
    width = _width(exp_avg)
    return [(max(top - DIGIT_BITS, 0), top - max(top - DIGIT_BITS, 0)) for top in range(width, 0, -DIGIT_BITS)]


def mofo_histogram_ref(exp_avg, prefix, shift, digit_bits):
    """Plain torch, per tensor: bincount of the digit (b >> shift) & (2^digit_bits - 1) of the matching elements."""
    rows = []
    for t, m in enumerate(exp_avg):
        bits = _abs_bits(m).reshape(-1)
        if shift + digit_bits < _width(exp_avg):
            bits = bits[(bits >> (shift + digit_bits)) == prefix[t]]
        rows.append(torch.bincount((bits >> shift) & ((1 << digit_bits) - 1), minlength=BINS))
    return torch.stack(rows).to(torch.int32)


def mofo_update_ref(params, exp_avg, exp_avg_sq, steps, thresholds, grads, omega, grad_scale, found_inf, lr, beta1,
                    beta2, eps, weight_decay, maximize):  # fmt: skip
    """Plain torch, per tensor: the masked AdamW update and SI's path integral (the schema's math)."""
    acc = accumulate_dtype(params)
    skip = torch.zeros((), dtype=torch.bool) if found_inf is None else found_inf.reshape(()).cpu() != 0
    if skip:
        return
    for i, (p, m, v, step) in enumerate(zip(params, exp_avg, exp_avg_sq, steps)):
        k = step.double().reshape(())
        bias_correction1 = (1 - beta1**k).to(acc)
        bias_correction2_sqrt = (1 - beta2**k).sqrt().to(acc)
        threshold = thresholds[i]
        mask = (_abs_bits(m) >= threshold) & (threshold >= 0)
        old = p.to(acc, copy=True)
        new = old * (1 - lr * weight_decay) - (lr / bias_correction1) * torch.where(mask, m, 0) / (
            v.sqrt() / bias_correction2_sqrt + eps
        )
        p.copy_(new)
        if omega:
            g_task = (-1.0 if maximize else 1.0) * grads[i].to(acc)
            if grad_scale is not None:
                g_task = g_task / grad_scale.reshape(()).to(acc)
            omega[i].sub_(g_task * (p.to(acc) - old))


def mofo_histogram(exp_avg, prefix, shift, digit_bits, backend):
    resolved = dispatch.resolve(backend, exp_avg[0].device, "mofo_histogram")
    if resolved == "reference":
        return mofo_histogram_ref(exp_avg, prefix, shift, digit_bits)
    return dispatch.native_op("mofo_histogram", resolved)(exp_avg, prefix, shift, digit_bits)


def mofo_update(*args, backend):
    """The masked update (the schema's positional arguments), in place."""
    with torch.no_grad():
        resolved = dispatch.resolve(backend, args[0][0].device, "mofo_update")
        if resolved == "reference":
            return mofo_update_ref(*args)
        dispatch.native_op("mofo_update", resolved)(*args)


def select_by_histograms(exp_avg, ks, histogram, process_group=None):
    """The radix select's passes on the device (no host sync): ``histogram(exp_avg, prefix, shift, digit_bits)``
    per pass (summed over ``process_group``'s shards when given), then per tensor the digit holding the need-th
    largest element by a cumulative sum. The reference backend's select, the Triton backend's, and every backend's
    under FSDP2."""
    count = len(exp_avg)
    device = exp_avg[0].device
    need = ks.to(device, torch.int64).clamp(min=1)
    prefix = torch.zeros(count, dtype=torch.int64, device=device)
    zero = torch.zeros(count, 1, dtype=torch.int64, device=device)
    for shift, digit_bits in _digits(exp_avg):
        hist = histogram(exp_avg, prefix, shift, digit_bits)
        if process_group is not None:
            dist.all_reduce(hist, group=process_group)
        at_least = hist.flip(1).cumsum(1, dtype=torch.int64).flip(1)  # elements whose digit is >= b
        digit = (at_least >= need[:, None]).sum(1) - 1  # the largest digit with >= need elements at or above it
        above = torch.cat([at_least[:, 1:], zero], 1).gather(1, digit[:, None]).squeeze(1)
        need = need - above  # still to find among the elements with this digit
        prefix = (prefix << digit_bits) + digit
    return torch.where(ks.to(device) > 0, prefix, NONE_SELECTED)


def mofo_thresholds(exp_avg, ks, *, backend="auto", process_group=None):
    """Per tensor, the bit pattern (int64) of the ks[t]-th largest |exp_avg[t]|, or -1 where ks[t] == 0.

    ``ks``: int64 tensor, one k per tensor, each <= the tensor's numel (the global numel under FSDP2, where
    ``exp_avg`` are the local shards and ``process_group`` the shards' group: the histograms are summed over it).
    ``threshold_values`` turns the result into floats."""
    resolved = dispatch.resolve(backend, exp_avg[0].device, "mofo_thresholds")
    if process_group is None and resolved != "reference":
        return dispatch.native_op("mofo_thresholds", resolved)(exp_avg, ks)
    return select_by_histograms(
        exp_avg, ks, lambda *args: mofo_histogram(*args, backend=resolved), process_group=process_group
    )


def threshold_values(thresholds, dtype):
    """The float thresholds of ``mofo_thresholds``' bit patterns (+inf where none is selected)."""
    bits = thresholds.to(torch.int64 if dtype == torch.float64 else torch.int32)
    values = bits.view(dtype)
    return torch.where(thresholds >= 0, values, torch.inf)


for _flavour in FLAVOURS:
    torch.library.register_fake(qualname("mofo_histogram", _flavour))(
        lambda exp_avg, prefix, shift, digit_bits: prefix.new_empty((len(exp_avg), BINS), dtype=torch.int32)
    )
    torch.library.register_fake(qualname("mofo_thresholds", _flavour))(lambda exp_avg, ks: torch.empty_like(ks))
    torch.library.register_fake(qualname("mofo_update", _flavour))(lambda *args: None)
