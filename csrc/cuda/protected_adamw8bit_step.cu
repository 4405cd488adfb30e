// CUDA binding of protected_adamw8bit_step (schema: fastforget/_schemas.py; kernels: protected_adamw8bit_step.cuh).
// Everything is read on the device (steps, found_inf, grad_scale, the per-tensor tensors): no host sync.
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
#include "protected_adamw8bit_step.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kAdamwParam == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// An 8-bit state: uint8 codes shaped like the params and one fp32 absmax per quantization block, all contiguous.
void check_quantized(const char* name, at::TensorList codes, at::TensorList absmax, at::TensorList params) {
  check_same_layout(name, codes, params);
  TORCH_CHECK(absmax.size() == params.size(), "fastforget: the absmax of ", name, " has ", absmax.size(),
              " tensors for ", params.size(), " params");
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t blocks = (params[t].numel() + math::kQuantBlock - 1) / math::kQuantBlock;
    TORCH_CHECK(codes[t].scalar_type() == at::kByte && codes[t].is_contiguous(), "fastforget: ", name, "[", t,
                "] must be contiguous uint8 codes");
    TORCH_CHECK(absmax[t].scalar_type() == at::kFloat && absmax[t].is_contiguous() && absmax[t].numel() == blocks &&
                    absmax[t].device() == params[t].device(),
                "fastforget: the absmax of ", name, "[", t, "] must be ", blocks, " contiguous fp32 values on ",
                params[t].device());
  }
}

void check_map(const char* name, const at::Tensor& map, const at::Tensor& param) {
  TORCH_CHECK(map.scalar_type() == at::kFloat && map.numel() == math::kCodeSize && map.device() == param.device(),
              "fastforget: ", name, " must be ", math::kCodeSize, " fp32 values on ", param.device());
}

// What memory safety needs, checked before anything is written (the Python layer checks the rest, with full
// messages: fastforget/ops/protected_adamw8bit_step.py).
void check_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                  at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, const at::Tensor& qmap_signed,
                  const at::Tensor& qmap_unsigned, at::TensorList steps, at::TensorList anchors,
                  at::TensorList fisher, at::TensorList fisher_absmax, const std::optional<at::Tensor>& factors,
                  at::TensorList ema_mean, at::TensorList ema_var, const std::optional<at::Tensor>& alpha,
                  const std::optional<at::Tensor>& var_scale, at::TensorList omega) {
  TORCH_CHECK(!params.empty(), "fastforget: params must not be empty");
  TORCH_CHECK(accumulate_type(params) == at::kFloat, "fastforget: the 8-bit step takes fp32, bf16 or fp16 params");
  check_one_device("params", params);
  check_same_layout("grads", grads, params);
  check_quantized("exp_avg", exp_avg, exp_avg_absmax, params);
  check_quantized("exp_avg_sq", exp_avg_sq, exp_avg_sq_absmax, params);
  check_map("qmap_signed", qmap_signed, params[0]);
  check_map("qmap_unsigned", qmap_unsigned, params[0]);
  TORCH_CHECK(steps.size() == params.size(), "fastforget: steps has ", steps.size(), " tensors for ", params.size(),
              " params");
  for (const auto& s : steps) TORCH_CHECK(s.numel() == 1, "fastforget: every steps[i] must have one element");
  TORCH_CHECK(anchors.empty() == fisher.empty(), "fastforget: anchors and fisher come together");
  if (!anchors.empty()) {
    check_same_layout("anchors", anchors, params);
    if (fisher_absmax.empty()) {
      check_same_layout("fisher", fisher, params);
      for (size_t t = 0; t < fisher.size(); ++t) {
        TORCH_CHECK(fisher[t].is_floating_point(), "fastforget: fisher[", t, "] is ", fisher[t].scalar_type(),
                    "; 8-bit codes come with fisher_absmax");
      }
    } else {
      check_quantized("fisher", fisher, fisher_absmax, params);
    }
  }
  TORCH_CHECK(!anchors.empty() || fisher_absmax.empty(), "fastforget: fisher_absmax comes with an 8-bit fisher");
  const std::pair<const char*, at::TensorList> state[] = {
      {"ema_mean", ema_mean}, {"ema_var", ema_var}, {"omega", omega}};
  for (const auto& [name, list] : state) {
    if (list.empty()) continue;
    check_same_layout(name, list, params);
    for (size_t t = 0; t < list.size(); ++t) {
      TORCH_CHECK(list[t].scalar_type() == at::kFloat && list[t].is_contiguous(), "fastforget: ", name, "[", t,
                  "] must be a contiguous fp32 tensor");
    }
  }
  TORCH_CHECK(ema_mean.empty() == ema_var.empty(), "fastforget: ema_mean and ema_var come together");
  check_per_tensor("factors", factors, params.size());
  check_per_tensor("alpha", alpha, params.size());
  check_per_tensor("var_scale", var_scale, params.size());
  TORCH_CHECK(ema_mean.empty() == !alpha.has_value() && ema_mean.empty() == !var_scale.has_value(),
              "fastforget: ema_mean/ema_var, alpha and var_scale come together");
  TORCH_CHECK(!(factors && !ema_mean.empty()), "fastforget: factors and ema_mean exclude each other");
}

at::Tensor protected_adamw8bit_step_cuda(
    at::TensorList params_, at::TensorList grads_, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, const at::Tensor& qmap_signed,
    const at::Tensor& qmap_unsigned, at::TensorList steps, at::TensorList anchors_, at::TensorList fisher_,
    at::TensorList fisher_absmax, const std::optional<at::Tensor>& factors, at::TensorList ema_mean,
    at::TensorList ema_var, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& var_scale,
    at::TensorList omega, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    double lr, double beta1, double beta2, double eps, double weight_decay, double lam, double threshold,
    bool maximize) {
  check_inputs(params_, grads_, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, qmap_signed, qmap_unsigned,
               steps, anchors_, fisher_, fisher_absmax, factors, ema_mean, ema_var, alpha, var_scale, omega);
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
  const at::Tensor signed_map = qmap_signed.contiguous(), unsigned_map = qmap_unsigned.contiguous();
  at::Tensor partials = at::empty({std::max<int64_t>(meta.num_blocks, 1)}, options);
  at::Tensor penalty = at::empty({}, options);
  const int protect = factors ? gpu::kProtectTensor : !ema_mean.empty() ? gpu::kProtectElement : gpu::kProtectNone;
  C10_CUDA_CHECK(gpu::launch_protected_adamw8bit_step<float>(
      meta.words.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), meta.num_blocks, !anchors.empty(),
      protect, !omega.empty(), args.table.data_ptr<float>(), args.grad_factor.data_ptr<float>(),
      adamw_scalars<float>(lr, beta1, beta2, eps, weight_decay, lam, threshold),
      signed_map.data_ptr<float>(), unsigned_map.data_ptr<float>(), args.skip.data_ptr<float>(), partials.data_ptr<float>(), static_cast<float>(lam), penalty.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream()));
  copy_back(params_, params);
  advance_steps(steps, args.skip);
  return penalty;
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("protected_adamw8bit_step", &fastforget::protected_adamw8bit_step_cuda);
}
