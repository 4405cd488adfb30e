// Host-side argument checks of protected_adamw_step, shared by the CPU and CUDA bindings (never by kernel
// bodies): every list's length and shapes, the state's dtype and contiguity, the per-tensor tensors' sizes --
// what memory safety needs, checked before anything is written (the Python layer checks the rest, with full
// messages: fastforget/ops/protected_adamw_step.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>
#include <utility>

#include "common.h"

namespace fastforget {

struct AdamwLists {
  at::TensorList params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega;
};

inline void check_per_tensor(const char* name, const std::optional<at::Tensor>& t, size_t count) {
  TORCH_CHECK(!t || t->numel() == static_cast<int64_t>(count), "fastforget: ", name, " has ", t ? t->numel() : 0,
              " entries for ", count, " params");
}

// moments: the dtype exp_avg / exp_avg_sq must have (acc when absent; uint8 codes for the 8-bit step).
inline void check_protected_adamw_inputs(const AdamwLists& l, at::TensorList steps, const std::optional<at::Tensor>& factors,
                  const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& var_scale,
                  at::ScalarType acc, std::optional<at::ScalarType> moments = std::nullopt) {
  check_same_layout("grads", l.grads, l.params);
  check_same_layout("exp_avg", l.exp_avg, l.params);
  check_same_layout("exp_avg_sq", l.exp_avg_sq, l.params);
  TORCH_CHECK(steps.size() == l.params.size(), "fastforget: steps has ", steps.size(), " tensors for ",
              l.params.size(), " params");
  for (const auto& s : steps) TORCH_CHECK(s.numel() == 1, "fastforget: every steps[i] must have one element");
  const std::pair<const char*, at::TensorList> optional_lists[] = {
      {"anchors", l.anchors}, {"fisher", l.fisher}, {"ema_mean", l.ema_mean}, {"ema_var", l.ema_var},
      {"omega", l.omega}};
  for (const auto& [name, list] : optional_lists) {
    if (!list.empty()) check_same_layout(name, list, l.params);
  }
  TORCH_CHECK(l.anchors.empty() == l.fisher.empty(), "fastforget: anchors and fisher come together");
  TORCH_CHECK(l.ema_mean.empty() == l.ema_var.empty(), "fastforget: ema_mean and ema_var come together");
  const std::tuple<const char*, at::TensorList, at::ScalarType> state[] = {
      {"exp_avg", l.exp_avg, moments.value_or(acc)}, {"exp_avg_sq", l.exp_avg_sq, moments.value_or(acc)},
      {"ema_mean", l.ema_mean, acc}, {"ema_var", l.ema_var, acc}, {"omega", l.omega, acc}};
  for (const auto& [name, list, dtype] : state) {
    for (size_t t = 0; t < list.size(); ++t) {
      TORCH_CHECK(list[t].scalar_type() == dtype && list[t].is_contiguous(), "fastforget: ", name, "[", t,
                  "] must be a contiguous ", dtype, " tensor");
    }
  }
  check_per_tensor("factors", factors, l.params.size());
  check_per_tensor("alpha", alpha, l.params.size());
  check_per_tensor("var_scale", var_scale, l.params.size());
  TORCH_CHECK(l.ema_mean.empty() == !alpha.has_value() && l.ema_mean.empty() == !var_scale.has_value(),
              "fastforget: ema_mean/ema_var, alpha and var_scale come together");
  TORCH_CHECK(!(factors && !l.ema_mean.empty()), "fastforget: factors and ema_mean exclude each other");
}

}  // namespace fastforget
