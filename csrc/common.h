// Host-side helpers shared by the CPU and CUDA bindings (never by kernel bodies).
// The Python layer validates arguments with full messages before any op runs; these checks only keep a
// direct torch.ops call from reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastforget {

// Each tensors[i] must have the shape and device of params[i].
inline void check_same_layout(const char* name, at::TensorList tensors, at::TensorList params) {
  TORCH_CHECK(tensors.size() == params.size(), name, " has ", tensors.size(), " tensors but params has ",
              params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(tensors[i].sizes() == params[i].sizes(), name, "[", i, "] has shape ", tensors[i].sizes(),
                " but params[", i, "] has shape ", params[i].sizes());
    TORCH_CHECK(tensors[i].device() == params[i].device(), name, "[", i, "] is on ", tensors[i].device(),
                " but params[", i, "] is on ", params[i].device());
  }
}

// grads[i] is shaped like fisher[i] or stacks k of them: (k, *fisher[i].shape); same device.
inline void check_stacks(at::TensorList fisher, at::TensorList grads) {
  TORCH_CHECK(grads.size() == fisher.size(), "grads has ", grads.size(), " tensors but fisher has ", fisher.size());
  for (size_t i = 0; i < fisher.size(); ++i) {
    const auto f = fisher[i].sizes(), g = grads[i].sizes();
    const bool stacked = g.size() == f.size() + 1 && g.slice(1) == f;
    TORCH_CHECK(g == f || stacked, "grads[", i, "] has shape ", g, "; expected ", f, " or (k, ", f, ")");
    TORCH_CHECK(grads[i].device() == fisher[i].device(), "grads[", i, "] is on ", grads[i].device(),
                " but fisher[", i, "] is on ", fisher[i].device());
  }
}

// weight_merge's lists: models (and fisher, unless empty) hold K = weights.size() lists of out.size() tensors,
// model-major, each shaped like its out[i] and on its device; floors has K entries when fisher is given.
inline void check_merge_lists(at::TensorList out, at::TensorList models, at::TensorList fisher, size_t num_weights,
                              size_t num_floors) {
  TORCH_CHECK(num_weights > 0, "fastforget: weight_merge needs at least one model");
  TORCH_CHECK(models.size() == num_weights * out.size(), "fastforget: models has ", models.size(),
              " tensors; expected ", num_weights, " x ", out.size());
  TORCH_CHECK(fisher.empty() || fisher.size() == models.size(), "fastforget: fisher has ", fisher.size(),
              " tensors; expected 0 or ", models.size());
  TORCH_CHECK(fisher.empty() ? num_floors == 0 : num_floors == num_weights, "fastforget: floors has ", num_floors,
              " entries; expected ", fisher.empty() ? 0 : num_weights);
  for (size_t j = 0; j < models.size(); ++j) {
    const at::Tensor& target = out[j % out.size()];
    for (const at::Tensor* t : {&models[j], fisher.empty() ? &models[j] : &fisher[j]}) {
      TORCH_CHECK(t->sizes() == target.sizes() && t->device() == target.device(), "fastforget: source ", j,
                  " of weight_merge has shape ", t->sizes(), " on ", t->device(), "; expected ", target.sizes(),
                  " on ", target.device());
    }
  }
}

// A per-list tensor argument (one scalar, or one value per tensor of the list) has exactly `expected` elements: the
// kernels index it by tensor, so a short one would be read out of bounds.
inline void check_numel(const char* name, const at::Tensor& t, size_t expected) {
  TORCH_CHECK(t.numel() == static_cast<int64_t>(expected), "fastforget: ", name, " has ", t.numel(),
              " elements; expected ", expected);
}

// Lists holding fp64 tensors are computed in fp64 (so gradcheck is meaningful); everything else in fp32.
inline at::ScalarType accumulate_type(at::TensorList tensors) {
  for (const auto& p : tensors) {
    if (p.scalar_type() == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

inline std::vector<at::Tensor> contiguous(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

// After an op updated contiguous copies (`work`, from contiguous()) of `tensors`: write back the ones that were
// copies (a contiguous tensor is its own contiguous() and was updated in place).
inline void copy_back(at::TensorList tensors, const std::vector<at::Tensor>& work) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (!work[i].is_same(tensors[i])) tensors[i].copy_(work[i]);
  }
}

}  // namespace fastforget
