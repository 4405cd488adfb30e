// CUDA binding of fisher_update (schema: fastforget/_schemas.py; kernel: fisher_update.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../common.h"
#include "binding.h"
#include "fisher_update.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kUpdateFisher == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// Each grads[i] must be on fisher[i]'s device, shaped like it (one gradient) or (k, *fisher[i].shape) (k
// stacked gradients, k >= 0).
void fisher_update_cuda(at::TensorList fisher, at::TensorList grads, double decay, double scale, bool absolute) {
  std::vector<int64_t> samples;  // k = 1 for a grads[i] shaped like fisher[i], else its leading dimension
  check_launch(checks::fisher_update(HostLists({fisher, grads}).raw(), code_of(accumulate_type(fisher)), &samples));
  if (fisher.empty()) return;
  check_one_device("fisher", fisher);
  check_same_devices("grads", grads, "fisher", fisher);
  const c10::cuda::CUDAGuard guard(fisher[0].device());
  // A contiguous fisher[i] is its own .contiguous() and is updated in place; the others go through a copy.
  const auto work = contiguous(fisher);
  const auto g = contiguous(grads);
  const DeviceMeta meta = pack_meta<gpu::FisherUpdateMeta>({work, g}, gpu::SetSamples{samples.data()});
  AT_DISPATCH_FLOATING_TYPES(accumulate_type(fisher), "fisher_update_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_fisher_update<scalar_t>(meta.words.data_ptr<int64_t>(),
                                                       static_cast<int64_t>(work.size()), meta.num_blocks, decay,
                                                       scale, absolute, c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(fisher, work);
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("fisher_update", &fastforget::fisher_update_cuda); }
