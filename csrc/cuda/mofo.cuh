// MoFO's kernels on the GPU (torch-free; the binding is mofo.cu; math: fastforget/ops/mofo.py and csrc/mofo.h).
//
// The exact threshold is a radix select over the bit patterns b of |exp_avg| (11-bit digits, most significant
// first: three passes for fp32, six for fp64), entirely on the device (no host sync):
//  * mofo_histogram_kernel (one block per chunk, layout: multi_tensor.cuh): the block counts the digit of its
//    elements that match the tensor's prefix into a shared-memory histogram, then adds its nonzero bins to the
//    tensor's row of the output. Integer atomics only: counts are exact in any order, so the result is
//    deterministic.
//  * mofo_pick_kernel (one thread per tensor): scans its tensor's row from the top bin, picks the digit holding
//    the need-th largest element, extends the prefix, lowers need by the elements above, and zeroes the row for
//    the next pass; the last pass writes the threshold (the prefix; -1 where k == 0).
// mofo_update_kernel: the masked AdamW update and SI's path integral (one block per chunk).
#pragma once

#include "../mofo.h"
#include "multi_tensor.cuh"

namespace fastforget::gpu {

// The per-tensor record: TensorMeta and the tensor's index in the list (its row of the per-tensor arguments).
template <int R>
struct MofoMeta : TensorMeta<R> {
  static constexpr int64_t kWords = TensorMeta<R>::kWords + 1;
  int64_t index;
};

enum MofoSelectRole : int { kMofoSelectExpAvg = 0, kMofoSelectRoles = 1 };
enum MofoUpdateRole : int {
  kMofoParam = 0,
  kMofoExpAvg = 1,
  kMofoExpAvgSq = 2,
  kMofoGrad = 3,
  kMofoOmega = 4,
  kMofoUpdateRoles = 5,
};
using MofoSelectMeta = MofoMeta<kMofoSelectRoles>;
using MofoUpdateMeta = MofoMeta<kMofoUpdateRoles>;
static_assert(sizeof(MofoSelectMeta) == MofoSelectMeta::kWords * sizeof(int64_t), "MofoMeta must be unpadded");
static_assert(sizeof(MofoUpdateMeta) == MofoUpdateMeta::kWords * sizeof(int64_t), "MofoMeta must be unpadded");

// Adds the block's count of digit (b >> shift) & (2^digit_bits - 1), over its chunk's elements whose higher bits
// equal prefix[t], to out[t * kBins + digit] (exp_avg is acc_t: the optimizer state).
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    mofo_histogram_kernel(const int64_t* meta_words, int64_t num_tensors, const int64_t* prefix, int shift,
                          int digit_bits, int* out) {
  __shared__ int counts[mofo::kBins];
  for (int b = threadIdx.x; b < mofo::kBins; b += kBlockThreads) counts[b] = 0;
  __syncthreads();
  const auto [t, begin, end] = block_chunk<MofoSelectMeta>(meta_words, num_tensors);
  const auto* m = reinterpret_cast<const acc_t*>(t.ptr[kMofoSelectExpAvg]);
  const int64_t want = prefix[t.index];
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const int digit = mofo::digit_of<acc_t>(mofo::abs_bits(m[i]), want, shift, digit_bits);
    if (digit >= 0) atomicAdd(&counts[digit], 1);
  }
  __syncthreads();
  int* row = out + t.index * mofo::kBins;
  for (int b = threadIdx.x; b < mofo::kBins; b += kBlockThreads) {
    if (counts[b] != 0) atomicAdd(&row[b], counts[b]);
  }
}

// Thread t (< num_tensors) of the select's first launch: need[t] = max(ks[t], 1), prefix[t] = 0, hist row zeroed.
__global__ void __launch_bounds__(kBlockThreads)
    mofo_select_init_kernel(int64_t num_tensors, const int64_t* ks, int64_t* need, int64_t* prefix, int* hist) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (t >= num_tensors) return;
  need[t] = ks[t] > 1 ? ks[t] : 1;
  prefix[t] = 0;
  for (int64_t b = 0; b < mofo::kBins; ++b) hist[t * mofo::kBins + b] = 0;
}

// Thread t: the digit of this pass (the largest d with at least need[t] elements at or above it), as
// radix_thresholds in csrc/cpu/mofo.cpp; the row is zeroed for the next pass. last: out[t] = the threshold.
__global__ void __launch_bounds__(kBlockThreads)
    mofo_pick_kernel(int64_t num_tensors, int digit_bits, int* hist, int64_t* need, int64_t* prefix,
                     const int64_t* ks, bool last, int64_t* out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x;
  if (t >= num_tensors) return;
  int* row = hist + t * mofo::kBins;
  int64_t digit = (int64_t{1} << digit_bits) - 1, above = 0;
  for (; digit > 0 && above + row[digit] < need[t]; --digit) above += row[digit];
  need[t] -= above;
  prefix[t] = (prefix[t] << digit_bits) + digit;
  for (int64_t b = 0; b < mofo::kBins; ++b) row[b] = 0;
  if (last) out[t] = ks[t] > 0 ? prefix[t] : -1;
}

