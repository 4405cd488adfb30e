// Per-element gradient protection kernels (torch-free; the binding is grad_ema.cu; math:
// fastforget/ops/grad_ema.py). For x = inv_scale * g and alpha = alpha[t] of the element's tensor t:
//
//   d = x - m,  m' = m + alpha d,  v' = (1 - alpha)(v + alpha d^2)       (Welford-style EMA, Finch 2009)
//
//  * grad_ema_max_kernel (one block per chunk, metadata layout: multi_tensor.cuh) writes its chunk's max v',
//    a NaN counting as +inf; grad_ema_merge_kernel (one block per tensor) takes the max of a tensor's chunk
//    maxima. A max is exact, so the result does not depend on the order: deterministic without atomics.
//  * grad_ema_protect_kernel, unless *skip: m <- m', v <- v', g <- (1 - s) g where
//    s = sigmoid(v' var_scale[t]) > threshold. m and v hold acc_t; g any float dtype, rounded once.
#pragma once

#include "../elementwise.h"
#include "multi_tensor.cuh"

namespace fastforget::gpu {

enum GradEmaRole : int { kEmaGrad = 0, kEmaMean = 1, kEmaVar = 2, kGradEmaRoles = 3 };

// The per-tensor record: TensorMeta, the tensor's index in the list (that of its alpha and var_scale), and the
// index of its first block in the block map (its chunks are blocks first_block, first_block + 1, ...).
struct GradEmaMeta : TensorMeta<kGradEmaRoles> {
  static constexpr int64_t kWords = TensorMeta<kGradEmaRoles>::kWords + 2;
  int64_t index;
  int64_t first_block;
};
static_assert(sizeof(GradEmaMeta) == GradEmaMeta::kWords * sizeof(int64_t), "GradEmaMeta must be unpadded");

// pack_meta_words' fill_extra: index and first_block.
struct SetGradEmaExtra {
  SetFirstBlock first_block;
  void operator()(int64_t i, GradEmaMeta& m) {
    SetIndex{}(i, m);
    first_block(i, m);
  }
};

// Max over a kBlockThreads-thread block; valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_reduce_max(acc_t v) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ acc_t warp_max[kWarps];
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kWarps ? warp_max[threadIdx.x] : acc_t(0);
    for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    grad_ema_max_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* inv_scale, const acc_t* alphas,
                        acc_t* partials) {
  const auto [t, begin, end] = block_chunk<GradEmaMeta>(meta_words, num_tensors);
  const acc_t scale = *inv_scale, alpha = alphas[t.index], keep = acc_t(1) - alpha;
  const auto* m = reinterpret_cast<const acc_t*>(t.ptr[kEmaMean]);
  const auto* v = reinterpret_cast<const acc_t*>(t.ptr[kEmaVar]);
  acc_t best = 0;  // v' >= 0
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const acc_t v_new = math::ema_var(scale * load<acc_t>(t, kEmaGrad, i), m[i], v[i], alpha, keep);
    best = isnan(v_new) ? acc_t(INFINITY) : max(best, v_new);
  }
  best = block_reduce_max(best);
  if (threadIdx.x == 0) partials[blockIdx.x] = best;
}

// Block k: out[index of tensor k] = max of its chunks' maxima (0 for an empty tensor). Each thread takes a strided
// share of the chunks (GPT-2's embedding has 9,424), then the block reduces; a max is exact, so order is free.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    grad_ema_merge_kernel(const int64_t* meta_words, const acc_t* partials, acc_t* out) {
  const GradEmaMeta t = reinterpret_cast<const GradEmaMeta*>(meta_words)[blockIdx.x];
  acc_t best = 0;
  for (int64_t c = threadIdx.x; c < num_chunks(t.numel); c += kBlockThreads) {
    best = max(best, partials[t.first_block + c]);
  }
  best = block_reduce_max(best);
  if (threadIdx.x == 0) out[t.index] = best;
}

template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    grad_ema_protect_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* inv_scale,
                            const acc_t* alphas, const acc_t* var_scales, const bool* skip, acc_t threshold) {
  if (*skip) return;
  const auto [t, begin, end] = block_chunk<GradEmaMeta>(meta_words, num_tensors);
  const acc_t scale = *inv_scale, alpha = alphas[t.index], keep = acc_t(1) - alpha, var_scale = var_scales[t.index];
  auto* m = reinterpret_cast<acc_t*>(t.ptr[kEmaMean]);
  auto* v = reinterpret_cast<acc_t*>(t.ptr[kEmaVar]);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const acc_t g = load<acc_t>(t, kEmaGrad, i), x = scale * g, m_old = m[i];
    const acc_t v_new = math::ema_var(x, m_old, v[i], alpha, keep);
    m[i] = math::ema_mean(x, m_old, alpha);
    v[i] = v_new;
    store(t, kEmaGrad, i, math::protection_factor(exp(-(v_new * var_scale)), threshold) * g);
  }
}

// meta_words: device copy of GradEmaMeta records (index and first_block set) with num_blocks planned blocks.
// inv_scale: one acc_t, alphas: num_tensors acc_t, partials: num_blocks acc_t of scratch, all on the device.
// Queues out[index] = max v' of each tensor (+inf if one is NaN/Inf; out has num_tensors acc_t).
template <typename acc_t>
cudaError_t launch_grad_ema_stats(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                  const acc_t* inv_scale, const acc_t* alphas, acc_t* partials, acc_t* out,
                                  cudaStream_t stream) {
  const cudaError_t err = launch_blocks(grad_ema_max_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors,
                                        inv_scale, alphas, partials);
  if (err != cudaSuccess || num_tensors == 0) return err;
  return launch_kernel(grad_ema_merge_kernel<acc_t>, num_tensors, stream, meta_words, partials, out);
}

// As launch_grad_ema_stats, plus var_scales (num_tensors acc_t) and skip (one bool) on the device: queues the
// in-place update of mean, var and grads (nothing when *skip).
template <typename acc_t>
cudaError_t launch_grad_ema_protect(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                    const acc_t* inv_scale, const acc_t* alphas, const acc_t* var_scales,
                                    const bool* skip, acc_t threshold, cudaStream_t stream) {
  return launch_blocks(grad_ema_protect_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors, inv_scale,
                       alphas, var_scales, skip, threshold);
}

}  // namespace fastforget::gpu
