// CUDA binding of weight_merge (schema: fastforget/_schemas.py; kernel: weight_merge.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "binding.h"
#include "weight_merge.cuh"

namespace fastforget {
namespace {

// A pinned host buffer of `values`, queued for an asynchronous copy to `device` (kept alive by the caching
// allocator's record of the copy).
template <typename T>
at::Tensor to_device(const std::vector<T>& values, at::ScalarType type, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(values.size())}, at::TensorOptions().dtype(type).pinned_memory(true));
  std::copy(values.begin(), values.end(), host.data_ptr<T>());
  return host.to(device, /*non_blocking=*/true);
}

void weight_merge_cuda(at::TensorList out, at::TensorList models_, at::TensorList fisher_,
                       at::ArrayRef<double> weights, at::ArrayRef<double> floors) {
  check_launch(checks::weight_merge(HostLists({out}).raw(), HostLists({models_, fisher_}).raw(),
                                    static_cast<int64_t>(weights.size()), static_cast<int64_t>(floors.size()),
                                    code_of(accumulate_type(out))));
  if (out.empty()) return;
  check_one_device("out", out);
  for (size_t j = 0; j < models_.size(); ++j) {
    const at::Device device = out[j % out.size()].device();
    TORCH_CHECK(models_[j].device() == device && (fisher_.empty() || fisher_[j].device() == device),
                "fastforget: source ", j, " of weight_merge is not on ", device);
  }
  const c10::cuda::CUDAGuard guard(out[0].device());
  // A contiguous out[i] is its own .contiguous() and is written in place; the others go through a copy.
  const auto work = contiguous(out);
  const auto models = contiguous(models_);
  const auto fisher = contiguous(fisher_);
  const DeviceMeta meta = pack_meta<gpu::MergeMeta>({work}, gpu::SetIndex{});
  const auto count = static_cast<int64_t>(models.size());
  std::vector<int64_t> numel(count), ptr(gpu::kMergeSourceRoles * count, 0), dtype(ptr.size(), gpu::kFloat32);
  for (int64_t j = 0; j < count; ++j) {
    numel[j] = models[j].numel();
    ptr[j] = reinterpret_cast<int64_t>(models[j].data_ptr());
    dtype[j] = dtype_code(models[j].scalar_type());
    if (fisher.empty()) continue;
    ptr[count + j] = reinterpret_cast<int64_t>(fisher[j].data_ptr());
    dtype[count + j] = dtype_code(fisher[j].scalar_type());
  }
  std::vector<int64_t> words(count * gpu::MergeSource::kWords);
  gpu::pack_merge_sources(words.data(), count, numel.data(), ptr.data(), dtype.data());
  const at::Tensor sources = to_device(words, at::kLong, work[0].device());
  std::vector<double> coefs(weights.begin(), weights.end());
  coefs.insert(coefs.end(), floors.begin(), floors.end());
  const at::Tensor acc_coefs = to_device(coefs, at::kDouble, work[0].device()).to(accumulate_type(out));
  AT_DISPATCH_FLOATING_TYPES(acc_coefs.scalar_type(), "weight_merge_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_weight_merge<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(work.size()), meta.num_blocks,
        sources.data_ptr<int64_t>(), static_cast<int64_t>(weights.size()), acc_coefs.data_ptr<scalar_t>(),
        !fisher.empty(), c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(out, work);
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("weight_merge", &fastforget::weight_merge_cuda); }
