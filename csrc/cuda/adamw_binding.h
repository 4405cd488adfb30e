// Host-side arguments shared by the CUDA bindings of the AdamW steps (protected_adamw_step.cu,
// protected_adamw8bit_step.cu), computed on the device from the per-tensor tensors: no host sync. Includes torch;
// never included by the torch-free kernel headers.
#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>

#include <optional>

#include "protected_adamw_step.cuh"

namespace fastforget {

struct AdamwDeviceArgs {
  // num_tensors x gpu::kAdamwColumns acc_t: lr / (1 - beta1^k), sqrt(1 - beta2^k) with k = step + 1, and the
  // protection's per-tensor values (1 where unused)
  at::Tensor table;
  at::Tensor grad_factor;  // (maximize ? -1 : 1) / grad_scale, one acc_t
  at::Tensor skip;         // found_inf as one float (0 without)
};

inline AdamwDeviceArgs adamw_device_args(at::TensorList steps, const std::optional<at::Tensor>& factors,
                                         const std::optional<at::Tensor>& alpha,
                                         const std::optional<at::Tensor>& var_scale,
                                         const std::optional<at::Tensor>& grad_scale,
                                         const std::optional<at::Tensor>& found_inf, const at::TensorOptions& options,
                                         double lr, double beta1, double beta2, bool maximize) {
  const at::Tensor k = at::stack(steps).reshape({-1}).to(at::kDouble) + 1;  // bias corrections in fp64, as torch's
  const at::Tensor ones = at::ones({static_cast<int64_t>(steps.size())}, options);
  const auto or_ones = [&](const std::optional<at::Tensor>& t) { return t ? t->reshape({-1}).to(options) : ones; };
  at::Tensor table = at::stack({(lr / (1 - at::pow(beta1, k))).to(options), at::sqrt(1 - at::pow(beta2, k)).to(options),
                                or_ones(factors), or_ones(alpha), or_ones(var_scale)},
                               1)
                         .contiguous();
  at::Tensor grad_factor = at::full({}, maximize ? -1.0 : 1.0, options);
  if (grad_scale) grad_factor = grad_factor / grad_scale->reshape({}).to(options);
  at::Tensor skip = found_inf ? found_inf->reshape({}).to(options.dtype(at::kFloat))
                              : at::zeros({}, options.dtype(at::kFloat));
  return {std::move(table), std::move(grad_factor), std::move(skip)};
}

template <typename acc_t>
gpu::AdamwScalars<acc_t> adamw_scalars(double lr, double beta1, double beta2, double eps, double weight_decay,
                                       double lam, double threshold) {
  return {static_cast<acc_t>(2 * lam), static_cast<acc_t>(1 - lr * weight_decay), static_cast<acc_t>(1 - beta1),
          static_cast<acc_t>(beta2),   static_cast<acc_t>(1 - beta2),             static_cast<acc_t>(eps),
          static_cast<acc_t>(threshold)};
}

// steps += 1 unless the step was skipped (skip read on the device).
inline void advance_steps(at::TensorList steps, const at::Tensor& skip) {
  const at::Tensor taken = 1 - skip;
  for (const auto& step : steps) step.add_(taken.to(step.scalar_type()));
}

}  // namespace fastforget
