// CUDA binding of the anchored LM loss's row op (schema: fastforget/_schemas.py; kernel: anchored_lm_loss.cuh).
// The chunk loop and its cuBLAS GEMMs are fastforget/ops/anchored_lm_loss.py's, shared by every backend.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "anchored_lm_loss.cuh"
#include "binding.h"

namespace fastforget {
namespace {

template <typename scalar_t>
struct DeviceType {
  using type = scalar_t;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};

std::tuple<at::Tensor, at::Tensor> anchored_lm_loss_rows_cuda(const at::Tensor& logits_,
                                                              const std::optional<at::Tensor>& ref_logits,
                                                              const at::Tensor& labels_,
                                                              const std::optional<at::Tensor>& token_weights,
                                                              const at::Tensor& scale_, double kl_weight,
                                                              double temperature, bool reverse, int64_t ignore_index,
                                                              bool dft) {
  TORCH_CHECK(logits_.dim() == 2, "fastforget: logits must be 2-D (rows, vocab), got ", logits_.sizes());
  const int64_t rows = logits_.size(0), vocab = logits_.size(1);
  TORCH_CHECK(labels_.dim() == 1 && labels_.size(0) == rows && labels_.scalar_type() == at::kLong,
              "fastforget: labels must be int64 of shape (", rows, ",), got ", labels_.scalar_type(), " ",
              labels_.sizes());
  const bool anchored = ref_logits.has_value() && ref_logits->defined() && kl_weight != 0;
  if (anchored) {
    TORCH_CHECK(ref_logits->sizes() == logits_.sizes() && ref_logits->scalar_type() == logits_.scalar_type(),
                "fastforget: ref_logits must match logits (", logits_.sizes(), ", ", logits_.scalar_type(), ")");
  }
  const bool weighted = token_weights.has_value() && token_weights->defined();
  if (weighted) {
    TORCH_CHECK(token_weights->dim() == 1 && token_weights->size(0) == rows,
                "fastforget: token_weights must have shape (", rows, ",), got ", token_weights->sizes());
  }
  TORCH_CHECK(scale_.numel() == 1, "fastforget: scale must have one element, got ", scale_.numel());
  const c10::cuda::CUDAGuard guard(logits_.device());
  const auto acc_type = logits_.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor logits = logits_.contiguous(), labels = labels_.contiguous().to(logits_.device());
  const at::Tensor ref = anchored ? ref_logits->contiguous() : logits;
  const at::Tensor weights = weighted ? token_weights->to(logits_.device(), acc_type).contiguous() : at::Tensor();
  const at::Tensor scale = scale_.to(logits_.device(), acc_type).reshape({1});
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_type));
  at::Tensor grad = at::empty({rows, vocab}, logits.options());
  check_launch(checks::anchored_lm_loss_rows({logits.const_data_ptr(), ref.const_data_ptr(), labels.const_data_ptr(),
                                              scale.const_data_ptr(), loss.const_data_ptr(), grad.const_data_ptr(),
                                              rows, vocab, code_of(logits.scalar_type()), temperature, anchored}));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "anchored_lm_loss_rows_cuda", [&] {
    using device_t = typename DeviceType<scalar_t>::type;
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const cudaError_t err = gpu::launch_anchored_lm_loss_rows<device_t, acc_t>(
        reinterpret_cast<const device_t*>(logits.const_data_ptr<scalar_t>()),
        reinterpret_cast<const device_t*>(ref.const_data_ptr<scalar_t>()), labels.const_data_ptr<int64_t>(),
        weighted ? weights.const_data_ptr<acc_t>() : nullptr, scale.const_data_ptr<acc_t>(),
        loss.mutable_data_ptr<acc_t>(), reinterpret_cast<device_t*>(grad.mutable_data_ptr<scalar_t>()), rows, vocab,
        kl_weight, temperature, reverse, anchored, dft, ignore_index, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_CHECK(err);
  });
  return {loss, grad};
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("anchored_lm_loss_rows", &fastforget::anchored_lm_loss_rows_cuda); }
