// Per-element gradient protection, two passes over a whole list (math: fastforget/ops/grad_ema.py), for
// x = inv_scale * g and alpha = alpha[t]:
//
//   d = x - m,  m' = m + alpha d,  v' = (1 - alpha)(v + alpha d^2)       (Welford-style EMA, Finch 2009)
//   grad_ema_stats:    per tensor, max v' (+inf if a v' is NaN/Inf); writes nothing
//   grad_ema_protect:  unless skip: m <- m', v <- v', g <- (1 - s) g where s = sigmoid(v' var_scale[t]) > threshold
//
// The max is exact, so its chunk partials combine to the same result in any order and thread count.
#include "fast_math.h"
#include "multi_tensor.h"

#include "../common.h"
#include "../elementwise.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace fastforget::cpu {
namespace {

template <typename acc_t>
struct EmaArgs {
  acc_t inv_scale, alpha, keep, var_scale, threshold;
};

// max over a tile of v' (>= 0), a NaN counting as +inf. A plain loop the compiler vectorises: a float max
// reduction only vectorises under -ffinite-math-only, but non-negative IEEE floats (+inf included) order like
// their bit patterns read as signed integers, and an integer max reduction always does.
template <typename acc_t>
acc_t tile_max_var(const acc_t* g, const acc_t* __restrict m, const acc_t* __restrict v, const EmaArgs<acc_t>& a,
                   int64_t n) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  const acc_t scale = a.inv_scale, alpha = a.alpha, keep = a.keep;
  bits_t best = 0;  // the bits of +0.0
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v_new = math::ema_var(scale * g[i], m[i], v[i], alpha, keep);
    const acc_t finite_or_inf = v_new == v_new ? v_new : std::numeric_limits<acc_t>::infinity();
    bits_t bits;
    std::memcpy(&bits, &finite_or_inf, sizeof bits);
    best = bits > best ? bits : best;
  }
  acc_t out;
  std::memcpy(&out, &best, sizeof out);
  return out;
}

// A plain loop, vectorised by the compiler (selects need -fno-trapping-math, see setup.py): m and v never alias
// g or out; out may be g itself.
template <typename acc_t>
void protect_tile(const acc_t* g, acc_t* __restrict m, acc_t* __restrict v, acc_t* out, const EmaArgs<acc_t>& a,
                  int64_t n) {
  const acc_t scale = a.inv_scale, alpha = a.alpha, keep = a.keep, var_scale = a.var_scale, threshold = a.threshold;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gi = g[i], mi = m[i], x = scale * gi;
    const acc_t v_new = math::ema_var(x, mi, v[i], alpha, keep);
    m[i] = math::ema_mean(x, mi, alpha);
    v[i] = v_new;
    out[i] = math::protection_factor(exp_nonpositive(-(v_new * var_scale)), threshold) * gi;
  }
}

// The per-tensor arguments of tensor t, from host copies of alpha (and var_scale when given).
template <typename acc_t>
EmaArgs<acc_t> args_of(int64_t t, acc_t inv_scale, const acc_t* alpha, const acc_t* var_scale, acc_t threshold) {
  return {inv_scale, alpha[t], acc_t(1) - alpha[t], var_scale ? var_scale[t] : acc_t(0), threshold};
}

template <typename acc_t>
void max_var(at::TensorList grads, at::TensorList mean, at::TensorList var, acc_t inv_scale, const acc_t* alpha,
             acc_t* out) {
  const auto chunks = make_chunks(grads);
  std::vector<acc_t> partials(chunks.size(), acc_t(0));
  for_each_chunk(chunks, [&](int64_t index, const Chunk& chunk) {
    const auto a = args_of<acc_t>(chunk.tensor, inv_scale, alpha, nullptr, 0);
    const acc_t* m = mean[chunk.tensor].const_data_ptr<acc_t>();
    const acc_t* v = var[chunk.tensor].const_data_ptr<acc_t>();
    Tile buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const acc_t* g = load_tile<acc_t>(grads[chunk.tensor], offset, n, buf);
      partials[index] = std::max(partials[index], tile_max_var(g, m + offset, v + offset, a, n));
    }
  });
  std::fill(out, out + grads.size(), acc_t(0));
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] = std::max(out[chunks[c].tensor], partials[c]);
}

