// In-place per-tensor gradient scaling kernel (torch-free; the binding is scale_grads.cu).
//
//   grads[t] *= factors[t]
//
// One launch covers the whole tensor list (metadata layout: multi_tensor.cuh, records ScaleGradsMeta), each
// tensor's dtype read from the metadata. The product is computed in acc_t (double when any grad is fp64, else
// float) and rounded once to the grad's dtype.
#pragma once

#include "multi_tensor.cuh"

namespace fastforget::gpu {

enum ScaleGradsRole : int { kScaleGrad = 0, kScaleGradsRoles = 1 };

// The per-tensor record: TensorMeta followed by one word, the tensor's index in the list (that of its factor).
struct ScaleGradsMeta : TensorMeta<kScaleGradsRoles> {
  static constexpr int64_t kWords = TensorMeta<kScaleGradsRoles>::kWords + 1;
  int64_t index;
};
static_assert(sizeof(ScaleGradsMeta) == ScaleGradsMeta::kWords * sizeof(int64_t), "ScaleGradsMeta must be unpadded");

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    scale_grads_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* factors) {
  const auto [t, begin, end] = block_chunk<ScaleGradsMeta>(meta_words, num_tensors);
  const acc_t factor = factors[t.index];
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    store(t, kScaleGrad, i, factor * load<acc_t>(t, kScaleGrad, i));
  }
}

// meta_words: device copy of a buffer of ScaleGradsMeta records with num_blocks planned blocks. factors:
// num_tensors acc_t on the device. Queues grads[t] *= factors[t] for every tensor on `stream`.
template <typename acc_t>
cudaError_t launch_scale_grads(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                               const acc_t* factors, cudaStream_t stream) {
  return launch_blocks(scale_grads_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors, factors);
}

}  // namespace fastforget::gpu
