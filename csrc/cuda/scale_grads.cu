// CUDA binding of scale_grads (schema: fastforget/_schemas.py; kernel: scale_grads.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "binding.h"
#include "scale_grads.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kScaleGrad == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// grads[t] *= factors[t]; factors is 1-D with one entry per gradient.
void scale_grads_cuda(at::TensorList grads, const at::Tensor& factors) {
  if (grads.empty()) return;
  check_launch(checks::scale_grads(HostLists({grads}).raw(), code_of(accumulate_type(grads)), factors.numel(),
                                   factors.data_ptr()));
  check_one_device("grads", grads);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  // A contiguous grads[t] is its own .contiguous() and is updated in place; the others go through a copy.
  const auto work = contiguous(grads);
  const DeviceMeta meta = pack_meta<gpu::ScaleGradsMeta>({work}, gpu::SetIndex{});
  // The kernel reads the factors on the device (no host sync); this is a no-op when they already are acc_t there.
  const at::Tensor f = factors.to(grads[0].device(), accumulate_type(grads)).contiguous();
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "scale_grads_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_scale_grads<scalar_t>(meta.words.data_ptr<int64_t>(),
                                                     static_cast<int64_t>(work.size()), meta.num_blocks,
                                                     f.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
  });
  copy_back(grads, work);
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("scale_grads", &fastforget::scale_grads_cuda); }
