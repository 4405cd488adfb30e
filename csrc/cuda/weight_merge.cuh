// Weight averaging kernel (torch-free; the binding is weight_merge.cu; the math: fastforget/ops/weight_merge.py).
//
//   linear:  out = sum_k w_k theta_k
//   Fisher:  out = sum_k s_k theta_k / sum_k s_k,   s_k = w_k max(F_k, floor_k)   (Matena & Raffel 2022)
//
// One launch covers the whole out list: the metadata (multi_tensor.cuh) holds one MergeMeta record per out tensor
// and the block map; a second buffer holds one MergeSource record per (model k, tensor i), at k * num_tensors + i,
// with the pointers and dtypes of theta_k[i] and F_k[i] (0 without a Fisher). Each thread reads element j of every
// source, accumulates in acc_t in model order (fma(s_k, theta_k, num)), and writes out element j once, after all
// its reads: out[i] may be one of its own sources.
#pragma once

#include "multi_tensor.cuh"

namespace fastforget::gpu {

// The out tensor's record: TensorMeta<1> and its index in the list (its row of sources).
struct MergeMeta : TensorMeta<1> {
  static constexpr int64_t kWords = TensorMeta<1>::kWords + 1;
  int64_t index;
};
static_assert(sizeof(MergeMeta) == MergeMeta::kWords * sizeof(int64_t), "MergeMeta must be unpadded");

// Roles of a source record: the model's parameter and (optional) its Fisher.
enum MergeSourceRole : int { kTheta = 0, kMergeFisher = 1, kMergeSourceRoles = 2 };
using MergeSource = TensorMeta<kMergeSourceRoles>;

// Writes count MergeSource records into words (count * MergeSource::kWords words): record j has numel[j] elements
// and, in role r, pointer ptr[r * count + j] and DtypeCode dtype[r * count + j] (a role's pointer 0 when absent).
inline void pack_merge_sources(int64_t* words, int64_t count, const int64_t* numel, const int64_t* ptr,
                               const int64_t* dtype) {
  auto* records = reinterpret_cast<MergeSource*>(words);
  for (int64_t j = 0; j < count; ++j) {
    records[j].numel = numel[j];
    for (int r = 0; r < kMergeSourceRoles; ++r) {
      records[j].ptr[r] = ptr[r * count + j];
      records[j].dtype[r] = dtype[r * count + j];
    }
  }
}

// coefs: weights w_0 .. w_{K-1}, then (with a Fisher) floors floor_0 .. floor_{K-1}, in acc_t.
template <typename acc_t, bool kFisher>
__global__ void __launch_bounds__(kBlockThreads)
    weight_merge_kernel(const int64_t* meta_words, int64_t num_tensors, const int64_t* source_words,
                        int64_t num_models, const acc_t* coefs) {
  const auto [t, begin, end] = block_chunk<MergeMeta>(meta_words, num_tensors);
  const auto* sources = reinterpret_cast<const MergeSource*>(source_words) + t.index;
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    acc_t num = 0, den = 0;
    for (int64_t k = 0; k < num_models; ++k) {
      const MergeSource& s = sources[k * num_tensors];
      const acc_t theta = load<acc_t>(s, kTheta, i);
      if (kFisher) {
        const acc_t f = load<acc_t>(s, kMergeFisher, i), floor = coefs[num_models + k];
        const acc_t scaled = coefs[k] * (f < floor ? floor : f);  // keeps a NaN Fisher NaN, as clamp_min does
        num = fma(scaled, theta, num);
        den += scaled;
      } else {
        num = fma(coefs[k], theta, num);
      }
    }
    store(t, 0, i, kFisher ? num / den : num);
  }
}

// meta_words: device copy of num_tensors MergeMeta records and the block map (num_blocks blocks); source_words:
// device copy of num_models * num_tensors MergeSource records; coefs: device acc_t weights (and floors). Queues the
// merge on `stream`.
template <typename acc_t>
cudaError_t launch_weight_merge(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                const int64_t* source_words, int64_t num_models, const acc_t* coefs, bool fisher,
                                cudaStream_t stream) {
  const auto kernel = fisher ? weight_merge_kernel<acc_t, true> : weight_merge_kernel<acc_t, false>;
  return launch_blocks(kernel, num_blocks, stream, meta_words, num_tensors, source_words, num_models, coefs);
}

}  // namespace fastforget::gpu
