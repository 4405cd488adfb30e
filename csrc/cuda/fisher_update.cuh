// Fisher accumulation kernel (torch-free; the binding is fisher_update.cu).
//
//   F = decay * F + scale * g^2
//
// One launch covers the whole tensor list (metadata layout: multi_tensor.cuh), each role's dtype read from the
// metadata. The update is computed in acc_t (double when any fisher tensor is fp64, else float) as
// fma(scale * g, g, decay * F), the order of the CPU kernel's at::vec::fmadd, and rounded once to F's dtype.
#pragma once

#include "multi_tensor.cuh"

namespace fastforget::gpu {

// Roles of the TensorMeta records: kUpdateFisher is read and written, kUpdateGrad is read. (EwcRole already
// names kFisher and kGrad in this namespace, hence the prefix.)
enum FisherUpdateRole : int { kUpdateFisher = 0, kUpdateGrad = 1, kFisherUpdateRoles = 2 };

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    fisher_update_kernel(const int64_t* meta_words, int64_t num_tensors, acc_t decay, acc_t scale) {
  const auto [t, begin, end] = block_chunk<kFisherUpdateRoles>(meta_words, num_tensors);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const acc_t g = load<acc_t>(t, kUpdateGrad, i);
    store(t, kUpdateFisher, i, fma(scale * g, g, decay * load<acc_t>(t, kUpdateFisher, i)));
  }
}

// meta_words: device copy of a buffer packed for kFisherUpdateRoles roles with num_blocks planned blocks.
// Queues F = decay * F + scale * g^2 for every kUpdateFisher tensor on `stream`.
template <typename acc_t>
cudaError_t launch_fisher_update(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks, double decay,
                                 double scale, cudaStream_t stream) {
  return launch_blocks(fisher_update_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors,
                       static_cast<acc_t>(decay), static_cast<acc_t>(scale));
}

}  // namespace fastforget::gpu
