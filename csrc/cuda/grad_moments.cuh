// Per-tensor moments of scaled gradients (torch-free; the binding is grad_moments.cu).
//
// For each tensor of the list, with x = inv_scale * g over its n elements: (n, mean, M2 = sum (x - mean)^2), in
// acc_t (double when any grad is fp64, else float). M2 never comes from sum(x^2) - sum(x)^2 / n, whose
// cancellation loses every digit of the spread when |mean| >> std (e.g. x = 1e4 + 1e-3 * noise). Instead:
//
//  * every moment is taken of y = x - k, k being the tensor's first x (as the CPU kernel does): the chunk sums
//    and partial means of y stay small, so their rounding stays far below the spread (near 1e4, fp32 rounds
//    them at about the spread's scale); mean(x) = k + mean(y), M2(x) = M2(y);
//  * grad_moments_chunk_kernel (one block per chunk, metadata layout: multi_tensor.cuh) keeps its y in
//    registers and writes the chunk's (mean, M2) from two fixed-order block reductions: the mean, then
//    sum (y - mean)^2;
//  * grad_moments_merge_kernel (one block per tensor) merges the tensor's chunks with the pairwise update of
//    Chan, Golub & LeVeque ("Updating formulae and a pairwise algorithm for computing sample variances", 1979):
//    for sets a and b, n = na + nb, delta = mean_b - mean_a,
//      mean = mean_a + delta * nb / n,   M2 = M2_a + M2_b + delta^2 * na * nb / n.
//    Thread j merges a contiguous run of chunks in order, then the threads' results merge in a fixed binary tree
//    in shared memory (GPT-2's embedding has 9,424 chunks: one thread alone took longer than the data pass).
//
// No atomics: the result is bitwise reproducible. NaN and Inf propagate into mean and M2.
#pragma once

#include "multi_tensor.cuh"

namespace fastforget::gpu {

enum GradMomentsRole : int { kMomentsGrad = 0, kGradMomentsRoles = 1 };

// The per-tensor record: TensorMeta followed by one word, the index of the tensor's first block in the block map
// (chunk c of the tensor, elements [c * kChunkSize, (c + 1) * kChunkSize), is block first_block + c).
struct GradMomentsMeta : TensorMeta<kGradMomentsRoles> {
  static constexpr int64_t kWords = TensorMeta<kGradMomentsRoles>::kWords + 1;
  int64_t first_block;
};
static_assert(sizeof(GradMomentsMeta) == GradMomentsMeta::kWords * sizeof(int64_t),
              "GradMomentsMeta must be unpadded");

// The shift k of a (non-empty) tensor: its first x. Both kernels compute it with this same expression.
template <typename acc_t>
__device__ __forceinline__ acc_t moments_shift(const GradMomentsMeta& t, acc_t inv_scale) {
  return inv_scale * load<acc_t>(t, kMomentsGrad, 0);
}

// Block b writes partials[2b, 2b + 1] = (mean, M2) of y over its chunk.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    grad_moments_chunk_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* inv_scale,
                              acc_t* partials) {
  constexpr int kPerThread = kChunkSize / kBlockThreads;
  static_assert(kPerThread * kBlockThreads == kChunkSize, "a chunk must fill the block's registers exactly");
  const auto [t, begin, end] = block_chunk<GradMomentsMeta>(meta_words, num_tensors);
  const acc_t scale = *inv_scale;
  const acc_t k = moments_shift(t, scale);
  // Thread j holds elements begin + j + s * kBlockThreads; those past the end hold 0 and are masked below.
  acc_t y[kPerThread];
  acc_t sum = 0;
#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const int64_t i = begin + threadIdx.x + s * kBlockThreads;
    y[s] = i < end ? scale * load<acc_t>(t, kMomentsGrad, i) - k : acc_t(0);
    sum += y[s];
  }
  const acc_t mean = block_allreduce_sum(sum) / static_cast<acc_t>(end - begin);
  acc_t m2 = 0;
#pragma unroll
  for (int s = 0; s < kPerThread; ++s) {
    const acc_t d = begin + threadIdx.x + s * kBlockThreads < end ? y[s] - mean : acc_t(0);
    m2 += d * d;
  }
  m2 = block_reduce_sum(m2);
  if (threadIdx.x == 0) {
    acc_t* partial = partials + 2 * static_cast<int64_t>(blockIdx.x);
    partial[0] = mean;
    partial[1] = m2;
  }
}

template <typename acc_t>
struct Moments {
  acc_t n, mean, m2;
};

// Chan et al.'s merge of two disjoint sets; an empty side returns the other unchanged (a merge into an empty set
// would compute delta^2 * 0, NaN for an infinite delta).
template <typename acc_t>
__device__ __forceinline__ Moments<acc_t> merge_moments(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const acc_t n = a.n + b.n, wb = b.n / n, delta = b.mean - a.mean;
  return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * (a.n * wb)};
}

// Block t writes out[3t .. 3t + 2] = (n, mean, M2) of tensor t's x from its chunks' partials: thread j merges
// chunks [j * per, (j + 1) * per) in order, then a fixed tree over the threads (bitwise reproducible).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    grad_moments_merge_kernel(const int64_t* meta_words, const acc_t* inv_scale, const acc_t* partials,
                              acc_t* out) {
  __shared__ Moments<acc_t> merged[kBlockThreads];
  const GradMomentsMeta t = reinterpret_cast<const GradMomentsMeta*>(meta_words)[blockIdx.x];
  const int64_t chunks = num_chunks(t.numel), per = (chunks + kBlockThreads - 1) / kBlockThreads;
  Moments<acc_t> own{0, 0, 0};
  for (int64_t c = threadIdx.x * per; c < chunks && c < (threadIdx.x + 1) * per; ++c) {
    const int64_t size = t.numel - c * kChunkSize < kChunkSize ? t.numel - c * kChunkSize : kChunkSize;
    const acc_t* chunk = partials + 2 * (t.first_block + c);
    own = merge_moments(own, Moments<acc_t>{static_cast<acc_t>(size), chunk[0], chunk[1]});
  }
  merged[threadIdx.x] = own;
  __syncthreads();
  for (int stride = kBlockThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) merged[threadIdx.x] = merge_moments(merged[threadIdx.x], merged[threadIdx.x + stride]);
    __syncthreads();
  }
  if (threadIdx.x != 0) return;
  acc_t* row = out + 3 * static_cast<int64_t>(blockIdx.x);
  row[0] = static_cast<acc_t>(t.numel);
  row[1] = t.numel == 0 ? acc_t(0) : moments_shift(t, *inv_scale) + merged[0].mean;
  row[2] = merged[0].m2;
}

// meta_words: device copy of a buffer of GradMomentsMeta records with num_blocks planned blocks; num_tensors
// >= 1. inv_scale: one acc_t on the device. partials: 2 * num_blocks acc_t of device scratch. Queues on
// `stream`: out (num_tensors x 3 acc_t, row-major) = (n, mean, M2) of inv_scale * grad for every tensor.
template <typename acc_t>
cudaError_t launch_grad_moments(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                const acc_t* inv_scale, acc_t* partials, acc_t* out, cudaStream_t stream) {
  if (num_tensors > kMaxBlocks) return cudaErrorInvalidConfiguration;
  const cudaError_t err =
      launch_blocks(grad_moments_chunk_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors, inv_scale,
                    partials);
  if (err != cudaSuccess) return err;
  return launch_kernel(grad_moments_merge_kernel<acc_t>, num_tensors, stream, meta_words, inv_scale, partials, out);
}

}  // namespace fastforget::gpu
