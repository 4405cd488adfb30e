// The protected AdamW step on the CPU with acc_t moments (math: fastforget/ops/protected_adamw_step.py), one
// parallel region over the whole parameter list: the tile loop of adamw_tiles.h with the moments in place.
#include "adamw_tiles.h"

#include "../common.h"

#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <optional>

namespace fastforget::cpu {
namespace {

at::Tensor protected_adamw_step(at::TensorList params_, at::TensorList grads_, at::TensorList exp_avg,
                                at::TensorList exp_avg_sq, at::TensorList steps, at::TensorList anchors_,
                                at::TensorList fisher_, const std::optional<at::Tensor>& factors,
                                at::TensorList ema_mean, at::TensorList ema_var, const std::optional<at::Tensor>& alpha,
                                const std::optional<at::Tensor>& var_scale, at::TensorList omega,
                                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                                double lr, double beta1, double beta2, double eps, double weight_decay, double lam,
                                double threshold, bool maximize) {
  const auto acc = accumulate_type(params_);
  const AdamwLists given{params_, grads_, exp_avg, exp_avg_sq, anchors_, fisher_, ema_mean, ema_var, omega};
  check_protected_adamw_inputs(given, steps, factors, alpha, var_scale, acc);
  const auto zero = at::scalar_tensor(0, at::TensorOptions().dtype(acc));
  if (params_.empty() || skipped(found_inf)) return zero;  // a skipped step: no write
  const auto params = contiguous(params_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  const AdamwLists l{params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega};
  at::Tensor penalty;
  AT_DISPATCH_FLOATING_TYPES(acc, "protected_adamw_step", [&] {
    const auto args = step_args<scalar_t>(steps, factors, alpha, var_scale, grad_factor(maximize, grad_scale), lr,
                                          beta1, beta2, eps, weight_decay, lam, threshold);
    const FloatMoments<scalar_t> moments{exp_avg, exp_avg_sq, fisher};
    const scalar_t sum = run_step(l, args, protect_mode(factors, ema_mean), moments);
    penalty = at::scalar_tensor(static_cast<scalar_t>(lam) * sum, at::TensorOptions().dtype(acc));
  });
  copy_back(params_, params);
  for (const auto& s : steps) s.add_(1);
  return penalty;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("protected_adamw_step", &protected_adamw_step); }

}  // namespace fastforget::cpu
