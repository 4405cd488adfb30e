// MoFO's per-element math (Chen et al., TMLR 2025; fastforget/ops/mofo.py), shared by the CPU kernels
// (csrc/cpu/mofo.cpp) and the CUDA kernels (csrc/cuda/mofo.cuh): torch-free, host and device.
//
// The select works on the bit pattern b of |m| (the sign bit cleared): for a non-negative float it orders like the
// value, so the k-th largest |m| is the k-th largest b, and a threshold is a bit pattern (as int64; -1, cast to the
// unsigned type, is above every b: no element is selected).
#pragma once

#include <cstdint>
#include <cstring>

#include "elementwise.h"

namespace fastforget::mofo {

constexpr int kDigitBits = 11;  // a radix pass's digit width, at most
constexpr int64_t kBins = int64_t{1} << kDigitBits;

template <typename T>
struct BitsOf {
  using type = uint32_t;
};
template <>
struct BitsOf<double> {
  using type = uint64_t;
};
template <typename T>
using Bits = typename BitsOf<T>::type;

template <typename T>
FF_HOST_DEVICE Bits<T> abs_bits(T x) {
  Bits<T> bits;
  memcpy(&bits, &x, sizeof(bits));
  return bits & (~Bits<T>{0} >> 1);  // |x|: the sign bit cleared
}

// The radix pass's digit of b, or -1 when b's higher digits (b >> (shift + digit_bits)) differ from prefix. All
// elements match on the first pass (shift + digit_bits == the bit width).
template <typename T>
FF_HOST_DEVICE int digit_of(Bits<T> b, int64_t prefix, int shift, int digit_bits) {
  const int high = shift + digit_bits;
  if (high < static_cast<int>(8 * sizeof(T)) && (b >> high) != static_cast<Bits<T>>(prefix)) return -1;
  return static_cast<int>((b >> shift) & ((Bits<T>{1} << digit_bits) - 1));
}

// The masked AdamW update: theta (1 - lr wd) minus the Adam step where b(|m1|) >= threshold, the decay alone
// elsewhere (m1 replaced by 0: exactly theta * decay).
template <typename T>
FF_HOST_DEVICE T masked_param(T theta, T m1, T m2, Bits<T> threshold, T decay, T step_size, T bc2_sqrt, T eps) {
  return math::adamw_param(theta, abs_bits(m1) >= threshold ? m1 : T(0), m2, decay, step_size, bc2_sqrt, eps);
}

}  // namespace fastforget::mofo
