// The protected AdamW step's CPU tile loop (math: fastforget/ops/protected_adamw_step.py), shared by the 32-bit
// kernel (protected_adamw_step.cpp: moments in acc_t) and the 8-bit one (protected_adamw8bit_step.cpp: moments
// dequantized into the tile and requantized after it). Per element, in acc_t:
//
//   g_task = s g;  g_ewc = g_task + 2 lam F (theta - anchor);  g' = factor g_ewc  or  the element EMA protection;
//   AdamW on g' (decoupled weight decay, bias correction);  omega -= g_task (theta_new - theta_old)
//
// The elementwise loops are plain loops the compiler vectorises (selects and sqrt: -fno-trapping-math and
// -fno-math-errno, see fastforget/_build.py).
#pragma once

#include "fast_math.h"
#include "multi_tensor.h"

#include "../elementwise.h"
#include "../protected_adamw_step.h"

#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace fastforget::cpu {

enum class Protect { kNone, kTensor, kElement };

// Everything one tensor's elements need, the per-tensor values already picked.
template <typename acc_t>
struct StepArgs {
  acc_t grad_factor;  // (maximize ? -1 : 1) / grad_scale
  acc_t two_lam;
  acc_t factor;                             // mode "tensor"
  acc_t alpha, keep, var_scale, threshold;  // mode "element" (keep = 1 - alpha)
  acc_t decay;                              // 1 - lr * weight_decay
  acc_t beta1_complement, beta2, beta2_complement;
  acc_t step_size, bias_correction2_sqrt, eps;
};

// sum F (theta - anchor)^2 over a tile, in vector registers (a float sum in a plain loop would not vectorise
// without reassociation); run before step_tile, so its loads bring the tile into the cache.
template <typename acc_t>
acc_t penalty_tile(const acc_t* p, const acc_t* a, const acc_t* f, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const auto [d, fd] = math::ewc_term(Vec::loadu(p + i), Vec::loadu(a + i), Vec::loadu(f + i));
    vsum = at::vec::fmadd(fd, d, vsum);
  }
  acc_t sum = lane_sum(vsum);
  for (; i < n; ++i) {
    const auto [d, fd] = math::ewc_term(p[i], a[i], f[i]);
    sum += fd * d;
  }
  return sum;
}

// One tile: theta (p, written to p_out, which may be p itself), the moments m1, m2 and the protection state
// em, ev in place. a, f: EWC anchor and Fisher (unused without EWC).
template <typename acc_t, bool kEwc, Protect kProtect>
void step_tile(const acc_t* p, acc_t* p_out, const acc_t* __restrict g, const acc_t* __restrict a,
                const acc_t* __restrict f, acc_t* __restrict m1, acc_t* __restrict m2, acc_t* __restrict em,
                acc_t* __restrict ev, const StepArgs<acc_t>& s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t theta = p[i];
    acc_t grad = s.grad_factor * g[i];
    if constexpr (kEwc) grad += s.two_lam * math::ewc_term(theta, a[i], f[i]).fd;
    if constexpr (kProtect == Protect::kTensor) grad *= s.factor;
    if constexpr (kProtect == Protect::kElement) {  // the EMA of grad_ema_protect (Finch 2009)
      const acc_t mean = em[i];
      const acc_t var = math::ema_var(grad, mean, ev[i], s.alpha, s.keep);
      em[i] = math::ema_mean(grad, mean, s.alpha);
      ev[i] = var;
      grad *= math::protection_factor(exp_nonpositive(-(var * s.var_scale)), s.threshold);
    }
    const auto [mi, vi] = math::adamw_moments(m1[i], m2[i], grad, s.beta1_complement, s.beta2, s.beta2_complement);
    m1[i] = mi;
    m2[i] = vi;
    p_out[i] = math::adamw_param(theta, mi, vi, s.decay, s.step_size, s.bias_correction2_sqrt, s.eps);
  }
}

