// Block-wise dynamic 8-bit quantization on the CPU (the rule and the format: fastforget/quantize.py): blocks of 256
// elements, one fp32 absmax per block, uint8 codes into a sorted 256-entry map; a code is the nearest map entry to
// x * (1 / absmax), on a midpoint the lower one.
//
// Finding the nearest entry by binary search takes 8 dependent steps per value. QuantMap instead looks the code up
// by the float's top 16 bits (its bf16 truncation): within one such bucket the nearest code changes at most once
// when no two midpoints fall in the same bucket -- true of bitsandbytes' dynamic maps, whose entries near 1 are
// 0.007 (unsigned) or 0.014 (signed) apart while a bucket there spans 2^-8 = 0.0039, and apart by more buckets
// further down (tests/test_protected_adamw8bit_step.py checks every midpoint of both maps).
// A table entry holds the bucket's first code and the low 16 bits of the midpoint inside it, so one comparison of
// the value's low 16 bits finishes the lookup: one gather per value. A map without that property (any other map a
// caller passes) is searched by binary search instead; both give exactly the reference's codes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastforget::cpu {

constexpr int64_t kQuantBlock = 256;  // bitsandbytes' optimizer block size
constexpr float kMinAbsmax = 1e-38f;  // the scale's reciprocal stays finite (a zero block keeps absmax 0)

// max |x[i]| over one block (0 for an empty one).
inline float block_absmax(const float* x, int64_t n) {
  float absmax = 0.0f;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 lanes = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) lanes = _mm512_max_ps(lanes, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  absmax = _mm512_reduce_max_ps(lanes);
#endif
  for (; i < n; ++i) absmax = std::max(absmax, std::fabs(x[i]));
  return absmax;
}

class QuantMap {
 public:
  explicit QuantMap(const float* values) {
    std::memcpy(values_, values, sizeof values_);
    for (int j = 0; j < 255; ++j) midpoints_[j] = (values_[j] + values_[j + 1]) * 0.5f;
    table_ok_ = build_table();
  }

  const float* values() const { return values_; }

  // The codes of x[0..n) * inv (one block's values and reciprocal scale).
  void quantize(const float* x, float inv, uint8_t* out, int64_t n) const {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (table_ok_) {
      const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-1.0f), hi = _mm512_set1_ps(1.0f);
      for (; i + 16 <= n; i += 16) {
        const __m512 s = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vinv), lo), hi);
        const __m512i bits = _mm512_castps_si512(s);
        const __mmask16 negative = _mm512_cmplt_epi32_mask(bits, _mm512_setzero_si512());
        __m512i index = _mm512_sub_epi32(_mm512_srli_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x7FFFFFFF)), 16),
                                         _mm512_set1_epi32(kFirstBucket - 1));
        index = _mm512_min_epi32(_mm512_max_epi32(index, _mm512_setzero_si512()), _mm512_set1_epi32(kBuckets - 1));
        index = _mm512_mask_add_epi32(index, negative, index, _mm512_set1_epi32(kBuckets));
        const __m512i entry = _mm512_i32gather_epi32(index, table_, 4);
        const __m512i low16 = _mm512_set1_epi32(0xFFFF);
        __m512i key = _mm512_and_si512(bits, low16);
        key = _mm512_mask_sub_epi32(key, negative, low16, key);
        const __mmask16 above = _mm512_cmpgt_epi32_mask(key, _mm512_and_si512(entry, low16));
        __m512i code = _mm512_srli_epi32(entry, 16);
        code = _mm512_mask_add_epi32(code, above, code, _mm512_set1_epi32(1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(code));
      }
    }
