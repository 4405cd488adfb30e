// MoFO's kernels on the CPU (math and the FSDP2 driver of the select: fastforget/ops/mofo.py; per-element math:
// csrc/mofo.h), each pass one parallel region over the whole tensor list (chunking: multi_tensor.h).
//
// mofo_histogram: one pass of the radix select over the bit patterns b of |exp_avg| (for a non-negative float b
//   orders like the value): per tensor, a count of the digit (b >> shift) & (2^digit_bits - 1) of the elements whose
//   higher bits equal prefix[t], in kBins = 2^11 bins. Each thread counts into its own histograms (4 x 8 KiB: in L1)
//   and adds its nonzero bins to the output atomically when it moves to another tensor (integer counts: the order
//   does not matter). The FSDP2 select sums these over the shards; it is also this file's fallback below.
// mofo_thresholds: the whole select on one process, exact, by a sampled bracket (Floyd & Rivest, "Expected time
//   bounds for selection", CACM 1975): per tensor, the b of a stratified sample of s = 4096 elements (a run of 16 at
//   a hashed position in each of 256 equal strata) bracket the k-th largest b between the sample's order statistics
//   r -+ 4 standard deviations of its sample rank (r = the k-th largest's expected rank in the sample); ONE pass
//   over the list counts the elements above the bracket and gathers those inside it (a few % of them); where
//   count_above < k <= count_above + gathered, the threshold is the (k - count_above)-th largest gathered b
//   (std::nth_element on the few gathered). A tensor whose sample missed (rare; a sample chosen against the data)
//   takes the radix select's passes instead, so the result is always the exact k-th largest. Small tensors gather
//   every element.
// mofo_update: theta <- theta (1 - lr wd) - lr / (1 - beta1^k) m1 / (sqrt(m2) / sqrt(1 - beta2^k) + eps) on the
//   elements with b(|m1|) >= threshold[t] (as unsigned; -1: none), theta (1 - lr wd) elsewhere; k = steps[t]
//   (the moments and steps are already updated); SI: omega -= g_task (theta_new - theta_old).
#include "multi_tensor.h"

#include "../common.h"
#include "../mofo.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <optional>
#include <tuple>

namespace fastforget::cpu {
namespace {

using mofo::abs_bits;
using mofo::Bits;
using mofo::kBins;
constexpr int64_t kMaxDigitBits = mofo::kDigitBits;
constexpr int64_t kLanes = 4;
constexpr int64_t kRun = 16, kRuns = 256, kSample = kRun * kRuns;  // sampled elements per tensor
constexpr int64_t kGatherAll = 4 * kSample;                           // tensors up to this size gather every element

template <typename acc_t>
void histogram(at::TensorList exp_avg, const int64_t* prefix, int64_t shift, int64_t digit_bits, int32_t* out) {
  const auto chunks = make_chunks(exp_avg);
  const bool all = shift + digit_bits >= static_cast<int64_t>(8 * sizeof(acc_t));
  const Bits<acc_t> digit_mask = (Bits<acc_t>{1} << digit_bits) - 1;
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    // kLanes interleaved histograms: consecutive elements (often in the same bin) count into different copies,
    // so the increments do not wait on each other's stores
    std::vector<int32_t> local(kLanes * kBins, 0);
    int64_t current = -1;
    auto flush = [&] {
      if (current < 0) return;
      int32_t* target = out + current * kBins;
      for (int64_t b = 0; b < kBins; ++b) {
        int32_t sum = 0;
        for (int64_t lane = 0; lane < kLanes; ++lane) sum += local[lane * kBins + b];
        if (sum != 0) __atomic_fetch_add(target + b, sum, __ATOMIC_RELAXED);
      }
      std::fill(local.begin(), local.end(), 0);
    };
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      if (chunk.tensor != current) {
        flush();
        current = chunk.tensor;
      }
      const acc_t* m = exp_avg[chunk.tensor].const_data_ptr<acc_t>();
      const auto want = static_cast<Bits<acc_t>>(prefix[chunk.tensor]);
      if (all) {  // the first pass: every element counts
        int64_t i = chunk.begin;
        for (; i + kLanes <= chunk.end; i += kLanes) {
          for (int64_t lane = 0; lane < kLanes; ++lane) {
            ++local[lane * kBins + ((abs_bits(m[i + lane]) >> shift) & digit_mask)];
          }
        }
        for (; i < chunk.end; ++i) ++local[(abs_bits(m[i]) >> shift) & digit_mask];
        continue;
      }
      for (int64_t begin = chunk.begin; begin < chunk.end; begin += kTile) {
        const int64_t end = std::min(chunk.end, begin + kTile);
        int64_t matches = 0;  // a vectorised count first: most tiles of the later passes hold no match
        for (int64_t i = begin; i < end; ++i) matches += (abs_bits(m[i]) >> (shift + digit_bits)) == want;
        if (matches == 0) continue;
        for (int64_t i = begin; i < end; ++i) {
          const Bits<acc_t> bits = abs_bits(m[i]);
          if ((bits >> (shift + digit_bits)) == want) ++local[(bits >> shift) & digit_mask];
        }
      }
    }
    flush();
  });
}

