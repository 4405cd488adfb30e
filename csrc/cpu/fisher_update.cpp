// Fisher accumulation on the CPU: fisher = decay * fisher + scale * grad^2 over a whole list, in one parallel
// region (see multi_tensor.h), reading F and g and writing F once per element.
#include "multi_tensor.h"

#include "../common.h"

#include <torch/library.h>

namespace fastforget::cpu {
namespace {

template <typename acc_t>
void update_tile(const acc_t* f, const acc_t* g, acc_t* out, acc_t decay, acc_t scale, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vdecay(decay), vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vg = Vec::loadu(g + i);
    at::vec::fmadd(vscale * vg, vg, vdecay * Vec::loadu(f + i)).store(out + i);
  }
  for (; i < n; ++i) out[i] = decay * f[i] + scale * g[i] * g[i];
}

template <typename acc_t>
void run(at::TensorList fisher, at::TensorList grads, acc_t decay, acc_t scale) {
  for_each_chunk(make_chunks(fisher), [&](int64_t, const Chunk& chunk) {
    Tile f_buf, g_buf, out_buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const at::Tensor& target = fisher[chunk.tensor];
      const acc_t* f = load_tile<acc_t>(target, offset, n, f_buf);
      const acc_t* g = load_tile<acc_t>(grads[chunk.tensor], offset, n, g_buf);
      acc_t* out = output_tile<acc_t>(target, offset, out_buf);
      update_tile(f, g, out, decay, scale, n);
      store_tile<acc_t>(target, offset, n, out);
    }
  });
}

void fisher_update(at::TensorList fisher_, at::TensorList grads_, double decay, double scale) {
  check_same_layout("grads", grads_, fisher_, "fisher");
  const auto fisher = contiguous(fisher_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_);
  if (accumulate_type(fisher) == at::kDouble) {
    run<double>(fisher, grads, decay, scale);
  } else {
    run<float>(fisher, grads, static_cast<float>(decay), static_cast<float>(scale));
  }
  for (size_t i = 0; i < fisher.size(); ++i) {
    if (!fisher_[i].is_same(fisher[i])) fisher_[i].copy_(fisher[i]);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("fisher_update", &fisher_update); }

}  // namespace fastforget::cpu
