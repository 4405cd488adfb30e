// Host-side argument checks of protected_adamw8bit_step, shared by the CPU and CUDA bindings (never by kernel
// bodies): the 32-bit step's (protected_adamw_step.h) with uint8 moments, plus the block scales, the maps and an
// 8-bit Fisher -- what memory safety needs, checked before anything is written (the Python layer checks the rest,
// with full messages: fastforget/ops/protected_adamw8bit_step.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "protected_adamw_step.h"

namespace fastforget {

constexpr int64_t kQuantBlockSize = 256;  // bitsandbytes' optimizer block; blocks restart at each tensor

inline int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlockSize - 1) / kQuantBlockSize; }

// The 8-bit step's lists besides AdamwLists (whose exp_avg, exp_avg_sq hold uint8 codes, and fisher uint8 codes
// when fisher_absmax is not empty).
struct QuantizedLists {
  at::TensorList exp_avg_absmax, exp_avg_sq_absmax, fisher_absmax;
  const at::Tensor& qmap_signed;
  const at::Tensor& qmap_unsigned;
};

// One contiguous fp32 scale per block of each params[i], on its device.
inline void check_absmax(const char* name, at::TensorList absmax, at::TensorList params) {
  TORCH_CHECK(absmax.size() == params.size(), "fastforget: ", name, " has ", absmax.size(), " tensors for ",
              params.size(), " params");
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(absmax[t].scalar_type() == at::kFloat && absmax[t].is_contiguous() &&
                    absmax[t].numel() == quant_blocks(params[t].numel()) && absmax[t].device() == params[t].device(),
                "fastforget: ", name, "[", t, "] must be a contiguous float32 tensor of ",
                quant_blocks(params[t].numel()), " elements on ", params[t].device());
  }
}

inline void check_qmap(const char* name, const at::Tensor& qmap, at::TensorList params) {
  TORCH_CHECK(qmap.scalar_type() == at::kFloat && qmap.is_contiguous() && qmap.numel() == 256 &&
                  (params.empty() || qmap.device() == params[0].device()),
              "fastforget: ", name, " must be a contiguous float32 tensor of 256 elements on the params' device");
}

inline void check_protected_adamw8bit_inputs(const AdamwLists& l, const QuantizedLists& q, at::TensorList steps,
                                             const std::optional<at::Tensor>& factors,
                                             const std::optional<at::Tensor>& alpha,
                                             const std::optional<at::Tensor>& var_scale) {
  TORCH_CHECK(accumulate_type(l.params) == at::kFloat, "fastforget: the 8-bit step takes fp32/bf16/fp16 params");
  check_protected_adamw_inputs(l, steps, factors, alpha, var_scale, at::kFloat, at::kByte);
  check_absmax("exp_avg_absmax", q.exp_avg_absmax, l.params);
  check_absmax("exp_avg_sq_absmax", q.exp_avg_sq_absmax, l.params);
  TORCH_CHECK(q.fisher_absmax.empty() || !l.fisher.empty(), "fastforget: fisher_absmax without fisher");
  if (!q.fisher_absmax.empty()) check_absmax("fisher_absmax", q.fisher_absmax, l.params);
  for (size_t t = 0; t < l.fisher.size(); ++t) {
    const bool codes = !q.fisher_absmax.empty();
    TORCH_CHECK(codes ? l.fisher[t].scalar_type() == at::kByte && l.fisher[t].is_contiguous()
                      : at::isFloatingType(l.fisher[t].scalar_type()),
                "fastforget: fisher[", t, "] must be ", codes ? "contiguous uint8 codes (fisher_absmax is given)"
                                                                : "a floating point tensor");
    TORCH_CHECK(at::isFloatingType(l.anchors[t].scalar_type()), "fastforget: anchors[", t,
                "] must be a floating point tensor");
  }
  check_qmap("qmap_signed", q.qmap_signed, l.params);
  check_qmap("qmap_unsigned", q.qmap_unsigned, l.params);
}

}  // namespace fastforget
