// The protected AdamW step on the GPU (torch-free; the binding is protected_adamw_step.cu; math:
// fastforget/ops/protected_adamw_step.py). One block per chunk over the whole list (layout: multi_tensor.cuh);
// per element, in acc_t:
//
//   g_task = s g;  g_ewc = g_task + 2 lam F (theta - anchor);  g' = factor g_ewc  or the element EMA protection
//   (as grad_ema_protect, Finch 2009);  AdamW on g' (decoupled weight decay, bias correction);
//   omega -= g_task (theta_new - theta_old), theta_new as stored
//
// Each block writes one penalty partial (fixed tree), summed in a fixed order: deterministic without atomics.
// When *found_inf is nonzero, nothing is written but zero partials (read on the device: no host sync).
#pragma once

#include "../elementwise.h"
#include "multi_tensor.cuh"

namespace fastforget::gpu {

enum AdamwRole : int {
  kAdamwParam = 0,
  kAdamwGrad = 1,
  kAdamwExpAvg = 2,
  kAdamwExpAvgSq = 3,
  kAdamwAnchor = 4,
  kAdamwFisher = 5,
  kAdamwEmaMean = 6,
  kAdamwEmaVar = 7,
  kAdamwOmega = 8,
  kAdamwRoles = 9,
};
enum AdamwProtect : int { kProtectNone = 0, kProtectTensor = 1, kProtectElement = 2 };
// Columns of the per-tensor table (num_tensors x kAdamwColumns acc_t, on the device).
enum AdamwColumn : int { kStepSize = 0, kBiasCorrection2Sqrt = 1, kFactor = 2, kAlpha = 3, kVarScale = 4 };
constexpr int kAdamwColumns = 5;

// The per-tensor record: TensorMeta and the tensor's index in the list (its row of the per-tensor table).
struct AdamwMeta : TensorMeta<kAdamwRoles> {
  static constexpr int64_t kWords = TensorMeta<kAdamwRoles>::kWords + 1;
  int64_t index;
};
static_assert(sizeof(AdamwMeta) == AdamwMeta::kWords * sizeof(int64_t), "AdamwMeta must be unpadded");

template <typename acc_t>
struct AdamwScalars {
  acc_t two_lam, decay, beta1_complement, beta2, beta2_complement, eps, threshold;  // decay = 1 - lr wd
};

// The gradient AdamW takes for element i of t: g_task, plus the EWC term 2 lam F (theta - anchor) (adding
// F (theta - anchor)^2 to penalty_sum), times the tensor's protection factor or the element EMA protection's
// (updating ema_mean, ema_var). Shared with the 8-bit step (protected_adamw8bit_step.cuh), whose records start
// with these roles; `fisher` is F (unused without EWC).
template <typename acc_t, bool kEwc, int kProtect, int R>
__device__ __forceinline__ acc_t protected_grad(const TensorMeta<R>& t, int64_t i, acc_t theta, acc_t g_task,
                                                acc_t fisher, const acc_t* row, const AdamwScalars<acc_t>& s,
                                                acc_t& penalty_sum) {
  acc_t grad = g_task;
  if constexpr (kEwc) {
    const auto [d, fd] = math::ewc_term(theta, load<acc_t>(t, kAdamwAnchor, i), fisher);
    penalty_sum += fd * d;
    grad += s.two_lam * fd;
  }
  if constexpr (kProtect == kProtectTensor) grad *= row[kFactor];
  if constexpr (kProtect == kProtectElement) {
    auto* em = reinterpret_cast<acc_t*>(t.ptr[kAdamwEmaMean]);
    auto* ev = reinterpret_cast<acc_t*>(t.ptr[kAdamwEmaVar]);
    const acc_t alpha = row[kAlpha], mean = em[i];
    const acc_t var = math::ema_var(grad, mean, ev[i], alpha, acc_t(1) - alpha);
    em[i] = math::ema_mean(grad, mean, alpha);
    ev[i] = var;
    grad *= math::protection_factor(exp(-(var * row[kVarScale])), s.threshold);
  }
  return grad;
}

template <typename acc_t, bool kEwc, int kProtect, bool kSi>
__global__ void __launch_bounds__(kBlockThreads)
    protected_adamw_kernel(const int64_t* meta_words, int64_t num_tensors, const acc_t* per_tensor,
                           const acc_t* grad_factor, AdamwScalars<acc_t> s, const float* found_inf, acc_t* partials) {
  if (*found_inf != 0.0f) {  // uniform over the block
    if (threadIdx.x == 0) partials[blockIdx.x] = acc_t(0);
    return;
  }
  const auto [t, begin, end] = block_chunk<AdamwMeta>(meta_words, num_tensors);
  const acc_t* row = per_tensor + t.index * kAdamwColumns;
  const acc_t scale = *grad_factor, step_size = row[kStepSize], bc2_sqrt = row[kBiasCorrection2Sqrt];
  auto* m1 = reinterpret_cast<acc_t*>(t.ptr[kAdamwExpAvg]);
  auto* m2 = reinterpret_cast<acc_t*>(t.ptr[kAdamwExpAvgSq]);
  acc_t sum = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kBlockThreads) {
    const acc_t theta = load<acc_t>(t, kAdamwParam, i);
    const acc_t g_task = scale * load<acc_t>(t, kAdamwGrad, i);
    const acc_t fisher = kEwc ? load<acc_t>(t, kAdamwFisher, i) : acc_t(0);
    const acc_t grad = protected_grad<acc_t, kEwc, kProtect>(t, i, theta, g_task, fisher, row, s, sum);
    const auto [mi, vi] = math::adamw_moments(m1[i], m2[i], grad, s.beta1_complement, s.beta2, s.beta2_complement);
    m1[i] = mi;
    m2[i] = vi;
    store(t, kAdamwParam, i, math::adamw_param(theta, mi, vi, s.decay, step_size, bc2_sqrt, s.eps));
    if constexpr (kSi) {
      auto* omega = reinterpret_cast<acc_t*>(t.ptr[kAdamwOmega]);
      omega[i] = math::path_integral(omega[i], g_task, load<acc_t>(t, kAdamwParam, i), theta);  // theta as stored
    }
  }
  if constexpr (kEwc) {
    sum = block_reduce_sum(sum);
    if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  } else if (threadIdx.x == 0) {
    partials[blockIdx.x] = acc_t(0);
  }
}

