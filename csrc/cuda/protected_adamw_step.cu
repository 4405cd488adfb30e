// CUDA binding of protected_adamw_step (schema: fastforget/_schemas.py; kernels: protected_adamw_step.cuh).
// Everything is read on the device (steps, found_inf, grad_scale, the per-tensor tensors): no host sync.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "../protected_adamw_step.h"
#include "adamw_binding.h"
#include "binding.h"
#include "protected_adamw_step.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kAdamwParam == 0, "pack_meta takes the tensor count, sizes and device from role 0");

at::Tensor protected_adamw_step_cuda(
    at::TensorList params_, at::TensorList grads_, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    at::TensorList steps, at::TensorList anchors_, at::TensorList fisher_, const std::optional<at::Tensor>& factors,
    at::TensorList ema_mean, at::TensorList ema_var, const std::optional<at::Tensor>& alpha,
    const std::optional<at::Tensor>& var_scale, at::TensorList omega, const std::optional<at::Tensor>& grad_scale,
    const std::optional<at::Tensor>& found_inf, double lr, double beta1, double beta2, double eps,
    double weight_decay, double lam, double threshold, bool maximize) {
  TORCH_CHECK(!params_.empty(), "fastforget: params must not be empty");
  const auto acc = accumulate_type(params_);
  const bool ewc = !anchors_.empty() || !fisher_.empty(), si = !omega.empty();
  const int protect = factors                                  ? gpu::kProtectTensor
                      : !ema_mean.empty() || !ema_var.empty() ? gpu::kProtectElement
                                                              : gpu::kProtectNone;
  check_launch(checks::protected_adamw_step(
      HostLists({params_, grads_, exp_avg, exp_avg_sq, anchors_, fisher_, ema_mean, ema_var, omega}).raw(),
      code_of(acc), ewc, protect, si));
  check_protected_adamw_inputs({params_, grads_, exp_avg, exp_avg_sq, anchors_, fisher_, ema_mean, ema_var, omega},
                               steps, factors, alpha, var_scale, acc);
  check_one_device("params", params_);
  const c10::cuda::CUDAGuard guard(params_[0].device());
  const auto params = contiguous(params_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  const DeviceMeta meta = pack_meta<gpu::AdamwMeta>(
      {params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega},
      gpu::SetIndex{});
  const auto options = params[0].options().dtype(acc);
  const AdamwDeviceArgs args =
      adamw_device_args(steps, factors, alpha, var_scale, grad_scale, found_inf, options, lr, beta1, beta2, maximize);
  at::Tensor partials = at::empty({std::max<int64_t>(meta.num_blocks, 1)}, options);
  at::Tensor penalty = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "protected_adamw_step_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_protected_adamw_step<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), meta.num_blocks, ewc, protect, si,
        args.table.data_ptr<scalar_t>(), args.grad_factor.data_ptr<scalar_t>(),
        adamw_scalars<scalar_t>(lr, beta1, beta2, eps, weight_decay, lam, threshold), args.skip.data_ptr<float>(),
        partials.data_ptr<scalar_t>(), static_cast<scalar_t>(lam), penalty.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(params_, params);
  advance_steps(steps, args.skip);
  return penalty;
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("protected_adamw_step", &fastforget::protected_adamw_step_cuda); }
