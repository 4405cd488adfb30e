// CUDA binding of grad_moments (schema: fastforget/_schemas.py; kernels: grad_moments.cuh).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common.h"
#include "binding.h"
#include "grad_moments.cuh"

namespace fastforget {
namespace {

static_assert(gpu::kMomentsGrad == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// A (len(grads), 3) acc_t tensor: row t = (count, mean, M2) of inv_scale * grads[t].
at::Tensor grad_moments_cuda(at::TensorList grads, const at::Tensor& inv_scale) {
  check_launch(checks::grad_moments(HostLists({grads}).raw(), code_of(accumulate_type(grads)), inv_scale.numel(),
                                    inv_scale.data_ptr()));
  if (grads.empty()) {  // no rows, as the CPU and Triton kernels (docs/ops.md, "Edge cases and bad input")
    return at::empty({0, 3}, inv_scale.options().dtype(at::kFloat));
  }
  check_one_device("grads", grads);
  const c10::cuda::CUDAGuard guard(grads[0].device());
  const auto g = contiguous(grads);
  const DeviceMeta meta = pack_meta<gpu::GradMomentsMeta>({g}, gpu::SetFirstBlock{});
  const auto num_tensors = static_cast<int64_t>(g.size());
  const auto options = g[0].options().dtype(accumulate_type(g));
  at::Tensor partials = at::empty({meta.num_blocks, 2}, options);
  at::Tensor out = at::empty({num_tensors, 3}, options);
  // The kernels read inv_scale on the device (no host sync); this is a no-op when it already is acc_t there.
  const at::Tensor scale = inv_scale.to(g[0].device(), out.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "grad_moments_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_grad_moments<scalar_t>(
        meta.words.data_ptr<int64_t>(), num_tensors, meta.num_blocks, scale.data_ptr<scalar_t>(),
        partials.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) { m.impl("grad_moments", &fastforget::grad_moments_cuda); }