template <typename acc_t, bool kEwc, int kProtect>
cudaError_t launch_with_si(bool si, const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks,
                           const acc_t* per_tensor, const acc_t* grad_factor, AdamwScalars<acc_t> s,
                           const float* found_inf, acc_t* partials, cudaStream_t stream) {
  if (si) {
    return launch_blocks(protected_adamw_kernel<acc_t, kEwc, kProtect, true>, num_blocks, stream, meta_words,
                         num_tensors, per_tensor, grad_factor, s, found_inf, partials);
  }
  return launch_blocks(protected_adamw_kernel<acc_t, kEwc, kProtect, false>, num_blocks, stream, meta_words,
                       num_tensors, per_tensor, grad_factor, s, found_inf, partials);
}

template <typename acc_t, bool kEwc>
cudaError_t launch_with_protect(int protect, bool si, const int64_t* meta_words, int64_t num_tensors,
                                int64_t num_blocks, const acc_t* per_tensor, const acc_t* grad_factor,
                                AdamwScalars<acc_t> s, const float* found_inf, acc_t* partials, cudaStream_t stream) {
  switch (protect) {
    case kProtectTensor:
      return launch_with_si<acc_t, kEwc, kProtectTensor>(si, meta_words, num_tensors, num_blocks, per_tensor,
                                                         grad_factor, s, found_inf, partials, stream);
    case kProtectElement:
      return launch_with_si<acc_t, kEwc, kProtectElement>(si, meta_words, num_tensors, num_blocks, per_tensor,
                                                          grad_factor, s, found_inf, partials, stream);
    default:
      return launch_with_si<acc_t, kEwc, kProtectNone>(si, meta_words, num_tensors, num_blocks, per_tensor,
                                                       grad_factor, s, found_inf, partials, stream);
  }
}

// meta_words: device copy of AdamwMeta records (index set) with num_blocks planned blocks; per_tensor:
// num_tensors x kAdamwColumns acc_t; grad_factor: one acc_t; found_inf: one float; partials: num_blocks acc_t of
// scratch; penalty: one acc_t; all on the device. Queues the step and *penalty = lam * sum F (theta - anchor)^2.
template <typename acc_t>
cudaError_t launch_protected_adamw_step(const int64_t* meta_words, int64_t num_tensors, int64_t num_blocks, bool ewc,
                                        int protect, bool si, const acc_t* per_tensor, const acc_t* grad_factor,
                                        AdamwScalars<acc_t> s, const float* found_inf, acc_t* partials, acc_t lam,
                                        acc_t* penalty, cudaStream_t stream) {
  const cudaError_t err =
      ewc ? launch_with_protect<acc_t, true>(protect, si, meta_words, num_tensors, num_blocks, per_tensor, grad_factor,
                                             s, found_inf, partials, stream)
          : launch_with_protect<acc_t, false>(protect, si, meta_words, num_tensors, num_blocks, per_tensor,
                                              grad_factor, s, found_inf, partials, stream);
  if (err != cudaSuccess) return err;
  return launch_sum_partials(partials, num_blocks, lam, penalty, stream);
}

}  // namespace fastforget::gpu
