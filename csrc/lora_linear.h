// LoRA linear with ATen GEMMs, shared by the CPU and CUDA backends: each at::addmm / at::mm runs on the tensors'
// device (MKL or oneDNN on the CPU, cuBLAS on CUDA) and accumulates in fp32 for 16-bit inputs. The rank-r term is
// added to the output in place (addmm_), so there is no M x out temporary besides the output. Schemas:
// fastforget/_schemas.py; the math and what is saved: fastforget/ops/lora_linear.py.
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

// The Python layer validates arguments with full messages; these checks keep a direct torch.ops call from being
// broadcast silently (bias, keep) where at::mm itself would not complain.
inline void check_shapes(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& keep) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "fastforget::lora_linear: x and weight must be 2-D");
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef{weight.size(0)},
              "fastforget::lora_linear: bias must have shape (", weight.size(0), ")");
  TORCH_CHECK(!keep.has_value() || keep->sizes() == x.sizes(), "fastforget::lora_linear: keep must be shaped like x ",
              x.sizes());
}

// alpha * a @ b, rounded once (beta = 0: the uninitialised output is not read)
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  return at::addmm_out(out, out, a, b, /*beta=*/0, alpha);
}

// x * keep (the dropout without its rescaling, which the scale carries), or x itself
inline at::Tensor kept(const at::Tensor& x, const OptionalTensor& keep) { return keep ? at::mul(x, *keep) : x; }

// y = x W^T + bias + S B^T and S = scale (x * keep) A^T
inline std::tuple<at::Tensor, at::Tensor> lora_linear(const at::Tensor& x, const at::Tensor& weight,
                                                      const OptionalTensor& bias, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, const OptionalTensor& keep,
                                                      double scale) {
  check_shapes(x, weight, bias, keep);
  at::Tensor S = scaled_mm(kept(x, keep), lora_A.t(), scale);
  at::Tensor y = bias ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(S, lora_B.t());
  return {y, S};
}

// (dx, dweight, dbias, dlora_A, dlora_B), each only where output_mask asks for it
inline std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor> lora_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const OptionalTensor& keep, const at::Tensor& S, double scale,
    std::array<bool, 5> output_mask) {
  check_shapes(x, weight, std::nullopt, keep);
  const auto [need_x, need_weight, need_bias, need_A, need_B] = output_mask;
  OptionalTensor dx, dweight, dbias, dA, dB;
  if (need_x || need_A) {
    const at::Tensor dS = scaled_mm(grad_y, lora_B, scale);  // scale dY B, (M, r)
    if (need_x) {
      dx = at::mm(grad_y, weight);
      if (keep) {
        dx->add_(at::mm(dS, lora_A).mul_(*keep));  // the mask needs the (M, in) product on its own
      } else {
        dx->addmm_(dS, lora_A);
      }
    }
    if (need_A) dA = at::mm(dS.t(), kept(x, keep));
  }
  if (need_weight) dweight = at::mm(grad_y.t(), x);
  if (need_bias) dbias = grad_y.sum(0);
  if (need_B) dB = at::mm(grad_y.t(), S);
  return {dx, dweight, dbias, dA, dB};
}

}  // namespace fastforget::lora