void check_state(at::TensorList exp_avg, at::ScalarType acc) {
  for (size_t t = 0; t < exp_avg.size(); ++t) {
    TORCH_CHECK(exp_avg[t].scalar_type() == acc && exp_avg[t].is_contiguous(), "fastforget: exp_avg[", t,
                "] must be a contiguous ", acc, " tensor");
  }
}

at::Tensor mofo_histogram(at::TensorList exp_avg, const at::Tensor& prefix_, int64_t shift, int64_t digit_bits) {
  check_numel("prefix", prefix_, exp_avg.size());
  const auto acc = accumulate_type(exp_avg);
  TORCH_CHECK(digit_bits >= 1 && digit_bits <= kMaxDigitBits && shift >= 0 &&
                  shift + digit_bits <= (acc == at::kDouble ? 64 : 32),
              "fastforget: mofo_histogram: bad digit (shift ", shift, ", ", digit_bits, " bits)");
  check_state(exp_avg, acc);
  const at::Tensor prefix = prefix_.to(at::kLong).contiguous();
  at::Tensor out = at::zeros({static_cast<int64_t>(exp_avg.size()), kBins}, prefix_.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_histogram", [&] {
    histogram<scalar_t>(exp_avg, prefix.const_data_ptr<int64_t>(), shift, digit_bits, out.mutable_data_ptr<int32_t>());
  });
  return out;
}

// The radix select of the listed tensors (indices into exp_avg): every pass's histogram, then per tensor the digit
// holding the need-th largest element (scanning the bins from the top), the prefix extended by it.
template <typename acc_t>
void radix_thresholds(at::TensorList exp_avg, const int64_t* ks, const std::vector<int64_t>& which, int64_t* out) {
  const auto count = static_cast<int64_t>(which.size());
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> need(count), prefix(count, 0);
  for (int64_t i = 0; i < count; ++i) {
    tensors.push_back(exp_avg[which[i]]);
    need[i] = std::max<int64_t>(ks[which[i]], 1);
  }
  std::vector<int32_t> hist(count * kBins);
  for (int64_t top = 8 * sizeof(acc_t); top > 0; top -= kMaxDigitBits) {
    const int64_t shift = std::max<int64_t>(top - kMaxDigitBits, 0), digit_bits = top - shift;
    std::fill(hist.begin(), hist.end(), 0);
    histogram<acc_t>(tensors, prefix.data(), shift, digit_bits, hist.data());
    for (int64_t i = 0; i < count; ++i) {
      const int32_t* h = hist.data() + i * kBins;
      int64_t digit = (int64_t{1} << digit_bits) - 1, above = 0;
      for (; digit > 0 && above + h[digit] < need[i]; --digit) above += h[digit];
      need[i] -= above;
      prefix[i] = (prefix[i] << digit_bits) + digit;
    }
  }
  for (int64_t i = 0; i < count; ++i) out[which[i]] = static_cast<int64_t>(prefix[i]);
}

