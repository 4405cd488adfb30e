// grads[t] *= factors[t] over a whole list, in one parallel region (see multi_tensor.h).
#include "multi_tensor.h"

#include "../common.h"

#include <torch/library.h>

namespace fastforget::cpu {
namespace {

template <typename acc_t>
void scale_tile(const acc_t* g, acc_t* out, acc_t factor, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vfactor(factor);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (vfactor * Vec::loadu(g + i)).store(out + i);
  for (; i < n; ++i) out[i] = factor * g[i];
}

template <typename acc_t>
void run(at::TensorList grads, const acc_t* factors) {
  for_each_chunk(make_chunks(grads), [&](int64_t, const Chunk& chunk) {
    const at::Tensor& target = grads[chunk.tensor];
    Tile g_buf, out_buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      acc_t* out = output_tile<acc_t>(target, offset, out_buf);
      scale_tile(load_tile<acc_t>(target, offset, n, g_buf), out, factors[chunk.tensor], n);
      store_tile<acc_t>(target, offset, n, out);
    }
  });
}

void scale_grads(at::TensorList grads_, const at::Tensor& factors_) {
  TORCH_CHECK(factors_.numel() == static_cast<int64_t>(grads_.size()), "factors has ", factors_.numel(),
              " entries for ", grads_.size(), " gradients");
  const auto grads = contiguous(grads_);  // a non-contiguous one is updated through a copy, written back below
  const auto acc = accumulate_type(grads);
  const at::Tensor factors = factors_.to(acc).contiguous();
  if (acc == at::kDouble) {
    run<double>(grads, factors.const_data_ptr<double>());
  } else {
    run<float>(grads, factors.const_data_ptr<float>());
  }
  copy_back(grads_, grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("scale_grads", &scale_grads); }

}  // namespace fastforget::cpu
