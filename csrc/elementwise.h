// The per-element math that the CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda/*.cuh) both implement,
// written once, in one order of operations (torch-free; host and device, as c10's C10_HOST_DEVICE functions are).
// T is the accumulation type (float or double); the functions that use only + - * also take the CPU kernels'
// at::vec::Vectorized<acc_t>. Math: fastforget/ops/{ewc_penalty,grad_ema,protected_adamw_step}.py and, for the
// block-wise 8-bit state, fastforget/quantize.py.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define FF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FF_HOST_DEVICE inline
#endif

namespace fastforget::math {

// EWC (Kirkpatrick et al. 2017): with d = theta - anchor and fd = F d, the penalty term is fd * d and the gradient
// term c * fd (c = 2 lam, times the upstream gradient in backward).
template <typename T>
struct EwcTerm {
  T d, fd;
};

template <typename T>
FF_HOST_DEVICE EwcTerm<T> ewc_term(T theta, T anchor, T fisher) {
  const T d = theta - anchor;
  return {d, fisher * d};
}

// The element EMA of gradient protection (Welford-style, Finch 2009), keep = 1 - alpha:
//   d = x - m,  m' = m + alpha d,  v' = keep (v + alpha d^2)
template <typename T>
FF_HOST_DEVICE T ema_var(T x, T m, T v, T alpha, T keep) {
  const T d = x - m;
  return keep * (v + alpha * d * d);
}

template <typename T>
FF_HOST_DEVICE T ema_mean(T x, T m, T alpha) {
  return m + alpha * (x - m);
}

// The factor a protected gradient is scaled by: 1 - s where the importance s = sigmoid(v' var_scale) exceeds the
// threshold, else 1. exp_neg is exp(-(v' var_scale)), computed by the caller (each backend has its exp).
template <typename T>
FF_HOST_DEVICE T protection_factor(T exp_neg, T threshold) {
  const T importance = T(1) / (T(1) + exp_neg);
  return importance > threshold ? T(1) - importance : T(1);
}

// torch.optim.AdamW's moments (Loshchilov & Hutter 2019):
//   m1' = lerp(m1, g, 1 - beta1),  m2' = beta2 m2 + (1 - beta2) g^2
template <typename T>
struct AdamwMoments {
  T m1, m2;
};

template <typename T>
FF_HOST_DEVICE AdamwMoments<T> adamw_moments(T m1, T m2, T grad, T beta1_complement, T beta2, T beta2_complement) {
  return {m1 + beta1_complement * (grad - m1), beta2 * m2 + beta2_complement * grad * grad};
}

// The new parameter: decoupled weight decay (decay = 1 - lr wd), then the bias-corrected step
// (step_size = lr / (1 - beta1^k), bc2_sqrt = sqrt(1 - beta2^k)).
template <typename T>
FF_HOST_DEVICE T adamw_param(T theta, T m1, T m2, T decay, T step_size, T bc2_sqrt, T eps) {
  using std::sqrt;
  return theta * decay - step_size * m1 / (sqrt(m2) / bc2_sqrt + eps);
}

// Synaptic Intelligence's path integral (Zenke et al. 2017): omega -= g_task (theta_new - theta_old).
template <typename T>
FF_HOST_DEVICE T path_integral(T omega, T g_task, T theta_new, T theta_old) {
  return omega - g_task * (theta_new - theta_old);
}

// bitsandbytes' block-wise dynamic quantization (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
// Quantization"; fastforget/quantize.py): a tensor is cut into blocks of kQuantBlock elements from its element 0
// (the last one may be partial), each stored as its absmax = max |x| (fp32) and, per element, the uint8 index of
// the entry of a sorted kCodeSize-entry map (the dynamic map) nearest to clamp(x * (1 / absmax), -1, 1), a value
// on a midpoint taking the lower index. The value of code c is map[c] * absmax, in fp32.
constexpr int kQuantBlock = 256;
constexpr int kCodeSize = 256;
constexpr float kMinAbsmax = 1e-38f;  // an all-zero block keeps absmax 0 but scales by 1 / kMinAbsmax

FF_HOST_DEVICE float dequantize(const float* map, unsigned char code, float absmax) { return map[code] * absmax; }

// The factor a block's values are scaled by before the map look-up: 1 / max(absmax, kMinAbsmax).
FF_HOST_DEVICE float inverse_absmax(float absmax) { return 1.0f / (absmax < kMinAbsmax ? kMinAbsmax : absmax); }

// The code of x in a block scaled by inverse_absmax: the number of midpoints (map[j] + map[j + 1]) / 2 below
// clamp(x * inverse, -1, 1), by binary search (torch.bucketize's rule).
FF_HOST_DEVICE unsigned char quantize(const float* map, float x, float inverse) {
  float scaled = x * inverse;
  scaled = scaled < -1.0f ? -1.0f : scaled > 1.0f ? 1.0f : scaled;
  int below = 0;  // midpoints 0 .. below - 1 are < scaled
  for (int step = kCodeSize / 2; step > 0; step /= 2) {
    const int probe = below + step - 1;
    below += (map[probe] + map[probe + 1]) * 0.5f < scaled ? step : 0;
  }
  return static_cast<unsigned char>(below);
}

}  // namespace fastforget::math
