// Fisher accumulation on the CPU: fisher = decay * fisher + scale * sum_s grad_s^2 (|grad_s| when absolute: MAS)
// over a whole list, in one parallel region (see multi_tensor.h), reading F and each g_s and writing F once per
// element.
#include "multi_tensor.h"

#include "../common.h"

#include <torch/library.h>

namespace fastforget::cpu {
namespace {

// out = decay * f (a stack of zero gradients)
template <typename acc_t>
void decay_tile(const acc_t* f, acc_t* out, acc_t decay, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vdecay(decay);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (vdecay * Vec::loadu(f + i)).store(out + i);
  for (; i < n; ++i) out[i] = decay * f[i];
}

// out = (scale * g) * g + base (kAbs: scale * |g| + base), with base = decay * f for the first gradient of a stack
// and out for the others
template <typename acc_t, bool kFirst, bool kAbs>
void add_square_tile(const acc_t* f, const acc_t* g, acc_t* out, acc_t decay, acc_t scale, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vdecay(decay), vscale(scale);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec vg = Vec::loadu(g + i);
    const Vec base = kFirst ? vdecay * Vec::loadu(f + i) : Vec::loadu(out + i);
    (kAbs ? at::vec::fmadd(vscale, vg.abs(), base) : at::vec::fmadd(vscale * vg, vg, base)).store(out + i);
  }
  for (; i < n; ++i) {
    out[i] = (kAbs ? scale * std::abs(g[i]) : scale * g[i] * g[i]) + (kFirst ? decay * f[i] : out[i]);
  }
}

// F = decay * F + scale * sum_s g_s^2 where grads[t] stacks k = numel(grads[t]) / numel(F) gradients g_s.
// One sweep per gradient over each L1-resident tile: F is read once, each g_s once, and F written once.
template <typename acc_t, bool kAbs>
void run(at::TensorList fisher, at::TensorList grads, acc_t decay, acc_t scale) {
  for_each_chunk(make_chunks(fisher), [&](int64_t, const Chunk& chunk) {
    const at::Tensor& target = fisher[chunk.tensor];
    const at::Tensor& stack = grads[chunk.tensor];
    const int64_t numel = target.numel(), samples = stack.numel() / numel;
    Tile f_buf, g_buf, out_buf;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const acc_t* f = load_tile<acc_t>(target, offset, n, f_buf);
      acc_t* out = output_tile<acc_t>(target, offset, out_buf);
      if (samples == 0) decay_tile(f, out, decay, n);
      for (int64_t s = 0; s < samples; ++s) {
        const acc_t* g = load_tile<acc_t>(stack, s * numel + offset, n, g_buf);
        if (s == 0) {
          add_square_tile<acc_t, true, kAbs>(f, g, out, decay, scale, n);
        } else {
          add_square_tile<acc_t, false, kAbs>(f, g, out, decay, scale, n);
        }
      }
      store_tile<acc_t>(target, offset, n, out);
    }
  });
}

template <typename acc_t>
void run_mode(at::TensorList fisher, at::TensorList grads, acc_t decay, acc_t scale, bool absolute) {
  if (absolute) {
    run<acc_t, true>(fisher, grads, decay, scale);
  } else {
    run<acc_t, false>(fisher, grads, decay, scale);
  }
}

void fisher_update(at::TensorList fisher_, at::TensorList grads_, double decay, double scale, bool absolute) {
  check_stacks(fisher_, grads_);
  const auto fisher = contiguous(fisher_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_);
  if (accumulate_type(fisher) == at::kDouble) {
    run_mode<double>(fisher, grads, decay, scale, absolute);
  } else {
    run_mode<float>(fisher, grads, static_cast<float>(decay), static_cast<float>(scale), absolute);
  }
  copy_back(fisher_, fisher);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("fisher_update", &fisher_update); }

}  // namespace fastforget::cpu