// The sample: kRuns runs of kRun consecutive elements (one 64-byte line of fp32: one memory access per run), run j
// at a hashed offset (Fibonacci hashing) in stratum j of n / kRuns elements. tests/test_mofo.py mirrors it to build a
// sample that misses.
inline int64_t run_start(int64_t j, int64_t n) {
  const int64_t stratum = n / kRuns;
  const uint64_t hash = (static_cast<uint64_t>(j) * 0x9E3779B97F4A7C15ull) >> 40;
  return j * stratum + static_cast<int64_t>(hash % static_cast<uint64_t>(stratum - kRun + 1)) / kRun * kRun;
}

// [lo, hi]: the bit patterns bracketing the k-th largest b of m (n elements, 0 < k <= n).
template <typename acc_t>
std::pair<Bits<acc_t>, Bits<acc_t>> bracket(const acc_t* m, int64_t n, int64_t k) {
  using B = Bits<acc_t>;
  if (n <= kGatherAll) return {B{0}, ~B{0}};
  std::array<B, kSample> sample;
  for (int64_t j = 0; j < kRuns; ++j) {
    const acc_t* run = m + run_start(j, n);
    for (int64_t i = 0; i < kRun; ++i) sample[j * kRun + i] = abs_bits(run[i]);
  }
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const auto margin = static_cast<int64_t>(std::ceil(4 * std::sqrt(kSample * p * (1 - p)))) + 2;
  const auto rank = static_cast<int64_t>(std::ceil(p * kSample)) - 1;  // 0-based, from the largest
  const int64_t upper = rank - margin, lower = rank + margin;
  B lo = 0, hi = ~B{0};
  if (lower < kSample) {
    std::nth_element(sample.begin(), sample.begin() + lower, sample.end(), std::greater<B>());
    lo = sample[lower];
  }
  if (upper >= 0) {
    std::nth_element(sample.begin(), sample.begin() + upper, sample.begin() + lower, std::greater<B>());
    hi = sample[upper];
  }
  return {lo, hi};
}

// The vector part of the select's pass over m[0, n): adds the count of b > high to `above`, appends the b in
// [low, high] to out[kept...] (kept advanced), and returns how many elements it handled (the caller does the rest).
// AVX-512 for fp32 (16 lanes: compare masks, popcounts, an in-register compress and a full-width store); elsewhere
// none.
template <typename acc_t>
int64_t compress_inside(const acc_t* m, int64_t n, Bits<acc_t> low, Bits<acc_t> high, Bits<acc_t>* out,
                        int64_t& above, int64_t& kept) {
#if defined(__AVX512F__)
  if constexpr (sizeof(acc_t) == 4) {
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
    const __m512i lo = _mm512_set1_epi32(static_cast<int>(low)), hi = _mm512_set1_epi32(static_cast<int>(high));
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      const __m512i b = _mm512_and_si512(_mm512_loadu_si512(m + i), magnitude);
      const __mmask16 inside = _mm512_cmpge_epu32_mask(b, lo) & _mm512_cmple_epu32_mask(b, hi);
      above += __builtin_popcount(_mm512_cmpgt_epu32_mask(b, hi));
      _mm512_storeu_si512(out + kept, _mm512_maskz_compress_epi32(inside, b));
      kept += __builtin_popcount(inside);
    }
    return i;
  }
#endif
  return 0;
}

