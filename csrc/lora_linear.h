// LoRA linear, shared by the CPU and CUDA backends: the big products are at::addmm / at::mm on the tensors' device
// (MKL or oneDNN on the CPU, cuBLAS on CUDA), accumulating in fp32 for 16-bit inputs; the thin rank-r ones come
// from a Products policy (ATen's here; the CPU backend's own kernels for fp32/fp64). The output is first filled
// with the rank-r term and the bias, then the base GEMM accumulates into it in place (beta = 1): no M x out
// temporary besides the output.
//
// Schemas: fastforget/_schemas.py; the math and what is saved: fastforget/ops/lora_linear.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastforget::lora {

using OptionalTensor = std::optional<at::Tensor>;
using Gradients = std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor>;

// The Python layer validates arguments with full messages; these checks keep a direct torch.ops call from reading
// out of bounds or being broadcast silently (bias, keep), which the GEMMs themselves would not catch.
inline void check_shapes(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                         const at::Tensor& lora_A, const at::Tensor& lora_B, const OptionalTensor& keep) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "fastforget::lora_linear: x, weight, lora_A and lora_B must be 2-D");
  TORCH_CHECK(x.size(1) == weight.size(1) && lora_A.size(1) == weight.size(1) &&
                  lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0),
              "fastforget::lora_linear: shapes x ", x.sizes(), ", weight ", weight.sizes(), ", lora_A ",
              lora_A.sizes(), ", lora_B ", lora_B.sizes(), " do not fit together");
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef{weight.size(0)},
              "fastforget::lora_linear: bias must have shape (", weight.size(0), ")");
  TORCH_CHECK(!keep.has_value() || (keep->sizes() == x.sizes() && keep->scalar_type() == at::kBool),
              "fastforget::lora_linear: keep must be a bool tensor shaped like x ", x.sizes());
}

// x * keep, or x itself
inline at::Tensor kept(const at::Tensor& x, const OptionalTensor& keep) { return keep ? at::mul(x, *keep) : x; }

// LoRA's thin (rank-r) products on ATen GEMMs:
//   project(X, F, keep, alpha) = alpha (X * keep) F^T           (M, r)   X (M, K), F (r, K)
//   expand(P, F, bias, keep)   = bias + P F, or (P F) * keep    (M, N)   P (M, r), F (r, N); never both
//   reduce(P, X, keep)         = P^T (X * keep)                 (r, K)   P (M, r), X (M, K)
//   reduce_t(X, P)             = X^T P                          (K, r)
// The CPU backend substitutes its own kernels (csrc/cpu/lora_linear.cpp), which beat a BLAS on these shapes.
struct AtenProducts {
  static at::Tensor project(const at::Tensor& X, const at::Tensor& F, const OptionalTensor& keep, double alpha) {
    at::Tensor out = at::empty({X.size(0), F.size(0)}, X.options());
    return at::addmm_out(out, out, kept(X, keep), F.t(), /*beta=*/0, alpha);  // beta = 0: out is not read
  }

  static at::Tensor expand(const at::Tensor& P, const at::Tensor& F, const OptionalTensor& bias,
                           const OptionalTensor& keep) {
    if (bias) return at::addmm(*bias, P, F);
    at::Tensor product = at::mm(P, F);
    return keep ? product.mul_(*keep) : product;
  }

  static at::Tensor reduce(const at::Tensor& P, const at::Tensor& X, const OptionalTensor& keep) {
    return at::mm(P.t(), kept(X, keep));
  }

  static at::Tensor reduce_t(const at::Tensor& X, const at::Tensor& P) { return at::mm(X.t(), P); }
};

// y = x W^T + bias + S B^T and S = scale (x * keep) A^T
template <typename Products = AtenProducts>
std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                               const OptionalTensor& bias, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, const OptionalTensor& keep, double scale) {
  check_shapes(x, weight, bias, lora_A, lora_B, keep);
  at::Tensor S = Products::project(x, lora_A, keep, scale);
  at::Tensor y = Products::expand(S, lora_B.t(), bias, std::nullopt);
  y.addmm_(x, weight.t());
  return {y, S};
}

// (dx, dweight, dbias, dlora_A, dlora_B), each only where output_mask asks for it
template <typename Products = AtenProducts>
Gradients lora_linear_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& lora_A, const at::Tensor& lora_B, const OptionalTensor& keep,
                               const at::Tensor& S, double scale, std::array<bool, 5> output_mask) {
  check_shapes(x, weight, std::nullopt, lora_A, lora_B, keep);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == x.size(0) && grad_y.size(1) == weight.size(0) &&
                  S.dim() == 2 && S.size(0) == x.size(0) && S.size(1) == lora_A.size(0),
              "fastforget::lora_linear_backward: grad_y ", grad_y.sizes(), " or S ", S.sizes(), " does not fit");
  const auto [need_x, need_weight, need_bias, need_A, need_B] = output_mask;
  OptionalTensor dx, dweight, dbias, dA, dB;
  if (need_x || need_A) {
    const at::Tensor dS = Products::project(grad_y, lora_B.t(), std::nullopt, scale);  // scale dY B, once
    if (need_x) dx = Products::expand(dS, lora_A, std::nullopt, keep).addmm_(grad_y, weight);
    if (need_A) dA = Products::reduce(dS, x, keep);
  }
  if (need_weight) dweight = at::mm(grad_y.t(), x);
  if (need_bias) dbias = grad_y.sum(0);
  if (need_B) dB = Products::reduce_t(grad_y, S);  // dY^T S
  return {dx, dweight, dbias, dA, dB};
}

}  // namespace fastforget::lora
