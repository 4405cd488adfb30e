"""Every fastforget operator schema, in one place.

Each op exists in two flavours that share one schema:

* ``fastforget::<op>``          -- native kernels: C++ on the CPU key, CUDA on the CUDA key (``csrc/``).
* ``fastforget::<op>_triton``   -- the Triton kernels (``kernels/``), CPU key only under
  ``TRITON_INTERPRET=1``.

The ``reference`` backend is plain torch and needs no op. Fake (meta) impls and autograd are registered in
``fastforget/ops/<op>.py``; kernels are registered by ``csrc/`` (``TORCH_LIBRARY_IMPL``) and ``kernels/``.
"""

import torch

NAMESPACE = "fastforget"

SCHEMAS = {
    # penalty = lam * sum_i sum_j F_ij (theta_ij - anchor_ij)^2   (0-dim, fp32; fp64 for fp64 params)
    "ewc_penalty": "(Tensor[] params, Tensor[] anchors, Tensor[] fisher, float lam) -> Tensor",
    # d penalty / d params * grad_out = 2 * lam * grad_out * F * (theta - anchor), in the params' dtypes
    "ewc_penalty_backward": (
        "(Tensor[] params, Tensor[] anchors, Tensor[] fisher, float lam, Tensor grad_out) -> Tensor[]"
    ),
    # grads += 2 * lam * F * (theta - anchor) in one pass over the elements; returns the penalty
    "ewc_penalty_accumulate": (
        "(Tensor[] params, Tensor[] anchors, Tensor[] fisher, Tensor(a!)[] grads, float lam) -> Tensor"
    ),
    # fisher = decay * fisher + scale * grads^2 (|grads| when absolute: MAS's importance), in place, one pass
    "fisher_update": "(Tensor(a!)[] fisher, Tensor[] grads, float decay, float scale, bool absolute=False) -> ()",
    # out[i] = sum_k w_k theta_k[i] (fisher empty), or sum_k w_k F~_k theta_k / sum_k w_k F~_k with
    # F~_k = max(F_k, floors[k]) (Matena & Raffel 2022); models / fisher hold K lists of len(out), model-major
    # (models[k * len(out) + i]); out[i] may be one of its own sources; math in fp32 (fp64 for fp64 outputs)
    "weight_merge": "(Tensor(a!)[] out, Tensor[] models, Tensor[] fisher, float[] weights, float[] floors) -> ()",
    # per tensor (count, mean, M2) of inv_scale * grad: a (len(grads), 3) tensor in the accumulation dtype
    "grad_moments": "(Tensor[] grads, Tensor inv_scale) -> Tensor",
    # grads[i] *= factors[i], in place, one pass
    "scale_grads": "(Tensor(a!)[] grads, Tensor factors) -> ()",
    # per-element EMA of x = inv_scale * grads: per tensor, the max over its elements of the updated variance
    # v' = (1 - alpha) (v + alpha (x - m)^2), +inf when one is not finite; nothing is written
    "grad_ema_stats": "(Tensor[] grads, Tensor[] mean, Tensor[] var, Tensor inv_scale, Tensor alpha) -> Tensor",
    # unless skip: m, v <- the EMA update; grads *= 1 - sigmoid(v' var_scale) where that importance > threshold
    "grad_ema_protect": (
        "(Tensor(a!)[] grads, Tensor(b!)[] mean, Tensor(c!)[] var, Tensor inv_scale, Tensor alpha,"
        " Tensor var_scale, Tensor skip, float threshold) -> ()"
    ),
    # LoRA linear, x (M, in) 2-D: returns y = x W^T + bias + S B^T (M, out) and S = scale (x * keep) A^T (M, r),
    # both in x's dtype; keep is the dropout's bool keep-mask (M, in) or None, and the dropout's 1 / (1 - p) is
    # folded into scale by the caller
    "lora_linear": (
        "(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? keep, float scale) "
        "-> (Tensor, Tensor)"
    ),
    # its gradients (dx, dweight, dbias, dlora_A, dlora_B) from grad_y and the saved S; output_mask says which
    # are needed (the others are None)
    "lora_linear_backward": (
        "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? keep, Tensor S, "
        "float scale, bool[5] output_mask) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)"
    ),
    # anchored LM loss, one chunk of rows (logits (C, V), ref_logits (C, V) or None, labels (C,) int64,
    # token_weights (C,) fp32 or None, scale a 1-element fp32 tensor): per row, scale * c * (w CE + kl_weight T^2 KL)
    # (fp32; fp64 for fp64) and its gradient d/dlogits (logits' dtype), c = labels != ignore_index; reverse picks
    # KL(p_theta || p_ref) over KL(p_ref || p_theta); the KL is on logits / T; dft multiplies w by exp(-CE) (DFT)
    "anchored_lm_loss_rows": (
        "(Tensor logits, Tensor? ref_logits, Tensor labels, Tensor? token_weights, Tensor scale, float kl_weight, "
        "float temperature, bool reverse, int ignore_index, bool dft=False) -> (Tensor, Tensor)"
    ),
    # the whole loss, chunk_size rows at a time (GEMMs + anchored_lm_loss_rows): returns the loss (0-dim) and its
    # gradients d hidden, d weight, d bias (None where output_mask says not needed), all computed in the forward;
    # dft as the row op's, eaft_alpha >= 0 multiplies the token weights by the EAFT gate (H20 / 3)^eaft_alpha
    "anchored_lm_loss": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ref_hidden, Tensor? ref_weight, "
        "Tensor? ref_bias, Tensor? token_weights, float kl_weight, float temperature, bool reverse, "
        "int ignore_index, int chunk_size, bool[3] output_mask, bool dft=False, float eaft_alpha=-1.0) "
        "-> (Tensor, Tensor?, Tensor?, Tensor?)"
    ),
    # One AdamW step over a param list with, each optional (an empty list / None when absent): the EWC term
    # g += 2 lam F (theta - anchor), per-tensor protection g *= factors[t] or per-element protection (the EMA
    # update of ema_mean/ema_var as grad_ema_protect), and Synaptic Intelligence omega -= g_task * delta_theta.
    # Unless found_inf: params, exp_avg, exp_avg_sq, steps (+1), ema state and omega updated; grads unchanged.
    # Returns lam * sum F (theta - anchor)^2 at the params before the step (0-dim, fp32)
    "protected_adamw_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, Tensor(d!)[] steps,"
        " Tensor[] anchors, Tensor[] fisher, Tensor? factors, Tensor(e!)[] ema_mean, Tensor(f!)[] ema_var,"
        " Tensor? alpha, Tensor? var_scale, Tensor(g!)[] omega, Tensor? grad_scale, Tensor? found_inf, float lr,"
        " float beta1, float beta2, float eps, float weight_decay, float lam, float threshold, bool maximize)"
        " -> Tensor"
    ),
    # protected_adamw_step with exp_avg / exp_avg_sq as uint8 codes of bitsandbytes' block-wise dynamic quantization
    # (blocks of 256 per tensor, fp32 absmax per block, qmap_signed for exp_avg, qmap_unsigned for exp_avg_sq); the
    # fisher is float (fisher_absmax empty) or uint8 codes (unsigned map, fisher_absmax per param). Dequantize, the
    # 32-bit step's math in fp32, requantize the new moments (new absmax per block); nothing written when found_inf
    "protected_adamw8bit_step": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq,"
        " Tensor(d!)[] exp_avg_absmax, Tensor(e!)[] exp_avg_sq_absmax, Tensor qmap_signed, Tensor qmap_unsigned,"
        " Tensor(f!)[] steps, Tensor[] anchors, Tensor[] fisher, Tensor[] fisher_absmax, Tensor? factors,"
        " Tensor(g!)[] ema_mean, Tensor(h!)[] ema_var, Tensor? alpha, Tensor? var_scale, Tensor(i!)[] omega,"
        " Tensor? grad_scale, Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay,"
        " float lam, float threshold, bool maximize) -> Tensor"
    ),
    # MoFO's radix-select pass: per tensor, a (len(exp_avg), 2048) int32 count of the digit (b >> shift) &
    # (2^digit_bits - 1) of b = the bit pattern of |exp_avg| over the elements with b >> (shift + digit_bits) ==
    # prefix[t] (all of them when shift + digit_bits is the bit width); digit_bits <= 11
    "mofo_histogram": "(Tensor[] exp_avg, Tensor prefix, int shift, int digit_bits) -> Tensor",
    # per tensor, the bit pattern (int64) of the ks[t]-th largest |exp_avg[t]|, -1 where ks[t] == 0: every
    # mofo_histogram pass and the digit choices in one call (one process)
    "mofo_thresholds": "(Tensor[] exp_avg, Tensor ks) -> Tensor",
    # MoFO's masked AdamW update (moments and steps already updated, k = steps[t]): unless found_inf, theta <-
    # theta (1 - lr wd) - the Adam step where bits(|exp_avg|) >= thresholds[t] (int64; -1: nowhere); SI's omega
    # -= g_task delta_theta when omega is given
    "mofo_update": (
        "(Tensor(a!)[] params, Tensor[] exp_avg, Tensor[] exp_avg_sq, Tensor[] steps, Tensor thresholds,"
        " Tensor[] grads, Tensor(b!)[] omega, Tensor? grad_scale, Tensor? found_inf, float lr, float beta1,"
        " float beta2, float eps, float weight_decay, bool maximize) -> ()"
    ),
}

FLAVOURS = ("", "_triton")

_lib = torch.library.Library(NAMESPACE, "DEF")
for _op, _schema in SCHEMAS.items():
    for _flavour in FLAVOURS:
        _lib.define(f"{_op}{_flavour}{_schema}")


def qualname(op: str, flavour: str = "") -> str:
    return f"{NAMESPACE}::{op}{flavour}"