// omega -= g_task (theta_new - theta_old), theta_new as stored.
template <typename acc_t>
void path_integral_tile(acc_t* __restrict omega, const acc_t* __restrict g, const acc_t* __restrict old_p,
                        const acc_t* __restrict new_p, acc_t grad_factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) omega[i] = math::path_integral(omega[i], grad_factor * g[i], new_p[i], old_p[i]);
}

// The moments of the 32-bit step: acc_t state updated in place; the Fisher as given (any float dtype).
template <typename acc_t>
struct FloatMoments {
  at::TensorList exp_avg, exp_avg_sq, fisher;

  struct Tiles {
    Tile m1, m2, fisher;
  };

  // The tile's m1, m2 (updated in place by step_tile) and Fisher (nullptr without EWC).
  std::tuple<acc_t*, acc_t*, const acc_t*> load(int64_t t, int64_t offset, int64_t n, Tiles& buf) const {
    return {exp_avg[t].mutable_data_ptr<acc_t>() + offset, exp_avg_sq[t].mutable_data_ptr<acc_t>() + offset,
            fisher.empty() ? nullptr : load_tile<acc_t>(fisher[t], offset, n, buf.fisher)};
  }

  void store(int64_t, int64_t, int64_t, const acc_t*, const acc_t*) const {}  // updated in place
};

// The tile loop of the step over a whole list (one parallel region; chunks: multi_tensor.h). `moments` says where a
// tile's moments and Fisher come from and go to (FloatMoments; the 8-bit step's dequantize and requantize them);
// the rest -- params, grads, anchors, protection state, omega -- is the same for both. Returns sum F (theta -
// anchor)^2, summed per chunk and the partials in chunk order.
template <typename acc_t, bool kEwc, Protect kProtect, typename Moments>
acc_t run(const AdamwLists& l, const std::vector<StepArgs<acc_t>>& args, const Moments& moments) {
  const auto chunks = make_chunks(l.params);
  std::vector<acc_t> partials(chunks.size());
  const bool with_si = !l.omega.empty();
  for_each_chunk(chunks, [&](int64_t index, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    const StepArgs<acc_t>& s = args[t];
    const at::Tensor& param = l.params[t];
    const bool in_place = param.scalar_type() == c10::CppTypeToScalarType<acc_t>::value;
    acc_t* em = kProtect == Protect::kElement ? l.ema_mean[t].mutable_data_ptr<acc_t>() : nullptr;
    acc_t* ev = kProtect == Protect::kElement ? l.ema_var[t].mutable_data_ptr<acc_t>() : nullptr;
    Tile p_buf, g_buf, a_buf, out_buf, old_buf, new_buf;
    typename Moments::Tiles moment_buf;
    acc_t sum = 0;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const acc_t* p = load_tile<acc_t>(param, offset, n, p_buf);
      const acc_t* g = load_tile<acc_t>(l.grads[t], offset, n, g_buf);
      const acc_t* a = kEwc ? load_tile<acc_t>(l.anchors[t], offset, n, a_buf) : nullptr;
      const auto [m1, m2, f] = moments.load(t, offset, n, moment_buf);
      const acc_t* old_p = p;  // theta before the step: p itself unless it is updated in place
      if (with_si && in_place) {
        std::memcpy(old_buf.data(), p, n * sizeof(acc_t));
        old_p = reinterpret_cast<const acc_t*>(old_buf.data());
      }
      if constexpr (kEwc) sum += penalty_tile(p, a, f, n);
      acc_t* out = output_tile<acc_t>(param, offset, out_buf);
      step_tile<acc_t, kEwc, kProtect>(p, out, g, a, f, m1, m2, em ? em + offset : nullptr,
                                       ev ? ev + offset : nullptr, s, n);
      store_tile<acc_t>(param, offset, n, out);
      moments.store(t, offset, n, m1, m2);
      if (with_si) {
        const acc_t* new_p = in_place ? out : load_tile<acc_t>(param, offset, n, new_buf);  // as rounded
        path_integral_tile(l.omega[t].mutable_data_ptr<acc_t>() + offset, g, old_p, new_p, s.grad_factor, n);
      }
    }
    partials[index] = sum;
  });
  return pairwise_sum(partials.data(), static_cast<int64_t>(partials.size()));
}

