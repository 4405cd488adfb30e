// Weight averaging on the CPU (schema and math: fastforget/_schemas.py, fastforget/ops/weight_merge.py):
// out = sum_k w_k theta_k, or sum_k w_k F~_k theta_k / sum_k w_k F~_k with F~_k = max(F_k, floor_k), over a whole
// list in one parallel region (multi_tensor.h). Per L1-resident tile each source is read once and out written once;
// the sums live in a separate buffer until every source of the tile is read, so out may be one of its sources.
#include "multi_tensor.h"

#include "../common.h"

#include <torch/library.h>

#include <algorithm>

namespace fastforget::cpu {
namespace {

// num (+)= w * theta (kFirst: num = w * theta)
template <typename acc_t, bool kFirst>
void add_scaled_tile(const acc_t* theta, acc_t w, acc_t* num, int64_t n) {
  using V = at::vec::Vectorized<acc_t>;
  const V vw(w);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V t = V::loadu(theta + i);
    (kFirst ? vw * t : at::vec::fmadd(vw, t, V::loadu(num + i))).store(num + i);
  }
  for (; i < n; ++i) num[i] = kFirst ? w * theta[i] : w * theta[i] + num[i];
}

// s = w * max(F, floor); num (+)= s * theta; den (+)= s (kFirst: assigned)
template <typename acc_t, bool kFirst>
void add_fisher_tile(const acc_t* theta, const acc_t* fisher, acc_t w, acc_t floor, acc_t* num, acc_t* den,
                     int64_t n) {
  using V = at::vec::Vectorized<acc_t>;
  const V vw(w), vfloor(floor);
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    const V f = V::loadu(fisher + i);
    const V s = vw * V::blendv(f, vfloor, f < vfloor);  // max that keeps a NaN Fisher NaN, as clamp_min does
    const V t = V::loadu(theta + i);
    (kFirst ? s * t : at::vec::fmadd(s, t, V::loadu(num + i))).store(num + i);
    (kFirst ? s : s + V::loadu(den + i)).store(den + i);
  }
  for (; i < n; ++i) {
    const acc_t s = w * (fisher[i] < floor ? floor : fisher[i]);
    num[i] = kFirst ? s * theta[i] : s * theta[i] + num[i];
    den[i] = kFirst ? s : s + den[i];
  }
}

template <typename acc_t>
void divide_tile(acc_t* num, const acc_t* den, int64_t n) {
  using V = at::vec::Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) (V::loadu(num + i) / V::loadu(den + i)).store(num + i);
  for (; i < n; ++i) num[i] /= den[i];
}

template <typename acc_t, bool kFisher>
void run(at::TensorList out, at::TensorList models, at::TensorList fisher, c10::ArrayRef<double> weights,
         c10::ArrayRef<double> floors) {
  const auto num_tensors = static_cast<int64_t>(out.size());
  const auto num_models = static_cast<int64_t>(weights.size());
  for_each_chunk(make_chunks(out), [&](int64_t, const Chunk& chunk) {
    const at::Tensor& target = out[chunk.tensor];
    Tile theta_buf, fisher_buf, num_buf, den_buf;
    auto* num = reinterpret_cast<acc_t*>(num_buf.data());
    auto* den = reinterpret_cast<acc_t*>(den_buf.data());
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      for (int64_t k = 0; k < num_models; ++k) {
        const int64_t j = k * num_tensors + chunk.tensor;
        const acc_t* theta = load_tile<acc_t>(models[j], offset, n, theta_buf);
        const auto w = static_cast<acc_t>(weights[k]);
        if constexpr (kFisher) {
          const acc_t* f = load_tile<acc_t>(fisher[j], offset, n, fisher_buf);
          const auto floor = static_cast<acc_t>(floors[k]);
          k == 0 ? add_fisher_tile<acc_t, true>(theta, f, w, floor, num, den, n)
                 : add_fisher_tile<acc_t, false>(theta, f, w, floor, num, den, n);
        } else {
          k == 0 ? add_scaled_tile<acc_t, true>(theta, w, num, n) : add_scaled_tile<acc_t, false>(theta, w, num, n);
        }
      }
      if constexpr (kFisher) divide_tile(num, den, n);
      acc_t* dst = output_tile<acc_t>(target, offset, num_buf);
      if (dst != num) std::copy(num, num + n, dst);  // out holds acc_t: written in place
      store_tile<acc_t>(target, offset, n, num);
    }
  });
}

void weight_merge(at::TensorList out_, at::TensorList models_, at::TensorList fisher_, at::ArrayRef<double> weights,
                  at::ArrayRef<double> floors) {
  check_merge_lists(out_, models_, fisher_, weights.size(), floors.size());
  const auto out = contiguous(out_);  // a non-contiguous one is written through a copy, written back below
  const auto models = contiguous(models_);
  const auto fisher = contiguous(fisher_);
  const bool fp64 = accumulate_type(out) == at::kDouble;
  if (fp64) {
    fisher.empty() ? run<double, false>(out, models, fisher, weights, floors)
                   : run<double, true>(out, models, fisher, weights, floors);
  } else {
    fisher.empty() ? run<float, false>(out, models, fisher, weights, floors)
                   : run<float, true>(out, models, fisher, weights, floors);
  }
  copy_back(out_, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("weight_merge", &weight_merge); }

}  // namespace fastforget::cpu
