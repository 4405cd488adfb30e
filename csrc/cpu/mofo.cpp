// MoFO's two passes on the CPU (math and the select's driver: fastforget/ops/mofo.py), each one parallel region
// over the whole tensor list (chunking: multi_tensor.h).
//
// mofo_histogram: one pass of a radix select over the bit patterns of |exp_avg| (for a non-negative float the
//   bit pattern orders like the value): per tensor, a count of the digit (bits >> shift) & (2^digit_bits - 1) of
//   the elements whose higher bits (bits >> (shift + digit_bits)) equal prefix[t] (all elements on the first
//   pass), in kBins = 2^11 bins. Each thread counts into its own histograms (4 x 8 KiB: in L1) and adds its nonzero
//   bins to the output atomically when it moves to another tensor (integer counts: the order does not matter).
// mofo_thresholds: every pass of the select on one process (histograms and digit choices in C++).
// mofo_update: theta <- theta (1 - lr wd) - lr / (1 - beta1^k) m1 / (sqrt(m2) / sqrt(1 - beta2^k) + eps) on the
//   elements with bits(|m1|) >= threshold[t] (as unsigned; -1: none), theta (1 - lr wd) elsewhere; k = steps[t]
//   (the moments and steps are already updated); SI: omega -= g_task (theta_new - theta_old).
#include "multi_tensor.h"

#include "../common.h"
#include "../elementwise.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>

namespace fastforget::cpu {
namespace {

constexpr int64_t kMaxDigitBits = 11;
constexpr int64_t kBins = int64_t{1} << kMaxDigitBits;
constexpr int64_t kLanes = 4;

template <typename acc_t>
using Bits = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;

template <typename acc_t>
Bits<acc_t> abs_bits(acc_t x) {
  Bits<acc_t> bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits & (~Bits<acc_t>{0} >> 1);  // |x|: the sign bit cleared
}

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

// The whole select on one process: every pass's histogram, then per tensor the digit holding the need-th largest
// element (scanning the bins from the top), the prefix extended by it.
template <typename acc_t>
void thresholds(at::TensorList exp_avg, const int64_t* ks, int64_t* out) {
  const int64_t count = static_cast<int64_t>(exp_avg.size());
  std::vector<int64_t> need(count), prefix(count, 0);
  for (int64_t t = 0; t < count; ++t) need[t] = std::max<int64_t>(ks[t], 1);
  std::vector<int32_t> hist(count * kBins);
  for (int64_t top = 8 * sizeof(acc_t); top > 0; top -= kMaxDigitBits) {
    const int64_t shift = std::max<int64_t>(top - kMaxDigitBits, 0), digit_bits = top - shift;
    std::fill(hist.begin(), hist.end(), 0);
    histogram<acc_t>(exp_avg, prefix.data(), shift, digit_bits, hist.data());
    for (int64_t t = 0; t < count; ++t) {
      const int32_t* h = hist.data() + t * kBins;
      int64_t digit = (int64_t{1} << digit_bits) - 1, above = 0;
      for (; digit > 0 && above + h[digit] < need[t]; --digit) above += h[digit];
      need[t] -= above;
      prefix[t] = (prefix[t] << digit_bits) + digit;
    }
  }
  for (int64_t t = 0; t < count; ++t) out[t] = ks[t] > 0 ? prefix[t] : -1;
}

at::Tensor mofo_thresholds(at::TensorList exp_avg, const at::Tensor& ks_) {
  check_numel("ks", ks_, exp_avg.size());
  const auto acc = accumulate_type(exp_avg);
  check_state(exp_avg, acc);
  const at::Tensor ks = ks_.to(at::kLong).contiguous();
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
    const acc_t m = abs_bits(m1[i]) >= s.threshold ? m1[i] : acc_t(0);  // theta * decay exactly when filtered
    out[i] = math::adamw_param(p[i], m, m2[i], s.decay, s.step_size, s.bias_correction2_sqrt, s.eps);
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
