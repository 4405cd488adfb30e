// Fisher accumulation kernel (torch-free; the binding is fisher_update.cu).
//
//   F = decay * F + scale * sum_{s < k} g_s^2        (absolute: scale * sum_s |g_s|, MAS's importance)
//
// grads[i] holds k >= 0 stacked gradients g_s (k = 1 when it is shaped like fisher[i]). One launch covers the
// whole tensor list (metadata layout: multi_tensor.cuh, records FisherUpdateMeta), each role's dtype read from
// the metadata. The update is computed in acc_t (double when any fisher tensor is fp64, else float) in the order
// of the CPU kernel: acc = decay * F, then acc = fma(scale * g_s, g_s, acc) for s = 0 .. k-1, and acc is rounded
// once to F's dtype. Each F element is read and written once, each g_s element read once.
#pragma once

#include "multi_tensor.cuh"

namespace fastforget::gpu {

// Roles of the TensorMeta records: kUpdateFisher is read and written, kUpdateGrad is read. (EwcRole already
// names kFisher and kGrad in this namespace, hence the prefix.)
enum FisherUpdateRole : int { kUpdateFisher = 0, kUpdateGrad = 1, kFisherUpdateRoles = 2 };

// The per-tensor record: TensorMeta (numel: that of fisher[i]) followed by one word, the number k of gradients
// stacked in grads[i]. Gradient s of element j is grads[i] element s * numel + j (an int64 offset).
struct FisherUpdateMeta : TensorMeta<kFisherUpdateRoles> {
  static constexpr int64_t kWords = TensorMeta<kFisherUpdateRoles>::kWords + 1;
  int64_t samples;
};
static_assert(sizeof(FisherUpdateMeta) == FisherUpdateMeta::kWords * sizeof(int64_t),
              "FisherUpdateMeta must be unpadded");

// pack_meta_words' fill_extra: record i stacks samples[i] gradients.
struct SetSamples {
  const int64_t* samples;
  void operator()(int64_t i, FisherUpdateMeta& m) const { m.samples = samples[i]; }
};

template <typename acc_t, bool kAbs>
__global__ void __launch_bounds__(kBlockThreads)
    fisher_update_kernel(const int64_t* meta_words, int64_t num_tensors, acc_t decay, acc_t scale) {
  const auto [t, begin, end] = block_chunk<FisherUpdateMeta>(meta_words, num_tensors);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    acc_t acc = decay * load<acc_t>(t, kUpdateFisher, i);
    for (int64_t s = 0; s < t.samples; ++s) {
      const acc_t g = load<acc_t>(t, kUpdateGrad, s * t.numel + i);
      acc = kAbs ? fma(scale, abs(g), acc) : fma(scale * g, g, acc);
    }
    store(t, kUpdateFisher, i, acc);
  }
}

// meta_words: device copy of a buffer of FisherUpdateMeta records with num_blocks planned blocks. Queues
// F = decay * F + scale * sum_s g_s^2 (|g_s| when absolute) for every kUpdateFisher tensor on `stream`.
template <typename acc_t>
cudaError_t launch_fisher_update(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks, double decay,
                                 double scale, bool absolute, cudaStream_t stream) {
  const auto kernel = absolute ? fisher_update_kernel<acc_t, true> : fisher_update_kernel<acc_t, false>;
  return launch_blocks(kernel, num_blocks, stream, meta_words, num_tensors, static_cast<acc_t>(decay),
                       static_cast<acc_t>(scale));
}

}  // namespace fastforget::gpu
