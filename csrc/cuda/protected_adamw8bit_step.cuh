// The protected AdamW step with block-wise 8-bit moments on the GPU (torch-free; the binding is
// protected_adamw8bit_step.cu; math: fastforget/ops/protected_adamw8bit_step.py). bitsandbytes' layout: exp_avg
// and exp_avg_sq are uint8 codes of the signed and unsigned dynamic maps with one fp32 absmax per kQuantBlock
// elements (elementwise.h); the Fisher is float, or uint8 codes of the unsigned map with its own absmax.
//
// One block per chunk over the whole list (layout: multi_tensor.cuh; a chunk is kQuantBlocksPerChunk whole
// quantization blocks), one warp per quantization block at a time, kLaneElements elements per lane. Per element,
// in acc_t: the moments dequantized, then exactly the 32-bit step (protected_adamw_step.cuh: EWC, protection,
// AdamW, SI), the param updated from the unquantized new moments (as bitsandbytes does); then per quantization
// block the new absmax = max |new moment| (a warp max: order-free) and each new moment requantized to its nearest
// code (elementwise.h). The EWC penalty: one partial per block (fixed tree), summed in a fixed order. When *found_inf is nonzero,
// nothing is written but zero partials (read on the device: no host sync).
#pragma once

#include "../elementwise.h"
#include "multi_tensor.cuh"
#include "protected_adamw_step.cuh"

#include <type_traits>

namespace fastforget::gpu {

// The 32-bit step's roles (kAdamwParam .. kAdamwOmega; exp_avg and exp_avg_sq hold codes here, the Fisher codes
// or floats), then the absmax of each 8-bit state.
enum Adamw8bitRole : int {
  kAdamwExpAvgAbsmax = kAdamwRoles,
  kAdamwExpAvgSqAbsmax = kAdamwRoles + 1,
  kAdamwFisherAbsmax = kAdamwRoles + 2,
  kAdamw8bitRoles = kAdamwRoles + 3,
};

constexpr int kWarps = kBlockThreads / 32;
constexpr int kLaneElements = math::kQuantBlock / 32;  // elements of a quantization block per lane
static_assert(kChunkSize % math::kQuantBlock == 0, "a chunk must hold whole quantization blocks");
static_assert(math::kCodeSize <= kBlockThreads, "each thread loads at most one entry of a map");

// The per-tensor record: TensorMeta and the tensor's index in the list (its row of the per-tensor table).
struct Adamw8bitMeta : TensorMeta<kAdamw8bitRoles> {
  static constexpr int64_t kWords = TensorMeta<kAdamw8bitRoles>::kWords + 1;
  int64_t index;
};
static_assert(sizeof(Adamw8bitMeta) == Adamw8bitMeta::kWords * sizeof(int64_t), "Adamw8bitMeta must be unpadded");

// The largest v over a warp, in every lane (fmax ignores NaN and is order-free: any tree gives the same value).
__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Element i of the 8-bit state with codes in `role` and absmax in `absmax_role`, dequantized with `code`.
template <int R>
__device__ __forceinline__ float load_quantized(const TensorMeta<R>& t, int role, int absmax_role, const float* code,
                                                int64_t i) {
  const auto* codes = reinterpret_cast<const unsigned char*>(t.ptr[role]);
  const auto* absmax = reinterpret_cast<const float*>(t.ptr[absmax_role]);
  return math::dequantize(code, codes[i], absmax[i / math::kQuantBlock]);
}

// qmap_signed: exp_avg's map, qmap_unsigned: exp_avg_sq's and an 8-bit Fisher's (kCodeSize fp32 each).
template <typename acc_t, bool kEwc, int kProtect, bool kSi>
__global__ void __launch_bounds__(kBlockThreads)
    protected_adamw8bit_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* per_tensor,
                               const acc_t* grad_factor, AdamwScalars<acc_t> s, const float* qmap_signed,
                               const float* qmap_unsigned, const float* found_inf, acc_t* partials) {
  if (*found_inf != 0.0f) {  // uniform over the block
    if (threadIdx.x == 0) partials[blockIdx.x] = acc_t(0);
    return;
  }
  __shared__ float signed_map[math::kCodeSize], unsigned_map[math::kCodeSize];  // looked up by every lane
  if (threadIdx.x < math::kCodeSize) {
    signed_map[threadIdx.x] = qmap_signed[threadIdx.x];
    unsigned_map[threadIdx.x] = qmap_unsigned[threadIdx.x];
  }
  __syncthreads();
  const auto [t, begin, end] = block_chunk<Adamw8bitMeta>(meta_words, num_tensors);
  const acc_t* row = per_tensor + t.index * kAdamwColumns;
  const acc_t scale = *grad_factor, step_size = row[kStepSize], bc2_sqrt = row[kBiasCorrection2Sqrt];
  auto* codes1 = reinterpret_cast<unsigned char*>(t.ptr[kAdamwExpAvg]);
  auto* codes2 = reinterpret_cast<unsigned char*>(t.ptr[kAdamwExpAvgSq]);
  auto* absmax1 = reinterpret_cast<float*>(t.ptr[kAdamwExpAvgAbsmax]);
  auto* absmax2 = reinterpret_cast<float*>(t.ptr[kAdamwExpAvgSqAbsmax]);
  const bool fisher_8bit = t.dtype[kAdamwFisher] == kUInt8;  // uniform over the block
  const int lane = threadIdx.x % 32;
  acc_t sum = 0;
  // this warp's quantization blocks of the chunk; every lane of a warp runs the same iterations (the shuffles)
  for (int64_t first = begin + (threadIdx.x / 32) * math::kQuantBlock; first < end;
       first += kWarps * math::kQuantBlock) {
    float new_m1[kLaneElements], new_m2[kLaneElements];  // the new moments as quantized (fp32)
    float max1 = 0.0f, max2 = 0.0f;
    for (int j = 0; j < kLaneElements; ++j) {
      const int64_t i = first + lane + 32 * j;
      new_m1[j] = new_m2[j] = 0.0f;
      if (i >= end) continue;
      const acc_t theta = load<acc_t>(t, kAdamwParam, i);
      const acc_t g_task = scale * load<acc_t>(t, kAdamwGrad, i);
      acc_t fisher = 0;
      if constexpr (kEwc) {
        fisher = fisher_8bit ? static_cast<acc_t>(load_quantized(t, kAdamwFisher, kAdamwFisherAbsmax, unsigned_map, i))
                             : load<acc_t>(t, kAdamwFisher, i);
      }
      const acc_t grad = protected_grad<acc_t, kEwc, kProtect>(t, i, theta, g_task, fisher, row, s, sum);
      const acc_t m1 = load_quantized(t, kAdamwExpAvg, kAdamwExpAvgAbsmax, signed_map, i);
      const acc_t m2 = load_quantized(t, kAdamwExpAvgSq, kAdamwExpAvgSqAbsmax, unsigned_map, i);
      const auto [mi, vi] = math::adamw_moments(m1, m2, grad, s.beta1_complement, s.beta2, s.beta2_complement);
      store(t, kAdamwParam, i, math::adamw_param(theta, mi, vi, s.decay, step_size, bc2_sqrt, s.eps));
      if constexpr (kSi) {
        auto* omega = reinterpret_cast<acc_t*>(t.ptr[kAdamwOmega]);
        omega[i] = math::path_integral(omega[i], g_task, load<acc_t>(t, kAdamwParam, i), theta);  // theta as stored
      }
      new_m1[j] = static_cast<float>(mi);
      new_m2[j] = static_cast<float>(vi);
      max1 = fmaxf(max1, fabsf(new_m1[j]));
      max2 = fmaxf(max2, fabsf(new_m2[j]));
    }
    // every lane has read the block's old absmax (its elements' dequantization) before these shuffles
    max1 = warp_max(max1);
    max2 = warp_max(max2);
    if (lane == 0) {
      absmax1[first / math::kQuantBlock] = max1;
      absmax2[first / math::kQuantBlock] = max2;
    }
    const float inverse1 = math::inverse_absmax(max1), inverse2 = math::inverse_absmax(max2);
    for (int j = 0; j < kLaneElements; ++j) {
      const int64_t i = first + lane + 32 * j;
      if (i >= end) continue;
      codes1[i] = math::quantize(signed_map, new_m1[j], inverse1);
      codes2[i] = math::quantize(unsigned_map, new_m2[j], inverse2);
    }
  }
  if constexpr (kEwc) {
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  } else if (threadIdx.x == 0) {
    partials[blockIdx.x] = acc_t(0);
  }
}