template <typename acc_t>
void thresholds(at::TensorList exp_avg, const int64_t* ks, int64_t* out) {
  using B = Bits<acc_t>;
  const auto count = static_cast<int64_t>(exp_avg.size());
  std::vector<B> lo(count, 0), hi(count, 0);
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      if (ks[t] > 0) std::tie(lo[t], hi[t]) = bracket(exp_avg[t].const_data_ptr<acc_t>(), exp_avg[t].numel(), ks[t]);
    }
  });
  // the pass: per chunk, the count above the bracket and the gathered b inside it (lo == hi: the count inside)
  const auto chunks = make_chunks(exp_avg);
  std::vector<int64_t> above(chunks.size(), 0), inside(chunks.size(), 0);
  std::vector<std::vector<B>> gathered(chunks.size());
  for_each_chunk(chunks, [&](int64_t c, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    if (ks[t] <= 0) return;
    const acc_t* m = exp_avg[t].const_data_ptr<acc_t>();
    const B low = lo[t], high = hi[t];
    if (low == high) {  // nothing to gather: the count inside is the count equal
      int64_t a = 0, e = 0;
      for (int64_t i = chunk.begin; i < chunk.end; ++i) {
        const B b = abs_bits(m[i]);
        a += b > high;
        e += b == high;
      }
      above[c] = a;
      inside[c] = e;
      return;
    }
    std::array<B, kTile + 16> tile;  // + 16: room for compress_inside's full-width store
    for (int64_t begin = chunk.begin; begin < chunk.end; begin += kTile) {
      const int64_t n = std::min(kTile, chunk.end - begin);
      int64_t a = 0, kept = 0;  // the count above, and a branch-free compaction of the b inside
      int64_t i = compress_inside(m + begin, n, low, high, tile.data(), a, kept);
      for (; i < n; ++i) {
        const B b = abs_bits(m[begin + i]);
        a += b > high;
        tile[kept] = b;
        kept += (b >= low) & (b <= high);
      }
      above[c] += a;
      inside[c] += kept;
      gathered[c].insert(gathered[c].end(), tile.begin(), tile.begin() + kept);
    }
  });
  std::vector<int64_t> first_chunk(count + 1, static_cast<int64_t>(chunks.size()));
  for (int64_t c = static_cast<int64_t>(chunks.size()) - 1; c >= 0; --c) first_chunk[chunks[c].tensor] = c;
  for (int64_t t = count - 1; t >= 0; --t) first_chunk[t] = std::min(first_chunk[t], first_chunk[t + 1]);
  std::vector<char> missed(count, 0);
  at::parallel_for(0, count, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      out[t] = -1;
      if (ks[t] <= 0) continue;
      int64_t a = 0, g = 0;
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) a += above[c], g += inside[c];
      if (!(a < ks[t] && ks[t] <= a + g)) {
        missed[t] = 1;
        continue;
      }
      if (lo[t] == hi[t]) {
        out[t] = static_cast<int64_t>(lo[t]);
        continue;
      }
      std::vector<B> all;
      all.reserve(g);
      for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
        all.insert(all.end(), gathered[c].begin(), gathered[c].end());
      }
      const int64_t need = ks[t] - a;  // the need-th largest inside the bracket
      std::nth_element(all.begin(), all.begin() + (need - 1), all.end(), std::greater<B>());
      out[t] = static_cast<int64_t>(all[need - 1]);
    }
  });
  std::vector<int64_t> misses;
  for (int64_t t = 0; t < count; ++t) {
    if (missed[t]) misses.push_back(t);
  }
  if (!misses.empty()) radix_thresholds<acc_t>(exp_avg, ks, misses, out);
}

at::Tensor mofo_thresholds(at::TensorList exp_avg, const at::Tensor& ks_) {
  check_numel("ks", ks_, exp_avg.size());
  const auto acc = accumulate_type(exp_avg);
  check_state(exp_avg, acc);
  const at::Tensor ks = ks_.to(at::kLong).contiguous();
  for (int64_t t = 0; t < ks.numel(); ++t) {
    const int64_t k = ks.const_data_ptr<int64_t>()[t];
    TORCH_CHECK(k >= 0 && k <= exp_avg[t].numel(), "fastforget: ks[", t, "] = ", k, " is outside [0, ",
                exp_avg[t].numel(), "]");
  }
  at::Tensor out = at::empty({static_cast<int64_t>(exp_avg.size())}, ks.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_thresholds", [&] {
    thresholds<scalar_t>(exp_avg, ks.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>());
  });
  return out;
}

template <typename acc_t>
struct UpdateArgs {
  Bits<acc_t> threshold;
  acc_t decay, step_size, bias_correction2_sqrt, eps;
};

template <typename acc_t>
void update_tile(const acc_t* p, acc_t* out, const acc_t* __restrict m1, const acc_t* __restrict m2,
                 const UpdateArgs<acc_t>& s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = mofo::masked_param(p[i], m1[i], m2[i], s.threshold, s.decay, s.step_size, s.bias_correction2_sqrt, s.eps);
  }
}

