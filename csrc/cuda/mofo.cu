// CUDA bindings of mofo_histogram, mofo_thresholds and mofo_update (schemas: fastforget/_schemas.py; kernels:
// mofo.cuh). Everything is read on the device (ks, prefix, steps, found_inf, grad_scale): no host sync.
#include <ATen/Dispatch.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/pow.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../common.h"
#include "binding.h"
#include "mofo.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kMofoSelectExpAvg == 0 && gpu::kMofoParam == 0,
              "pack_meta takes the tensor count, sizes and device from role 0");

void check_state(const char* name, at::TensorList tensors, at::ScalarType acc) {
  for (size_t t = 0; t < tensors.size(); ++t) {
    TORCH_CHECK(tensors[t].scalar_type() == acc && tensors[t].is_contiguous(), "fastforget: ", name, "[", t,
                "] must be a contiguous ", acc, " tensor");
  }
}

at::Tensor mofo_histogram_cuda(at::TensorList exp_avg, const at::Tensor& prefix, int64_t shift, int64_t digit_bits) {
  check_numel("prefix", prefix, exp_avg.size());
  TORCH_CHECK(!exp_avg.empty(), "fastforget: exp_avg must not be empty");
  const auto acc = accumulate_type(exp_avg);
  TORCH_CHECK(digit_bits >= 1 && digit_bits <= mofo::kDigitBits && shift >= 0 &&
                  shift + digit_bits <= (acc == at::kDouble ? 64 : 32),
              "fastforget: mofo_histogram: bad digit (shift ", shift, ", ", digit_bits, " bits)");
  check_state("exp_avg", exp_avg, acc);
  check_one_device("exp_avg", exp_avg);
  const c10::cuda::CUDAGuard guard(exp_avg[0].device());
  const DeviceMeta meta = pack_meta<gpu::MofoSelectMeta>({exp_avg}, gpu::SetIndex{});
  const at::Tensor want = prefix.to(exp_avg[0].device(), at::kLong).contiguous();
  at::Tensor out = at::zeros({static_cast<int64_t>(exp_avg.size()), mofo::kBins}, want.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_histogram_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_mofo_histogram<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(exp_avg.size()), meta.num_blocks,
        want.data_ptr<int64_t>(), static_cast<int>(shift), static_cast<int>(digit_bits), out.data_ptr<int>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor mofo_thresholds_cuda(at::TensorList exp_avg, const at::Tensor& ks_) {
  check_numel("ks", ks_, exp_avg.size());
  TORCH_CHECK(!exp_avg.empty(), "fastforget: exp_avg must not be empty");
  const auto acc = accumulate_type(exp_avg);
  check_state("exp_avg", exp_avg, acc);
  check_one_device("exp_avg", exp_avg);
  const c10::cuda::CUDAGuard guard(exp_avg[0].device());
  const DeviceMeta meta = pack_meta<gpu::MofoSelectMeta>({exp_avg}, gpu::SetIndex{});
  const auto count = static_cast<int64_t>(exp_avg.size());
  const at::Tensor ks = ks_.to(exp_avg[0].device(), at::kLong).contiguous();  // each <= numel: the caller's
  const auto options = ks.options();
  at::Tensor hist = at::empty({count, mofo::kBins}, options.dtype(at::kInt));
  at::Tensor need = at::empty({count}, options), prefix = at::empty({count}, options), out = at::empty({count}, options);
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_thresholds_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_mofo_thresholds<scalar_t>(
        meta.words.data_ptr<int64_t>(), count, meta.num_blocks, ks.data_ptr<int64_t>(), hist.data_ptr<int>(),
        need.data_ptr<int64_t>(), prefix.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

void mofo_update_cuda(at::TensorList params_, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                      const at::Tensor& thresholds_, at::TensorList grads_, at::TensorList omega,
                      const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                      double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const auto acc = accumulate_type(params_);
  check_same_layout("exp_avg", exp_avg, params_);
  check_same_layout("exp_avg_sq", exp_avg_sq, params_);
  check_numel("thresholds", thresholds_, params_.size());
  TORCH_CHECK(steps.size() == params_.size(), "fastforget: steps has ", steps.size(), " tensors for ",
              params_.size(), " params");
  if (!omega.empty()) {
    check_same_layout("omega", omega, params_);
    check_same_layout("grads", grads_, params_);
  }
  check_state("exp_avg", exp_avg, acc);
  check_state("exp_avg_sq", exp_avg_sq, acc);
  check_state("omega", omega, acc);
  if (params_.empty()) return;
  check_one_device("params", params_);
  const c10::cuda::CUDAGuard guard(params_[0].device());
  const auto params = contiguous(params_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = omega.empty() ? std::vector<at::Tensor>{} : contiguous(grads_);
  const DeviceMeta meta = pack_meta<gpu::MofoUpdateMeta>({params, exp_avg, exp_avg_sq, grads, omega}, gpu::SetIndex{});
  const auto options = params[0].options().dtype(acc);
  const at::Tensor k = at::stack(steps).reshape({-1}).to(at::kDouble);  // already stepped; bias corrections in fp64
  const at::Tensor table =
      at::stack({(lr / (1 - at::pow(beta1, k))).to(options), at::sqrt(1 - at::pow(beta2, k)).to(options)}, 1)
          .contiguous();
  const at::Tensor thresholds = thresholds_.to(params[0].device(), at::kLong).contiguous();
  at::Tensor grad_factor = at::full({}, maximize ? -1.0 : 1.0, options);
  if (grad_scale) grad_factor = grad_factor / grad_scale->reshape({}).to(options);
  const at::Tensor skip = found_inf ? found_inf->reshape({}).to(options.dtype(at::kFloat))
                                    : at::zeros({}, options.dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_update_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_mofo_update<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), meta.num_blocks, !omega.empty(),
        table.data_ptr<scalar_t>(), thresholds.data_ptr<int64_t>(), grad_factor.data_ptr<scalar_t>(),
        static_cast<scalar_t>(1 - lr * weight_decay), static_cast<scalar_t>(eps), skip.data_ptr<float>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(params_, params);
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("mofo_histogram", &fastforget::mofo_histogram_cuda);
  m.impl("mofo_thresholds", &fastforget::mofo_thresholds_cuda);
  m.impl("mofo_update", &fastforget::mofo_update_cuda);
}