// meta_words: device copy of MofoSelectMeta records (index set) with num_blocks planned blocks; prefix: one int64
// per tensor; out: num_tensors x kBins int32, zeroed by the caller; all on the device. Queues the histogram pass.
template <typename acc_t>
cudaError_t launch_mofo_histogram(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                  const int64_t* prefix, int shift, int digit_bits, int* out, cudaStream_t stream) {
  return launch_blocks(mofo_histogram_kernel<acc_t>, num_blocks, stream, meta_words, num_tensors, prefix, shift,
                       digit_bits, out);
}

// The whole select: ks (num_tensors int64, each <= its tensor's numel); scratch: hist (num_tensors x kBins int32),
// need and prefix (num_tensors int64 each); out (num_tensors int64): the threshold bit patterns. All on the device.
template <typename acc_t>
cudaError_t launch_mofo_thresholds(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                   const int64_t* ks, int* hist, int64_t* need, int64_t* prefix, int64_t* out,
                                   cudaStream_t stream) {
  const int64_t grid = (num_tensors + kBlockThreads - 1) / kBlockThreads;
  cudaError_t err = launch_kernel(mofo_select_init_kernel, grid, stream, num_tensors, ks, need, prefix, hist);
  constexpr int kWidth = 8 * sizeof(acc_t);
  for (int top = kWidth; top > 0 && err == cudaSuccess; top -= mofo::kDigitBits) {
    const int shift = top > mofo::kDigitBits ? top - mofo::kDigitBits : 0, digit_bits = top - shift;
    err = launch_mofo_histogram<acc_t>(meta_words, num_tensors, num_blocks, prefix, shift, digit_bits, hist, stream);
    if (err == cudaSuccess) {
      err = launch_kernel(mofo_pick_kernel, grid, stream, num_tensors, digit_bits, hist, need, prefix, ks, shift == 0,
                          out);
    }
  }
  return err;
}

// Columns of the update's per-tensor table (num_tensors x kMofoColumns acc_t, on the device).
enum MofoColumn : int { kMofoStepSize = 0, kMofoBiasCorrection2Sqrt = 1 };
constexpr int kMofoColumns = 2;

template <typename acc_t, bool kSi>
__global__ void __launch_bounds__(kBlockThreads)
    mofo_update_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* per_tensor,
                       const int64_t* thresholds, const acc_t* grad_factor, acc_t decay, acc_t eps,
                       const float* found_inf) {
  if (*found_inf != 0.0f) return;  // uniform over the grid: a skipped step writes nothing
  const auto [t, begin, end] = block_chunk<MofoUpdateMeta>(meta_words, num_tensors);
  const acc_t* row = per_tensor + t.index * kMofoColumns;
  const acc_t step_size = row[kMofoStepSize], bc2_sqrt = row[kMofoBiasCorrection2Sqrt];
  const auto threshold = static_cast<mofo::Bits<acc_t>>(thresholds[t.index]);
  const auto* m1 = reinterpret_cast<const acc_t*>(t.ptr[kMofoExpAvg]);
  const auto* m2 = reinterpret_cast<const acc_t*>(t.ptr[kMofoExpAvgSq]);
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const acc_t theta = load<acc_t>(t, kMofoParam, i);
    store(t, kMofoParam, i, mofo::masked_param(theta, m1[i], m2[i], threshold, decay, step_size, bc2_sqrt, eps));
    if constexpr (kSi) {
      auto* omega = reinterpret_cast<acc_t*>(t.ptr[kMofoOmega]);
      const acc_t g_task = *grad_factor * load<acc_t>(t, kMofoGrad, i);
      omega[i] = math::path_integral(omega[i], g_task, load<acc_t>(t, kMofoParam, i), theta);  // as stored
    }
  }
}

// meta_words: device copy of MofoUpdateMeta records (index set; grad and omega roles null without SI);
// per_tensor: num_tensors x kMofoColumns acc_t; thresholds: num_tensors int64; grad_factor: one acc_t ((maximize ?
// -1 : 1) / grad_scale); found_inf: one float; all on the device. Queues the masked update.
template <typename acc_t>
cudaError_t launch_mofo_update(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks, bool si,
                               const acc_t* per_tensor, const int64_t* thresholds, const acc_t* grad_factor,
                               acc_t decay, acc_t eps, const float* found_inf, cudaStream_t stream) {
  if (si) {
    return launch_blocks(mofo_update_kernel<acc_t, true>, num_blocks, stream, meta_words, num_tensors, per_tensor,
                         thresholds, grad_factor, decay, eps, found_inf);
  }
  return launch_blocks(mofo_update_kernel<acc_t, false>, num_blocks, stream, meta_words, num_tensors, per_tensor,
                       thresholds, grad_factor, decay, eps, found_inf);
}

}  // namespace fastforget::gpu