template <typename acc_t, bool kEwc, typename Moments>
acc_t run_protect(const AdamwLists& l, const std::vector<StepArgs<acc_t>>& args, Protect mode,
                  const Moments& moments) {
  switch (mode) {
    case Protect::kTensor: return run<acc_t, kEwc, Protect::kTensor>(l, args, moments);
    case Protect::kElement: return run<acc_t, kEwc, Protect::kElement>(l, args, moments);
    default: return run<acc_t, kEwc, Protect::kNone>(l, args, moments);
  }
}

// The step's EWC sum over the list: the tile loop instantiated for the EWC and protection parts present.
template <typename acc_t, typename Moments>
acc_t run_step(const AdamwLists& l, const std::vector<StepArgs<acc_t>>& args, Protect mode, const Moments& moments) {
  return l.anchors.empty() ? run_protect<acc_t, false>(l, args, mode, moments)
                           : run_protect<acc_t, true>(l, args, mode, moments);
}

// A per-tensor argument's host values (CPU: reading them is free), or `fallback` for each tensor when absent.
inline std::vector<double> host_values(const std::optional<at::Tensor>& t, size_t count, double fallback) {
  if (!t) return std::vector<double>(count, fallback);
  const at::Tensor values = t->to(at::kDouble).contiguous();
  return {values.const_data_ptr<double>(), values.const_data_ptr<double>() + count};
}

template <typename acc_t>
std::vector<StepArgs<acc_t>> step_args(at::TensorList steps, const std::optional<at::Tensor>& factors,
                                       const std::optional<at::Tensor>& alpha,
                                       const std::optional<at::Tensor>& var_scale, double grad_factor, double lr,
                                       double beta1, double beta2, double eps, double weight_decay, double lam,
                                       double threshold) {
  const size_t count = steps.size();
  const auto f = host_values(factors, count, 1.0), al = host_values(alpha, count, 0.0);
  const auto vs = host_values(var_scale, count, 0.0);
  std::vector<StepArgs<acc_t>> out(count);
  for (size_t t = 0; t < count; ++t) {
    const double k = steps[t].item<double>() + 1;  // torch.optim.AdamW: bias corrections in double
    out[t] = {static_cast<acc_t>(grad_factor),
              static_cast<acc_t>(2 * lam),
              static_cast<acc_t>(f[t]),
              static_cast<acc_t>(al[t]),
              static_cast<acc_t>(1 - al[t]),
              static_cast<acc_t>(vs[t]),
              static_cast<acc_t>(threshold),
              static_cast<acc_t>(1 - lr * weight_decay),
              static_cast<acc_t>(1 - beta1),
              static_cast<acc_t>(beta2),
              static_cast<acc_t>(1 - beta2),
              static_cast<acc_t>(lr / (1 - std::pow(beta1, k))),
              static_cast<acc_t>(std::sqrt(1 - std::pow(beta2, k))),
              static_cast<acc_t>(eps)};
  }
  return out;
}

// The gradient's factor (maximize ? -1 : 1) / grad_scale, and the protection mode the arguments ask for.
inline double grad_factor(bool maximize, const std::optional<at::Tensor>& grad_scale) {
  return (maximize ? -1.0 : 1.0) / (grad_scale ? grad_scale->item<double>() : 1.0);
}

inline Protect protect_mode(const std::optional<at::Tensor>& factors, at::TensorList ema_mean) {
  return factors ? Protect::kTensor : !ema_mean.empty() ? Protect::kElement : Protect::kNone;
}

inline bool skipped(const std::optional<at::Tensor>& found_inf) { return found_inf && found_inf->item<double>() != 0; }

}  // namespace fastforget::cpu
