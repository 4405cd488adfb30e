// CUDA binding of grad_ema_stats and grad_ema_protect (schemas: fastforget/_schemas.py; kernels: grad_ema.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "binding.h"
#include "grad_ema.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kEmaGrad == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// The records of (grads, mean, var), with each tensor's list index and first block. mean and var must be
// contiguous acc_t tensors shaped like the grads, alpha one value per tensor, and (grad_ema_protect) var_scale too
// (the Python layer checks it; here only what memory safety needs: launch_checks.h, then devices and strides).
DeviceMeta pack_ema_meta(const std::vector<at::Tensor>& grads, at::TensorList mean, at::TensorList var,
                         const at::Tensor& inv_scale, const at::Tensor& alpha, const at::Tensor* var_scale = nullptr,
                         const at::Tensor* skip = nullptr) {
  checks::GradEmaArgs args{inv_scale.numel(), inv_scale.data_ptr(), alpha.numel(), alpha.data_ptr()};
  if (var_scale) {
    args.var_scale_count = var_scale->numel();
    args.var_scale = var_scale->data_ptr();
  }
  if (skip) {
    args.skip_count = skip->numel();
    args.skip = skip->data_ptr();
  }
  const auto acc = accumulate_type(mean);  // the state's dtype, that of the math
  check_launch(checks::grad_ema(HostLists({grads, mean, var}).raw(), code_of(acc), args));
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK(mean[t].is_contiguous() && var[t].is_contiguous(), "fastforget: mean[", t, "] and var[", t,
                "] must be contiguous");
  }
  check_one_device("grads", grads);
  check_same_devices("mean", mean, "grads", grads);
  check_same_devices("var", var, "grads", grads);
  return pack_meta<gpu::GradEmaMeta>({grads, mean, var}, gpu::SetGradEmaExtra{});
}

at::Tensor grad_ema_stats_cuda(at::TensorList grads_, at::TensorList mean, at::TensorList var,
                               const at::Tensor& inv_scale, const at::Tensor& alpha) {
  TORCH_CHECK(!grads_.empty(), "fastforget: grads must not be empty");
  const c10::cuda::CUDAGuard guard(grads_[0].device());
  const auto grads = contiguous(grads_);
  const DeviceMeta meta = pack_ema_meta(grads, mean, var, inv_scale, alpha);
  const auto num_tensors = static_cast<int64_t>(grads.size());
  const auto options = grads[0].options().dtype(accumulate_type(mean));
  at::Tensor partials = at::empty({meta.num_blocks}, options);
  at::Tensor out = at::zeros({num_tensors}, options);
  // Scalars are read on the device (no host sync); these are no-ops when they already are acc_t there.
  const at::Tensor scale = inv_scale.to(options), alphas = alpha.to(options).contiguous();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "grad_ema_stats_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_grad_ema_stats<scalar_t>(
        meta.words.data_ptr<int64_t>(), num_tensors, meta.num_blocks, scale.data_ptr<scalar_t>(),
        alphas.data_ptr<scalar_t>(), partials.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

void grad_ema_protect_cuda(at::TensorList grads_, at::TensorList mean, at::TensorList var,
                           const at::Tensor& inv_scale, const at::Tensor& alpha, const at::Tensor& var_scale,
                           const at::Tensor& skip, double threshold) {
  check_numel("var_scale", var_scale, grads_.size());
  check_numel("skip", skip, 1);
  if (grads_.empty()) return;
  const c10::cuda::CUDAGuard guard(grads_[0].device());
  // A contiguous grads[t] is its own .contiguous() and is updated in place; the others go through a copy.
  const auto grads = contiguous(grads_);
  const DeviceMeta meta = pack_ema_meta(grads, mean, var, inv_scale, alpha, &var_scale, &skip);
  const auto options = grads[0].options().dtype(accumulate_type(mean));
  const at::Tensor scale = inv_scale.to(options), alphas = alpha.to(options).contiguous();
  const at::Tensor var_scales = var_scale.to(options).contiguous();
  const at::Tensor skip_flag = skip.to(options.dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "grad_ema_protect_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_grad_ema_protect<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(grads.size()), meta.num_blocks,
        scale.data_ptr<scalar_t>(), alphas.data_ptr<scalar_t>(), var_scales.data_ptr<scalar_t>(),
        skip_flag.data_ptr<bool>(), static_cast<scalar_t>(threshold), c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(grads_, grads);
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("grad_ema_stats", &fastforget::grad_ema_stats_cuda);
  m.impl("grad_ema_protect", &fastforget::grad_ema_protect_cuda);
}
