// Arithmetic-only math for the CPU kernels' elementwise loops, so that the compiler vectorises them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastforget::cpu {

// exp(x) for x <= 0 with arithmetic only, so that a loop calling it vectorises (a libm call per element would make
// the pass compute-bound): Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite split of ln2), e^r by
// its degree-7 minimax polynomial, 2^n put in the exponent bits. Relative error < 2^-22; x < -87 gives 2^-126 e^r.
inline float exp_nonpositive(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
  x = x < -87.0f ? -87.0f : x;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  int32_t n_int, round_bits;
  std::memcpy(&n_int, &shifted, sizeof n_int);
  std::memcpy(&round_bits, &kRound, sizeof round_bits);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t scale_bits = (n_int - round_bits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof scale);
  return (p * r * r + r + 1.0f) * scale;
}

inline double exp_nonpositive(double x) { return std::exp(x); }  // fp64 lists: exact libm, speed is secondary

}  // namespace fastforget::cpu
