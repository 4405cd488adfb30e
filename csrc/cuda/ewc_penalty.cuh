// EWC penalty kernels (torch-free; the binding is ewc_penalty.cu).
//
//   penalty  = lam * sum_i sum_j F_ij * d_ij^2,   d = theta - anchor
//   gradient = d penalty / d theta = 2 * lam * F * d
//
// One launch covers the whole tensor list (metadata layout: multi_tensor.cuh). Each role's dtype is read from
// the metadata, and all arithmetic is done in acc_t (double when any param is fp64, else float), in the same
// order as the CPU kernels: fd = F * d, then fd * d (summed) and c * fd (c = 2 * lam, times grad_out in
// backward); the sum and the gradient update may contract into fmas, as the CPU's at::vec::fmadd does.
#pragma once

#include "../elementwise.h"
#include "multi_tensor.cuh"

namespace fastforget::gpu {

// Roles of the TensorMeta records. kGrad holds grads (accumulate: read and written), the output (backward:
// written) or nothing (penalty).
enum EwcRole : int { kParam = 0, kAnchor = 1, kFisher = 2, kGrad = 3, kEwcRoles = 4 };

// Block b writes partials[b] = sum of F * d^2 over its chunk (fixed order, see block_reduce_sum).
// kAccumulate: also grad += two_lam * F * d in the same pass (each element read once, grad written once).
template <typename acc_t, bool kAccumulate>
__global__ void __launch_bounds__(kBlockThreads)
    ewc_penalty_kernel(const int64_t* meta_words, int64_t num_tensors, acc_t two_lam, acc_t* partials) {
  const auto [t, begin, end] = block_chunk<TensorMeta<kEwcRoles>>(meta_words, num_tensors);
  acc_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const auto [d, fd] =
        math::ewc_term(load<acc_t>(t, kParam, i), load<acc_t>(t, kAnchor, i), load<acc_t>(t, kFisher, i));
    sum += fd * d;
    if constexpr (kAccumulate) store(t, kGrad, i, load<acc_t>(t, kGrad, i) + two_lam * fd);
  }
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// out = (two_lam * grad_out) * (F * d), grad_out being the incoming gradient (one acc_t on the device).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    ewc_penalty_backward_kernel(const int64_t* meta_words, int64_t num_tensors, acc_t two_lam,
                                const acc_t* grad_out) {
  const auto [t, begin, end] = block_chunk<TensorMeta<kEwcRoles>>(meta_words, num_tensors);
  const acc_t scale = two_lam * *grad_out;
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const auto term = math::ewc_term(load<acc_t>(t, kParam, i), load<acc_t>(t, kAnchor, i), load<acc_t>(t, kFisher, i));
    store(t, kGrad, i, scale * term.fd);
  }
}

// meta_words: device copy of a buffer packed for kEwcRoles roles with num_blocks planned blocks (kGrad unused
// unless accumulate). partials: num_blocks acc_t of device scratch. Queues on `stream`: *out = the penalty
// and, if accumulate, grads += the gradient.
template <typename acc_t>
cudaError_t launch_ewc_penalty(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks, double lam,
                               bool accumulate, acc_t* partials, acc_t* out, cudaStream_t stream) {
  const acc_t lam_acc = static_cast<acc_t>(lam);
  const auto kernel = accumulate ? ewc_penalty_kernel<acc_t, true> : ewc_penalty_kernel<acc_t, false>;
  const cudaError_t err =
      launch_blocks(kernel, num_blocks, stream, meta_words, num_tensors, acc_t(2) * lam_acc, partials);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partials, num_blocks, lam_acc, out, stream);
}

// Queues kGrad tensors = 2 * lam * grad_out * F * (theta - anchor) on `stream`.
template <typename acc_t>
cudaError_t launch_ewc_penalty_backward(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                        double lam, const acc_t* grad_out, cudaStream_t stream) {
  return launch_blocks(ewc_penalty_backward_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors,
                       acc_t(2) * static_cast<acc_t>(lam), grad_out);
}

}  // namespace fastforget::gpu
