// Row kernel of the anchored LM loss (torch-free; the binding is anchored_lm_loss.cu, the math
// fastforget/ops/anchored_lm_loss.py). One kBlockThreads-thread block per row of the chunk:
//
//   pass 1  the maxima of z and of the reference's a (block max-reduction)
//   pass 2  sums of exp(z - m_z), exp(z / T - m_q), exp(a / T - m_r) and the KL cross term (fixed-order block sums)
//   pass 3  d loss / d z_j = s c (w (p_j - [j = y]) + kl_weight T g_j), rounded once to the logits' dtype
//
// With dft (DFT, Wu et al. 2025) w is multiplied by the label's probability exp(-CE), never differentiated.
// All arithmetic in acc_t (double for fp64 logits, else float); every reduction has a fixed order, so the result
// does not depend on scheduling. An ignored row (label == ignore_index) gets loss 0 and a zero gradient; a label
// outside [0, V) (the Python layer rejects those first) gives NaN.
#pragma once

#include <cstdint>
#include <type_traits>

#include "multi_tensor.cuh"

namespace fastforget::gpu {

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ double widen(double v) { return v; }
__device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t narrow(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, __nv_bfloat16>) {
    return to_bfloat16(v);
  } else if constexpr (std::is_same_v<scalar_t, __half>) {
    return to_half(v);
  } else {
    return static_cast<scalar_t>(v);
  }
}

__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float log_of(float v) { return logf(v); }
__device__ __forceinline__ double log_of(double v) { return log(v); }

// The maximum over the block, returned to every thread. May be called any number of times per kernel: each
// call's writes to its shared memory follow the previous call's final barrier.
template <typename acc_t>
__device__ __forceinline__ acc_t block_allreduce_max(acc_t v) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ acc_t warp_max[kWarps];
  __shared__ acc_t total;
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < kWarps ? warp_max[threadIdx.x] : -INFINITY;
    for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_down_sync(0xffffffffu, v, offset));
    if (threadIdx.x == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <typename acc_t>
struct AnchoredOptions {
  int64_t vocab;
  acc_t kl_weight, temperature;
  bool reverse, anchored, dft;
  int64_t ignore_index;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    anchored_lm_loss_rows_kernel(const scalar_t* logits, const scalar_t* ref, const int64_t* labels,
                                 const acc_t* weights, const acc_t* scale, acc_t* loss, scalar_t* grad,
                                 AnchoredOptions<acc_t> o) {
  const int64_t n = o.vocab, row = blockIdx.x;
  const scalar_t* z = logits + row * n;
  const scalar_t* a = o.anchored ? ref + row * n : nullptr;
  scalar_t* d = grad + row * n;
  const int64_t label = labels[row];
  if (label == o.ignore_index) {  // uniform across the block
    for (int64_t j = threadIdx.x; j < n; j += kBlockThreads) d[j] = narrow<scalar_t>(acc_t(0));
    if (threadIdx.x == 0) loss[row] = 0;
    return;
  }
  const acc_t inv_t = acc_t(1) / o.temperature;
  acc_t m_z = -INFINITY, m_a = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += kBlockThreads) {
    m_z = fmax(m_z, acc_t(widen(z[j])));
    if (o.anchored) m_a = fmax(m_a, acc_t(widen(a[j])));
  }
  m_z = block_allreduce_max(m_z);
  const acc_t m_q = m_z * inv_t;  // max(x / T) = max(x) / T for T > 0
  const acc_t m_r = o.anchored ? block_allreduce_max(m_a) * inv_t : acc_t(0);
  acc_t s_z = 0, s_q = 0, s_r = 0, cross = 0;
  for (int64_t j = threadIdx.x; j < n; j += kBlockThreads) {
    const acc_t zj = widen(z[j]);
    s_z += exp_of(zj - m_z);
    if (o.anchored) {
      const acc_t zq = zj * inv_t, aq = acc_t(widen(a[j])) * inv_t;
      const acc_t e_q = exp_of(zq - m_q), e_r = exp_of(aq - m_r);
      s_q += e_q;
      s_r += e_r;
      cross += o.reverse ? e_q * (zq - aq) : e_r * (aq - zq);  // sum q (z - a) / T, or sum r (a - z) / T
    }
  }
  s_z = block_allreduce_sum(s_z);
  const bool valid = label >= 0 && label < n;
  const acc_t lse_z = m_z + log_of(s_z);
  const acc_t ce = valid ? lse_z - acc_t(widen(z[label])) : acc_t(NAN);
  const acc_t c = *scale, w = (weights ? weights[row] : acc_t(1)) * (o.dft ? exp_of(-ce) : acc_t(1));
  acc_t row_loss = c * w * ce, lse_q = 0, lse_r = 0, kl = 0;
  if (o.anchored) {
    s_q = block_allreduce_sum(s_q);
    s_r = block_allreduce_sum(s_r);
    cross = block_allreduce_sum(cross);
    lse_q = m_q + log_of(s_q);
    lse_r = m_r + log_of(s_r);
    kl = o.reverse ? cross / s_q + (lse_r - lse_q) : cross / s_r - (lse_r - lse_q);
    row_loss += c * o.kl_weight * o.temperature * o.temperature * kl;
  }
  const acc_t c_ce = c * w, c_kl = c * o.kl_weight * o.temperature;
  for (int64_t j = threadIdx.x; j < n; j += kBlockThreads) {
    const acc_t zj = widen(z[j]);
    acc_t g = c_ce * (exp_of(zj - lse_z) - acc_t(j == label));
    if (o.anchored) {
      const acc_t zq = zj * inv_t, aq = acc_t(widen(a[j])) * inv_t;
      const acc_t q = exp_of(zq - lse_q);
      g += c_kl * (o.reverse ? q * ((zq - lse_q) - (aq - lse_r) - kl) : q - exp_of(aq - lse_r));
    }
    d[j] = narrow<scalar_t>(valid ? g : acc_t(NAN));
  }
  if (threadIdx.x == 0) loss[row] = row_loss;
}

// Queues the rows' losses (loss[rows], acc_t) and gradients (grad, rows x vocab, the logits' dtype) on `stream`.
// logits, ref (rows x vocab, contiguous; ref unused unless anchored), labels (rows), weights (rows, or null) and
// scale (one acc_t) are device pointers.
template <typename scalar_t, typename acc_t>
cudaError_t launch_anchored_lm_loss_rows(const scalar_t* logits, const scalar_t* ref, const int64_t* labels,
                                         const acc_t* weights, const acc_t* scale, acc_t* loss, scalar_t* grad,
                                         int64_t rows, int64_t vocab, double kl_weight, double temperature,
                                         bool reverse, bool anchored, bool dft, int64_t ignore_index,
                                         cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const AnchoredOptions<acc_t> o{vocab, static_cast<acc_t>(kl_weight), static_cast<acc_t>(temperature), reverse,
                                 anchored, dft, ignore_index};
  return launch_kernel(anchored_lm_loss_rows_kernel<scalar_t, acc_t>, rows, stream, logits, ref, labels, weights,
                       scale, loss, grad, o);
}

}  // namespace fastforget::gpu