#endif
    for (; i < n; ++i) out[i] = nearest(std::min(std::max(x[i] * inv, -1.0f), 1.0f));
  }

  // out[0..n) = values[codes] * absmax (one block). The 256 values sit in 16 vector registers, looked up by 8
  // two-register permutes and a blend tree on the code's top 3 bits (faster here than a gather).
  void dequantize(const uint8_t* codes, float absmax, float* out, int64_t n) const {
    int64_t i = 0;
#if defined(__AVX512F__)
    const __m512 scale = _mm512_set1_ps(absmax);
    __m512 t[16];
    for (int k = 0; k < 16; ++k) t[k] = _mm512_loadu_ps(values_ + 16 * k);
    for (; i + 16 <= n; i += 16) {
      const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i)));
      __m512 r[8];
      for (int k = 0; k < 8; ++k) r[k] = _mm512_permutex2var_ps(t[2 * k], c, t[2 * k + 1]);
      const __mmask16 b5 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(32));
      const __mmask16 b6 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(64));
      const __mmask16 b7 = _mm512_test_epi32_mask(c, _mm512_set1_epi32(128));
      for (int k = 0; k < 4; ++k) r[k] = _mm512_mask_blend_ps(b5, r[2 * k], r[2 * k + 1]);
      for (int k = 0; k < 2; ++k) r[k] = _mm512_mask_blend_ps(b6, r[2 * k], r[2 * k + 1]);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mask_blend_ps(b7, r[0], r[1]), scale));
    }
#endif
    for (; i < n; ++i) out[i] = values_[codes[i]] * absmax;
  }

  // The nearest entry to s in [-1, 1]: the number of midpoints below s.
  uint8_t nearest(float s) const {
    if (!table_ok_) return static_cast<uint8_t>(std::lower_bound(midpoints_, midpoints_ + 255, s) - midpoints_);
    uint32_t bits;
    std::memcpy(&bits, &s, sizeof bits);
    const bool negative = bits >> 31;
    const int32_t bucket = static_cast<int32_t>((bits & 0x7FFFFFFFu) >> 16) - (kFirstBucket - 1);
    const int32_t index = std::min(std::max(bucket, 0), kBuckets - 1) + (negative ? kBuckets : 0);
    const uint32_t entry = static_cast<uint32_t>(table_[index]);
    const uint32_t key = negative ? 0xFFFFu - (bits & 0xFFFFu) : bits & 0xFFFFu;
    return static_cast<uint8_t>((entry >> 16) + (key > (entry & 0xFFFFu) ? 1 : 0));
  }

 private:
  // Buckets: top 16 bits of |s| from 2^-23 (0x3400) to 1.0 (0x3F80), one per sign, and below them one bucket for
  // |s| < 2^-23 (the map must have no midpoint there).
  static constexpr int32_t kFirstBucket = 0x3400;
  static constexpr int32_t kBuckets = 0x3F80 - kFirstBucket + 2;

  static float from_bits(uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }

  static uint32_t to_bits(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    return bits;
  }

  int32_t count_below(float x) const {  // the number of midpoints < x
    return static_cast<int32_t>(std::lower_bound(midpoints_, midpoints_ + 255, x) - midpoints_);
  }

  // Entry (code << 16 | key): code = the nearest entry to the bucket's lowest value; key = the sign-normalised low
  // 16 bits of the midpoint inside the bucket (0xFFFF, never exceeded, when there is none). False when some bucket
  // holds two midpoints.
  bool build_table() {
    constexpr float kTiny = 1.1920928955078125e-07f;  // 2^-23
    for (const float midpoint : midpoints_) {
      if (std::fabs(midpoint) < kTiny) return false;
    }
    for (int negative = 0; negative < 2; ++negative) {
      int32_t* table = table_ + negative * kBuckets;
      table[0] = (count_below(0.0f) << 16) | 0xFFFF;
      for (int32_t b = 1; b < kBuckets; ++b) {
        const uint32_t top = static_cast<uint32_t>(b + kFirstBucket - 1) << 16 | (negative ? 0x80000000u : 0u);
        const float first = from_bits(top), last = from_bits(top | 0xFFFF);  // |first| <= |last|
        const float lo = negative ? last : first, hi = negative ? first : last;
        const int32_t code = count_below(lo);  // midpoints_[code] is the first one >= lo
        uint32_t key = 0xFFFF;
        if (code < 255 && midpoints_[code] <= hi) {
          if (code + 1 < 255 && midpoints_[code + 1] < hi) return false;
          const uint32_t low = to_bits(midpoints_[code]) & 0xFFFFu;
          key = negative ? 0xFFFFu - low : low;
        }
        table[b] = static_cast<int32_t>(static_cast<uint32_t>(code) << 16 | key);
      }
    }
    return true;
  }

  float values_[256];
  float midpoints_[255];
  bool table_ok_;
  int32_t table_[2 * kBuckets];
};

}  // namespace fastforget::cpu
