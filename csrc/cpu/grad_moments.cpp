// Per-tensor moments of x = inv_scale * grad, for streaming variance: (count, mean, M2 = sum (x - mean)^2).
//
// No sum(x^2) - sum(x)^2 / n cancellation. All moments are of y = x - k, k being the tensor's first x (so that
// gradients like 1e4 + 1e-3 noise keep their digits in the partial means); each L1-resident tile uses the
// corrected two-pass algorithm (Chan, Golub & LeVeque 1983): m = sum(y) / n, S1 = sum(y - m), S2 = sum((y - m)^2),
// mean = m + S1 / n, M2 = S2 - S1^2 / n. Tiles, then chunks, are merged in a fixed order with Chan et al.'s (1979)
// pairwise update, so the result is bitwise reproducible for any thread count. Finally mean(x) = k + mean(y).
#include "multi_tensor.h"

#include "../common.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <utility>

namespace fastforget::cpu {
namespace {

template <typename acc_t>
struct Moments {
  acc_t count = 0, mean = 0, m2 = 0;

  // Chan et al.: delta = mean_b - mean_a, mean = mean_a + delta n_b / n, M2 = M2_a + M2_b + delta^2 n_a n_b / n
  void merge(const Moments& b) {
    if (b.count == 0) return;
    const acc_t n = count + b.count, delta = b.mean - mean;
    mean += delta * (b.count / n);
    m2 += b.m2 + delta * delta * (count * b.count / n);
    count = n;
  }
};

// sum of (scale * g - k), the first of the two passes
template <typename acc_t>
acc_t sum_shifted(const acc_t* g, acc_t scale, acc_t k, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vscale(scale), vk(k);
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) vsum = vsum + (vscale * Vec::loadu(g + i) - vk);
  acc_t sum = lane_sum(vsum);
  for (; i < n; ++i) sum += scale * g[i] - k;
  return sum;
}

// S1 = sum d and S2 = sum d^2 with d = (scale * g - k) - m, the second pass
template <typename acc_t>
std::pair<acc_t, acc_t> sum_deviations(const acc_t* g, acc_t scale, acc_t k, acc_t m, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vscale(scale), vk(k), vm(m);
  Vec vs1(acc_t(0)), vs2(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec d = (vscale * Vec::loadu(g + i) - vk) - vm;
    vs1 = vs1 + d;
    vs2 = at::vec::fmadd(d, d, vs2);
  }
  acc_t s1 = lane_sum(vs1), s2 = lane_sum(vs2);
  for (; i < n; ++i) {
    const acc_t d = (scale * g[i] - k) - m;
    s1 += d;
    s2 += d * d;
  }
  return {s1, s2};
}

// moments of y = scale * g - k over one tile
template <typename acc_t>
Moments<acc_t> tile_moments(const acc_t* g, acc_t scale, acc_t k, int64_t n) {
  const acc_t count = static_cast<acc_t>(n);
  const acc_t m = sum_shifted(g, scale, k, n) / count;
  const auto [s1, s2] = sum_deviations(g, scale, k, m, n);
  return {count, m + s1 / count, s2 - s1 * s1 / count};
}

template <typename acc_t>
void run(at::TensorList grads, acc_t scale, at::Tensor& out) {
  const auto chunks = make_chunks(grads);
  std::vector<acc_t> shifts(grads.size(), acc_t(0));  // k: each tensor's first element, scaled
  for (size_t t = 0; t < grads.size(); ++t) {
    Tile buf;
    if (grads[t].numel() > 0) shifts[t] = scale * load_tile<acc_t>(grads[t], 0, 1, buf)[0];
  }
  std::vector<Moments<acc_t>> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t index, const Chunk& chunk) {
    Tile buf;
    const acc_t k = shifts[chunk.tensor];
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      partials[index].merge(tile_moments(load_tile<acc_t>(grads[chunk.tensor], offset, n, buf), scale, k, n));
    }
  });
  std::vector<Moments<acc_t>> rows(grads.size());
  for (size_t c = 0; c < chunks.size(); ++c) rows[chunks[c].tensor].merge(partials[c]);
  auto* values = out.mutable_data_ptr<acc_t>();
  for (size_t t = 0; t < rows.size(); ++t) {
    values[3 * t] = rows[t].count, values[3 * t + 1] = shifts[t] + rows[t].mean, values[3 * t + 2] = rows[t].m2;
  }
}

at::Tensor grad_moments(at::TensorList grads_, const at::Tensor& inv_scale) {
  check_numel("inv_scale", inv_scale, 1);
  const auto grads = contiguous(grads_);
  const auto acc = accumulate_type(grads);
  at::Tensor out = at::empty({static_cast<int64_t>(grads.size()), 3}, at::TensorOptions().dtype(acc));
  if (acc == at::kDouble) {
    run<double>(grads, inv_scale.item<double>(), out);
  } else {
    run<float>(grads, inv_scale.item<float>(), out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("grad_moments", &grad_moments); }

}  // namespace fastforget::cpu