template <typename acc_t>
void protect(at::TensorList grads, at::TensorList mean, at::TensorList var, acc_t inv_scale, const acc_t* alpha,
             const acc_t* var_scale, acc_t threshold) {
  for_each_chunk(make_chunks(grads), [&](int64_t, const Chunk& chunk) {
    const at::Tensor& target = grads[chunk.tensor];
    const auto a = args_of<acc_t>(chunk.tensor, inv_scale, alpha, var_scale, threshold);
    acc_t* m = mean[chunk.tensor].mutable_data_ptr<acc_t>();
    acc_t* v = var[chunk.tensor].mutable_data_ptr<acc_t>();
    Tile g_buf, out_buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      acc_t* out = output_tile<acc_t>(target, offset, out_buf);
      protect_tile(load_tile<acc_t>(target, offset, n, g_buf), m + offset, v + offset, out, a, n);
      store_tile<acc_t>(target, offset, n, out);
    }
  });
}

// mean and var all hold acc (float or double: the math's dtype), are contiguous and shaped like grads (the Python layer checks it).
void check_state(at::TensorList grads, at::TensorList mean, at::TensorList var, at::ScalarType acc,
                 const at::Tensor& inv_scale, const at::Tensor& alpha) {
  check_numel("inv_scale", inv_scale, 1);
  check_numel("alpha", alpha, grads.size());
  check_same_layout("mean", mean, grads);
  check_same_layout("var", var, grads);
  for (size_t t = 0; t < grads.size(); ++t) {
    TORCH_CHECK(mean[t].scalar_type() == acc && var[t].scalar_type() == acc, "mean[", t, "] and var[", t,
                "] must be ", acc);
    TORCH_CHECK(mean[t].is_contiguous() && var[t].is_contiguous(), "mean[", t, "] and var[", t,
                "] must be contiguous");
  }
}

at::Tensor grad_ema_stats(at::TensorList grads_, at::TensorList mean, at::TensorList var, const at::Tensor& inv_scale,
                          const at::Tensor& alpha_) {
  const auto grads = contiguous(grads_);
  const auto acc = accumulate_type(mean);  // the state's dtype
  check_state(grads, mean, var, acc, inv_scale, alpha_);
  const at::Tensor alpha = alpha_.to(acc).contiguous();
  at::Tensor out = at::empty({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "grad_ema_stats", [&] {
    max_var<scalar_t>(grads, mean, var, inv_scale.item<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
                      out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

void grad_ema_protect(at::TensorList grads_, at::TensorList mean, at::TensorList var, const at::Tensor& inv_scale,
                      const at::Tensor& alpha_, const at::Tensor& var_scale_, const at::Tensor& skip,
                      double threshold) {
  check_numel("skip", skip, 1);
  check_numel("var_scale", var_scale_, grads_.size());
  if (skip.item<bool>()) return;
  const auto grads = contiguous(grads_);  // a non-contiguous one is updated through a copy, written back below
  const auto acc = accumulate_type(mean);  // the state's dtype
  check_state(grads, mean, var, acc, inv_scale, alpha_);
  const at::Tensor alpha = alpha_.to(acc).contiguous(), var_scale = var_scale_.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "grad_ema_protect", [&] {
    protect<scalar_t>(grads, mean, var, inv_scale.item<scalar_t>(), alpha.const_data_ptr<scalar_t>(),
                      var_scale.const_data_ptr<scalar_t>(), static_cast<scalar_t>(threshold));
  });
  copy_back(grads_, grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) {
  m.impl("grad_ema_stats", &grad_ema_stats);
  m.impl("grad_ema_protect", &grad_ema_protect);
}

}  // namespace fastforget::cpu