template <typename acc_t>
void update(at::TensorList params, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList grads,
            at::TensorList omega, const std::vector<UpdateArgs<acc_t>>& args, acc_t grad_factor) {
  const bool with_si = !omega.empty();
  for_each_chunk(make_chunks(params), [&](int64_t, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    const at::Tensor& param = params[t];
    const bool in_place = param.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
    Tile p_buf, g_buf, out_buf, old_buf, new_buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const acc_t* p = load_tile<acc_t>(param, offset, n, p_buf);
      const acc_t* old_p = p;
      if (with_si && in_place) {
        std::memcpy(old_buf.data(), p, n * sizeof(acc_t));
        old_p = reinterpret_cast<const acc_t*>(old_buf.data());
      }
      acc_t* out = output_tile<acc_t>(param, offset, out_buf);
      update_tile(p, out, exp_avg[t].const_data_ptr<acc_t>() + offset, exp_avg_sq[t].const_data_ptr<acc_t>() + offset,
                  args[t], n);
      store_tile<acc_t>(param, offset, n, out);
      if (with_si) {
        const acc_t* new_p = in_place ? out : load_tile<acc_t>(param, offset, n, new_buf);  // as rounded
        const acc_t* g = load_tile<acc_t>(grads[t], offset, n, g_buf);
        acc_t* w = omega[t].mutable_data_ptr<acc_t>() + offset;
        for (int64_t i = 0; i < n; ++i) w[i] = math::path_integral(w[i], grad_factor * g[i], new_p[i], old_p[i]);
      }
    }
  });
}

void mofo_update(at::TensorList params_, at::TensorList exp_avg, at::TensorList exp_avg_sq, at::TensorList steps,
                 const at::Tensor& thresholds_, at::TensorList grads_, at::TensorList omega,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf, double lr,
                 double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const auto acc = accumulate_type(params_);
  check_same_layout("exp_avg", exp_avg, params_);
  check_same_layout("exp_avg_sq", exp_avg_sq, params_);
  check_numel("thresholds", thresholds_, params_.size());
  TORCH_CHECK(steps.size() == params_.size(), "fastforget: steps has ", steps.size(), " tensors for ",
              params_.size(), " params");
  if (!omega.empty()) {
    check_same_layout("omega", omega, params_);
    check_same_layout("grads", grads_, params_);
  }
  const std::pair<const char*, at::TensorList> state[] = {
      {"exp_avg", exp_avg}, {"exp_avg_sq", exp_avg_sq}, {"omega", omega}};
  for (const auto& [name, list] : state) {
    for (size_t t = 0; t < list.size(); ++t) {
      TORCH_CHECK(list[t].scalar_type() == acc && list[t].is_contiguous(), "fastforget: ", name, "[", t,
                  "] must be a contiguous ", acc, " tensor");
    }
  }
  if (params_.empty() || (found_inf && found_inf->item<double>() != 0)) return;  // a skipped step: no write
  const auto params = contiguous(params_);
  const auto grads = omega.empty() ? std::vector<at::Tensor>{} : contiguous(grads_);
  const at::Tensor thresholds = thresholds_.to(at::kLong).contiguous();
  const double grad_factor = (maximize ? -1.0 : 1.0) / (grad_scale ? grad_scale->item<double>() : 1.0);
  AT_DISPATCH_FLOATING_TYPES(acc, "mofo_update", [&] {
    std::vector<UpdateArgs<scalar_t>> args(params.size());
    for (size_t t = 0; t < params.size(); ++t) {
      const double k = steps[t].item<double>();  // torch.optim.AdamW: bias corrections in double
      args[t] = {static_cast<Bits<scalar_t>>(thresholds.const_data_ptr<int64_t>()[t]),
                 static_cast<scalar_t>(1 - lr * weight_decay), static_cast<scalar_t>(lr / (1 - std::pow(beta1, k))),
                 static_cast<scalar_t>(std::sqrt(1 - std::pow(beta2, k))), static_cast<scalar_t>(eps)};
    }
    update<scalar_t>(params, exp_avg, exp_avg_sq, grads, omega, args, static_cast<scalar_t>(grad_factor));
  });
  copy_back(params_, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) {
  m.impl("mofo_histogram", &mofo_histogram);
  m.impl("mofo_thresholds", &mofo_thresholds);
  m.impl("mofo_update", &mofo_update);
}

}  // namespace fastforget::cpu
