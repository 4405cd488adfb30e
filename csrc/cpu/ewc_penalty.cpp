// EWC penalty on the CPU: penalty = lam * sum F (theta - anchor)^2, gradient 2 lam F (theta - anchor).
// One parallel region covers the whole parameter list (see multi_tensor.h for chunking and determinism).
#include "multi_tensor.h"

#include "../common.h"
#include "../elementwise.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

namespace fastforget::cpu {
namespace {

enum class Pass {
  kPenalty,     // sum only
  kGradient,    // out = c * F * (theta - anchor)
  kAccumulate,  // out = grad + c * F * (theta - anchor), and the sum
};

// One tile of n elements, all staged as acc_t. Returns sum F * d^2 with d = theta - anchor (0 for kGradient).
template <typename acc_t, Pass pass>
acc_t tile_kernel(const acc_t* p, const acc_t* a, const acc_t* f, const acc_t* g, acc_t* out, acc_t c, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec vc(c);
  Vec vsum(acc_t(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const auto [d, fd] = math::ewc_term(Vec::loadu(p + i), Vec::loadu(a + i), Vec::loadu(f + i));
    if constexpr (pass != Pass::kGradient) vsum = at::vec::fmadd(fd, d, vsum);
    if constexpr (pass == Pass::kGradient) (vc * fd).store(out + i);
    if constexpr (pass == Pass::kAccumulate) at::vec::fmadd(vc, fd, Vec::loadu(g + i)).store(out + i);
  }
  acc_t sum = lane_sum(vsum);
  for (; i < n; ++i) {
    const auto [d, fd] = math::ewc_term(p[i], a[i], f[i]);
    if constexpr (pass != Pass::kGradient) sum += fd * d;
    if constexpr (pass == Pass::kGradient) out[i] = c * fd;
    if constexpr (pass == Pass::kAccumulate) out[i] = g[i] + c * fd;
  }
  return sum;
}

// Runs `pass` over the list. `targets` are the tensors written (the outputs for kGradient, the gradients for
// kAccumulate; unused for kPenalty). Returns lam * sum over all elements, summed in chunk order.
template <typename acc_t, Pass pass>
acc_t run(at::TensorList params, at::TensorList anchors, at::TensorList fisher, at::TensorList targets, acc_t c,
          acc_t lam) {
  const auto chunks = make_chunks(params);
  std::vector<acc_t> partials(chunks.size());
  for_each_chunk(chunks, [&](int64_t index, const Chunk& chunk) {
    const int64_t t = chunk.tensor;
    Tile p_buf, a_buf, f_buf, g_buf, out_buf;
    acc_t sum = 0;
    for (int64_t offset = chunk.begin; offset < chunk.end; offset += kTile) {
      const int64_t n = std::min(kTile, chunk.end - offset);
      const acc_t* p = load_tile<acc_t>(params[t], offset, n, p_buf);
      const acc_t* a = load_tile<acc_t>(anchors[t], offset, n, a_buf);
      const acc_t* f = load_tile<acc_t>(fisher[t], offset, n, f_buf);
      const acc_t* g = nullptr;
      acc_t* out = nullptr;
      if constexpr (pass == Pass::kAccumulate) g = load_tile<acc_t>(targets[t], offset, n, g_buf);
      if constexpr (pass != Pass::kPenalty) out = output_tile<acc_t>(targets[t], offset, out_buf);
      sum += tile_kernel<acc_t, pass>(p, a, f, g, out, c, n);
      if constexpr (pass != Pass::kPenalty) store_tile<acc_t>(targets[t], offset, n, out);
    }
    partials[index] = sum;
  });
  return lam * pairwise_sum(partials.data(), static_cast<int64_t>(partials.size()));
}

void check_inputs(at::TensorList params, at::TensorList anchors, at::TensorList fisher) {
  check_same_layout("anchors", anchors, params);
  check_same_layout("fisher", fisher, params);
}

template <typename Fn>
at::Tensor with_accumulate_type(at::TensorList params, const Fn& fn) {
  const auto acc = accumulate_type(params);
  if (acc == at::kDouble) return at::scalar_tensor(fn(double{}), at::TensorOptions().dtype(acc));
  return at::scalar_tensor(fn(float{}), at::TensorOptions().dtype(acc));
}

at::Tensor ewc_penalty(at::TensorList params_, at::TensorList anchors_, at::TensorList fisher_, double lam) {
  check_inputs(params_, anchors_, fisher_);
  const auto params = contiguous(params_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  return with_accumulate_type(params, [&](auto zero) {
    using acc_t = decltype(zero);
    return run<acc_t, Pass::kPenalty>(params, anchors, fisher, {}, acc_t(0), static_cast<acc_t>(lam));
  });
}

std::vector<at::Tensor> ewc_penalty_backward(at::TensorList params_, at::TensorList anchors_,
                                             at::TensorList fisher_, double lam, const at::Tensor& grad_out) {
  check_inputs(params_, anchors_, fisher_);
  check_numel("grad_out", grad_out, 1);
  const auto params = contiguous(params_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto& p : params) outs.push_back(at::empty_like(p));
  with_accumulate_type(params, [&](auto zero) {
    using acc_t = decltype(zero);
    const acc_t c = acc_t(2) * static_cast<acc_t>(lam) * grad_out.item<acc_t>();
    return run<acc_t, Pass::kGradient>(params, anchors, fisher, outs, c, acc_t(0));
  });
  return outs;
}

at::Tensor ewc_penalty_accumulate(at::TensorList params_, at::TensorList anchors_, at::TensorList fisher_,
                                  at::TensorList grads_, double lam) {
  check_inputs(params_, anchors_, fisher_);
  check_same_layout("grads", grads_, params_);
  const auto params = contiguous(params_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  const auto grads = contiguous(grads_);  // a non-contiguous gradient is updated through a copy, written back below
  auto penalty = with_accumulate_type(params, [&](auto zero) {
    using acc_t = decltype(zero);
    const acc_t l = static_cast<acc_t>(lam);
    return run<acc_t, Pass::kAccumulate>(params, anchors, fisher, grads, acc_t(2) * l, l);
  });
  copy_back(grads_, grads);
  return penalty;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) {
  m.impl("ewc_penalty", &ewc_penalty);
  m.impl("ewc_penalty_backward", &ewc_penalty_backward);
  m.impl("ewc_penalty_accumulate", &ewc_penalty_accumulate);
}

}  // namespace fastforget::cpu
