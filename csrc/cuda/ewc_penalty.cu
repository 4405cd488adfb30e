// CUDA binding of the EWC penalty ops (schemas: fastforget/_schemas.py; kernels: ewc_penalty.cuh).
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
#include "ewc_penalty.cuh"

namespace fastforget {
namespace {

constexpr int kRoles = gpu::kEwcRoles;
static_assert(gpu::kParam == 0, "pack_meta takes the tensor count, sizes and device from role 0");

// launch_checks.h's checks (with_grads: accumulate's grads; grad_out: the backward's), then the devices.
void check_inputs(at::TensorList params, at::TensorList anchors, at::TensorList fisher, at::TensorList grads,
                  bool with_grads, const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(!params.empty(), "fastforget: params must not be empty");
  check_launch(checks::ewc_penalty(HostLists({params, anchors, fisher, grads}).raw(), with_grads,
                                   code_of(accumulate_type(params)), grad_out ? grad_out->numel() : -1,
                                   grad_out ? grad_out->data_ptr() : nullptr));
  check_one_device("params", params);
  check_same_devices("anchors", anchors, "params", params);
  check_same_devices("fisher", fisher, "params", params);
  check_same_devices("grads", grads, "params", params);
}

// The penalty as a 0-dim acc_t tensor; with grads (contiguous), also grads += the gradient.
at::Tensor penalty(at::TensorList params, at::TensorList anchors, at::TensorList fisher, at::TensorList grads,
                   double lam) {
  const DeviceMeta meta = pack_meta<kRoles>({params, anchors, fisher, grads});
  const auto options = params[0].options().dtype(accumulate_type(params));
  at::Tensor partials = at::empty({meta.num_blocks}, options);
  at::Tensor out = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "ewc_penalty_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_ewc_penalty<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(params.size()), meta.num_blocks, lam,
        /*accumulate=*/!grads.empty(), partials.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
        c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

at::Tensor ewc_penalty_cuda(at::TensorList params, at::TensorList anchors, at::TensorList fisher, double lam) {
  check_inputs(params, anchors, fisher, {}, false);
  const c10::cuda::CUDAGuard guard(params[0].device());
  return penalty(contiguous(params), contiguous(anchors), contiguous(fisher), {}, lam);
}

std::vector<at::Tensor> ewc_penalty_backward_cuda(at::TensorList params, at::TensorList anchors,
                                                  at::TensorList fisher, double lam, const at::Tensor& grad_out) {
  check_inputs(params, anchors, fisher, {}, false, &grad_out);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto p = contiguous(params), a = contiguous(anchors), f = contiguous(fisher);
  std::vector<at::Tensor> grads;
  grads.reserve(p.size());
  for (const auto& t : p) grads.push_back(at::empty(t.sizes(), t.options()));

  const DeviceMeta meta = pack_meta<kRoles>({p, a, f, grads});
  // The kernel reads grad_out on the device (no host sync); this is a no-op when it already is acc_t there.
  const at::Tensor g = grad_out.to(params[0].device(), accumulate_type(params));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "ewc_penalty_backward_cuda", [&] {
    C10_CUDA_CHECK(gpu::launch_ewc_penalty_backward<scalar_t>(
        meta.words.data_ptr<int64_t>(), static_cast<int64_t>(p.size()), meta.num_blocks, lam,
        g.data_ptr<scalar_t>(), c10::cuda::getCurrentCUDAStream()));
  });
  return grads;
}

at::Tensor ewc_penalty_accumulate_cuda(at::TensorList params, at::TensorList anchors, at::TensorList fisher,
                                       at::TensorList grads, double lam) {
  check_inputs(params, anchors, fisher, grads, true);
  const c10::cuda::CUDAGuard guard(params[0].device());
  // A contiguous grad is its own .contiguous() and is updated in place; the others go through a copy.
  const auto work = contiguous(grads);
  at::Tensor out = penalty(contiguous(params), contiguous(anchors), contiguous(fisher), work, lam);
  copy_back(grads, work);
  return out;
}

}  // namespace
}  // namespace fastforget

TORCH_LIBRARY_IMPL(fastforget, CUDA, m) {
  m.impl("ewc_penalty", &fastforget::ewc_penalty_cuda);
  m.impl("ewc_penalty_backward", &fastforget::ewc_penalty_backward_cuda);
  m.impl("ewc_penalty_accumulate", &fastforget::ewc_penalty_accumulate_cuda);
}
