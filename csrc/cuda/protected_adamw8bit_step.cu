// CUDA binding of protected_adamw8bit_step (schema: fastforget/_schemas.py; kernels: protected_adamw8bit_step.cuh).
// Everything is read on the device (steps, found_inf, grad_scale, the per-tensor tensors): no host sync.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "../protected_adamw8bit_step.h"
#include "adamw_binding.h"
#include "binding.h"
#include "protected_adamw8bit_step.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kAdamwParam == 0, "pack_meta takes the tensor count, sizes and device from role 0");

at::Tensor protected_adamw8bit_step_cuda(
    at::TensorList params_, at::TensorList grads_, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, const at::Tensor& qmap_signed,
    const at::Tensor& qmap_unsigned, at::TensorList steps, at::TensorList anchors_, at::TensorList fisher_,
    at::TensorList fisher_absmax, const std::optional<at::Tensor>& factors, at::TensorList ema_mean,
    at::TensorList ema_var, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& var_scale,
    at::TensorList omega, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    double lr, double beta1, double beta2, double eps, double weight_decay, double lam, double threshold,
    bool maximize) {
  TORCH_CHECK(!params_.empty(), "fastforget: params must not be empty");
  check_protected_adamw8bit_inputs({params_, grads_, exp_avg, exp_avg_sq, anchors_, fisher_, ema_mean, ema_var, omega},
                                   {exp_avg_absmax, exp_avg_sq_absmax, fisher_absmax, qmap_signed, qmap_unsigned},
                                   steps, factors, alpha, var_scale);
  check_one_device("params", params_);
  const c10::cuda::CUDAGuard guard(params_[0].device());
  const auto params = contiguous(params_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  const DeviceMeta meta = pack_meta<gpu::Adamw8bitMeta>(
      {params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega, exp_avg_absmax,
       exp_avg_sq_absmax, fisher_absmax},
      gpu::SetIndex{});
  const auto options = params[0].options().dtype(at::kFloat);
  const AdamwDeviceArgs args =
      adamw_device_args(steps, factors, alpha, var_scale, grad_scale, found_inf, options, lr, beta1, beta2, maximize);
  at::Tensor partials = at::empty({std::max<int64_t>(meta.num_blocks, 1)}, options);
  at::Tensor penalty = at::empty({}, options);
  const int protect = factors ? gpu::kProtectTensor : !ema_mean.empty() ? gpu::kProtectElement : gpu::kProtectNone;
  C10_CUDA_CHECK(gpu::launch_protected_adamw8bit_step<float>(
      meta.words.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), meta.num_blocks, !anchors.empty(),
      protect, !omega.empty(), args.table.data_ptr<float>(), args.grad_factor.data_ptr<float>(),
      adamw_scalars<float>(lr, beta1, beta2, eps, weight_decay, lam, threshold), qmap_signed.data_ptr<float>(),
      qmap_unsigned.data_ptr<float>(), args.skip.data_ptr<float>(), partials.data_ptr<float>(),
      static_cast<float>(lam), penalty.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  copy_back(params_, params);
  advance_steps(steps, args.skip);
  return penalty;
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("protected_adamw8bit_step", &fastforget::protected_adamw8bit_step_cuda);
}