// Calls launch(ewc, protect, si) with each flag as a std::integral_constant (the kernel's template arguments).
template <typename Launch>
cudaError_t with_step_flags(bool ewc, int protect, bool si, Launch launch) {
  const auto with_si = [&](auto ewc_c, auto protect_c) {
    return si ? launch(ewc_c, protect_c, std::true_type{}) : launch(ewc_c, protect_c, std::false_type{});
  };
  const auto with_protect = [&](auto ewc_c) {
    switch (protect) {
      case kProtectTensor: return with_si(ewc_c, std::integral_constant<int, kProtectTensor>{});
      case kProtectElement: return with_si(ewc_c, std::integral_constant<int, kProtectElement>{});
      default: return with_si(ewc_c, std::integral_constant<int, kProtectNone>{});
    }
  };
  return ewc ? with_protect(std::true_type{}) : with_protect(std::false_type{});
}

// meta_words: device copy of Adamw8bitMeta records (index set) with num_blocks planned blocks; per_tensor:
// num_tensors x kAdamwColumns acc_t; grad_factor: one acc_t; qmap_signed, qmap_unsigned: kCodeSize fp32 each;
// found_inf: one float; partials: num_blocks acc_t of scratch; penalty: one acc_t; all on the device. Queues the
// step and *penalty = lam * sum F (theta - anchor)^2.
template <typename acc_t>
cudaError_t launch_protected_adamw8bit_step(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                                            bool ewc, int protect, bool si, const acc_t* per_tensor,
                                            const acc_t* grad_factor, AdamwScalars<acc_t> s,
                                            const float* qmap_signed, const float* qmap_unsigned,
                                            const float* found_inf, acc_t* partials, acc_t lam, acc_t* penalty,
                                            cudaStream_t stream) {
  const cudaError_t err = with_step_flags(ewc, protect, si, [&](auto ewc_c, auto protect_c, auto si_c) {
    return launch_blocks(protected_adamw8bit_kernel<acc_t, decltype(ewc_c)::value, decltype(protect_c)::value,
                                                    decltype(si_c)::value>, num_blocks, stream,
                         meta_words, num_tensors, per_tensor, grad_factor, s, qmap_signed, qmap_unsigned, found_inf, partials);
  });
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partials, num_blocks, lam, penalty, stream);
}

}  // namespace fastforget::gpu
