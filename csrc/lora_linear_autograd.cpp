// Autograd of fastforget::lora_linear (the native flavour, every device): a C++ autograd Function registered on
// the op's Autograd key, so that an eager forward + backward of a LoRA layer costs no Python beyond
// ff.lora_linear's argument checks -- torch.library's Python autograd wrapper cost ~80 us per call, more than the
// kernels of a small layer. The math is fastforget/ops/lora_linear.py's; the forward runs the op below autograd
// and the backward calls lora_linear_backward, so torch.compile traces both ops and their fake impls as before.
// The Triton flavour registers the same autograd in Python (fastforget/ops/lora_linear.py). There is no double
// backward: both flavours' lora_linear_backward get torch's not-implemented Autograd kernel here, which raises when
// a gradient is taken through it -- without one torch only warns and treats the first-order gradients as
// constants, and a Python registration would make torch.func refuse even the first derivative.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "lora_linear.h"  // OptionalTensor, Gradients

namespace fastforget::lora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> forward_op(const at::Tensor& x, const at::Tensor& weight,
                                              const OptionalTensor& bias, const at::Tensor& lora_A,
                                              const at::Tensor& lora_B, const OptionalTensor& keep, double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastforget::lora_linear", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                                 const at::Tensor&, const OptionalTensor&, double)>();
  return op.call(x, weight, bias, lora_A, lora_B, keep, scale);
}

Gradients backward_op(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, const OptionalTensor& keep,
                      const at::Tensor& S, double scale, std::array<bool, 5> output_mask) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastforget::lora_linear_backward", "")
                             .typed<Gradients(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                              const at::Tensor&, double, std::array<bool, 5>)>();
  return op.call(grad_y, x, weight, lora_A, lora_B, keep, S, scale, output_mask);
}

OptionalTensor present(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

class LoRALinearFunction : public torch::autograd::Function<LoRALinearFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptionalTensor& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
                               const OptionalTensor& keep, double scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, S] = forward_op(x, weight, bias, lora_A, lora_B, keep, scale);
    ctx->mark_non_differentiable({S});  // an activation saved for backward, not a result
    ctx->save_for_backward({x, weight, lora_A, lora_B, keep.value_or(at::Tensor()), S});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();  // an undefined one is no graph input
    return {y, S};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    // needs_input_grad counts the tensor inputs only: x, weight, bias (when given), lora_A, lora_B, keep
    const size_t bias_edges = ctx->saved_data["has_bias"].toBool() ? 1 : 0;
    const std::array<bool, 5> output_mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                             bias_edges == 1 && ctx->needs_input_grad(2),
                                             ctx->needs_input_grad(2 + bias_edges),
                                             ctx->needs_input_grad(3 + bias_edges)};
    auto [dx, dweight, dbias, dA, dB] = backward_op(grads[0], saved[0], saved[1], saved[2], saved[3],
                                                    present(saved[4]), saved[5],
                                                    ctx->saved_data["scale"].toDouble(), output_mask);
    const at::Tensor none;
    return {dx.value_or(none), dweight.value_or(none), dbias.value_or(none), dA.value_or(none),
            dB.value_or(none),     none /* keep */,     none /* scale */};
  }
};

std::tuple<at::Tensor, at::Tensor> lora_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                        const OptionalTensor& bias, const at::Tensor& lora_A,
                                                        const at::Tensor& lora_B, const OptionalTensor& keep,
                                                        double scale) {
  const variable_list out = LoRALinearFunction::apply(x, weight, bias, lora_A, lora_B, keep, scale);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace fastforget::lora

TORCH_LIBRARY_IMPL(fastforget, Autograd, m) {
  m.impl("lora_linear", &fastforget::lora::lora_linear_autograd);
  m.impl("lora_linear_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_linear_backward_triton", torch::autograd::autogradNotImplementedFallback());
}
