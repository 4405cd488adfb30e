// What a CUDA launch may be given, checked on the host before anything is written: the lists' lengths, every
// tensor's shape against its partner's, the dtypes each role allows (the state's: the accumulation dtype), a data
// pointer for every non-empty tensor, aligned to its element size, and the element counts of the per-tensor and
// scalar arguments -- what memory safety needs (the Python layer checks the rest, with full messages).
//
// Torch-free: shared by the real bindings (csrc/cuda/*.cu pass what they read off their at::Tensors, through
// binding.h's HostLists, and TORCH_CHECK the answer) and the emulated launchers (csrc/emu/emu_launchers.cpp, given
// the same arrays by ctypes, return cudaErrorInvalidValue with the answer as ff_emu_last_message()), so that both
// refuse the same metadata with the same message. Each check returns that message, or "" when all is well.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "cuda/multi_tensor.cuh"
#include "cuda/protected_adamw_step.cuh"

namespace fastforget::checks {

// The dtype code of a tensor no kernel reads (an integer or complex tensor given to a binding).
constexpr int64_t kUnsupported = -1;

// A launch's tensor lists as plain arrays. Tensor k, counting list after list (list 0's length[0] tensors, then
// list 1's, ...), has dim[k] dimensions, its sizes next in `sizes` (the shapes concatenated), data pointer ptr[k]
// (as an integer) and gpu::DtypeCode dtype[k] (or kUnsupported).
struct LaunchLists {
  int64_t num_lists;
  const int64_t* length;
  const int64_t* dim;
  const int64_t* sizes;
  const int64_t* ptr;
  const int64_t* dtype;
};

// The accumulation dtype of a launch: gpu::kFloat64 or gpu::kFloat32.
using AccCode = int64_t;

namespace detail {

inline const char* dtype_name(int64_t code) {
  switch (code) {
    case gpu::kFloat32: return "Float";
    case gpu::kBFloat16: return "BFloat16";
    case gpu::kFloat16: return "Half";
    case gpu::kFloat64: return "Double";
    default: return nullptr;
  }
}

inline int64_t element_bytes(int64_t code) {
  return code == gpu::kFloat64 ? 8 : code == gpu::kFloat32 ? 4 : 2;
}

// The message: parts (strings and integers) concatenated (no <sstream>: this header is compiled into every test
// build of the emulator).
inline void append(std::string& out, const std::string& part) { out += part; }
inline void append(std::string& out, const char* part) { out += part; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
void append(std::string& out, T part) {
  out += std::to_string(part);
}

template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::string out;
  (append(out, parts), ...);
  return out;
}

struct Tensor {
  const int64_t* sizes;
  int64_t dim;
  int64_t ptr;
  int64_t dtype;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d = 0; d < dim; ++d) n *= sizes[d];
    return n;
  }
  bool same_shape(const Tensor& other) const {
    if (dim != other.dim) return false;
    for (int64_t d = 0; d < dim; ++d) {
      if (sizes[d] != other.sizes[d]) return false;
    }
    return true;
  }
  // As torch prints an IntArrayRef: [2, 3]; [] for a 0-dim tensor.
  std::string shape() const {
    std::string out = "[";
    for (int64_t d = 0; d < dim; ++d) out += cat(d ? ", " : "", sizes[d]);
    return out + "]";
  }
};

// LaunchLists, indexed, with its lists' names (as the op's schema names them).
class Lists {
 public:
  Lists(const LaunchLists& raw, std::vector<const char*> names) : raw_(raw), names_(std::move(names)) {}

  // The structural message ("" when well-formed): the number of lists, non-negative lengths, dims and sizes.
  // Everything below reads the arrays only after this passed.
  std::string index() {
    if (raw_.num_lists != static_cast<int64_t>(names_.size())) {
      return cat("fastforget: the launch takes ", names_.size(), " tensor lists, got ", raw_.num_lists);
    }
    int64_t k = 0, s = 0;
    for (size_t r = 0; r < names_.size(); ++r) {
      if (raw_.length[r] < 0) return cat("fastforget: ", names_[r], " has a negative length");
      first_.push_back(k);
      for (int64_t i = 0; i < raw_.length[r]; ++i, ++k) {
        if (raw_.dim[k] < 0) return cat("fastforget: ", names_[r], "[", i, "] has a negative dim");
        offset_.push_back(s);
        for (int64_t d = 0; d < raw_.dim[k]; ++d, ++s) {
          if (raw_.sizes[s] < 0) return cat("fastforget: ", names_[r], "[", i, "] has a negative size");
        }
      }
    }
    return "";
  }

  int64_t size(int r) const { return raw_.length[r]; }
  const char* name(int r) const { return names_[r]; }
  Tensor at(int r, int64_t i) const {
    const int64_t k = first_[r] + i;
    return {raw_.sizes + offset_[k], raw_.dim[k], raw_.ptr[k], raw_.dtype[k]};
  }

  // Arrays for gpu::pack_meta_words (role r of tensor i at [r * n + i], n = size(0); a list not given, or
  // empty, is pointer 0), for the lists' first `roles` lists. Call after the checks passed.
  struct Packed {
    std::vector<int64_t> numel, ptr, dtype;
  };
  Packed pack_arrays(int roles) const {
    const int64_t n = size(0);
    Packed p{std::vector<int64_t>(n), std::vector<int64_t>(roles * n, 0),
             std::vector<int64_t>(roles * n, gpu::kFloat32)};
    for (int64_t i = 0; i < n; ++i) p.numel[i] = at(0, i).numel();
    for (int r = 0; r < roles; ++r) {
      if (size(r) != n) continue;  // a list not given
      for (int64_t i = 0; i < n; ++i) {
        p.ptr[r * n + i] = at(r, i).ptr;
        p.dtype[r * n + i] = at(r, i).dtype;
      }
    }
    return p;
  }

  // list r holds as many tensors as list `like`, each shaped like its partner (common.h's check_same_layout).
  std::string same_layout(int r, int like) const {
    if (size(r) != size(like)) {
      return cat(name(r), " has ", size(r), " tensors but ", name(like), " has ", size(like));
    }
    for (int64_t i = 0; i < size(r); ++i) {
      if (!at(r, i).same_shape(at(like, i))) {
        return cat(name(r), "[", i, "] has shape ", at(r, i).shape(), " but ", name(like), "[", i, "] has shape ",
                   at(like, i).shape());
      }
    }
    return "";
  }

  // Every tensor of list r is read or written through its pointer: of a dtype the kernels read (any of the
  // four, or only `only` when given), with a data pointer when not empty, aligned to its element size.
  std::string readable(int r, int64_t only = kUnsupported) const {
    for (int64_t i = 0; i < size(r); ++i) {
      const Tensor t = at(r, i);
      const char* dtype = dtype_name(t.dtype);
      if (dtype == nullptr) {
        return cat("fastforget: ", name(r), "[", i, "] has an unsupported dtype (code ", t.dtype,
                   "); expected Float, BFloat16, Half or Double");
      }
      if (only != kUnsupported && t.dtype != only) {
        return cat("fastforget: ", name(r), "[", i, "] is ", dtype, "; expected ", dtype_name(only),
                   ", the accumulation dtype");
      }
      if (t.numel() > 0 && t.ptr == 0) {
        return cat("fastforget: ", name(r), "[", i, "] has ", t.numel(), " elements but no data pointer");
      }
      if (t.ptr % element_bytes(t.dtype) != 0) {
        return cat("fastforget: ", name(r), "[", i, "] is not aligned to its ", element_bytes(t.dtype),
                   "-byte elements");
      }
    }
    return "";
  }

  // The accumulation dtype the bindings' accumulate_type gives list r: Double when it holds one, else Float.
  AccCode accumulate_code(int r) const {
    for (int64_t i = 0; i < size(r); ++i) {
      if (at(r, i).dtype == gpu::kFloat64) return gpu::kFloat64;
    }
    return gpu::kFloat32;
  }

  // acc is the accumulation dtype of list r (the bindings derive it so; an emulated caller passes it).
  std::string acc_of(AccCode acc, int r) const {
    if (acc == accumulate_code(r)) return "";
    return cat("fastforget: the accumulation dtype is ", dtype_name(acc) ? dtype_name(acc) : "unknown", " but ",
               name(r), " asks for ", dtype_name(accumulate_code(r)));
  }

 private:
  LaunchLists raw_;
  std::vector<const char*> names_;
  std::vector<int64_t> first_, offset_;
};

// A per-list tensor argument has `expected` elements (common.h's check_numel) and, when it has any, a pointer.
inline std::string numel(const char* name, int64_t count, const void* ptr, int64_t expected) {
  if (count != expected) return cat("fastforget: ", name, " has ", count, " elements; expected ", expected);
  if (count > 0 && ptr == nullptr) return cat("fastforget: ", name, " has ", count, " elements but no data pointer");
  return "";
}

// The first non-empty message of a sequence of checks, evaluated in order until one fails.
template <typename... Checks>
std::string first_failure(Checks... checks) {
  std::string message;
  ((message.empty() ? (message = checks(), 0) : 0), ...);
  return message;
}

}  // namespace detail

using detail::Lists;

// The arrays of gpu::pack_meta_words (role r of tensor i at [r * n + i], n = length[0]; a list not given is pointer
// 0) for the first `roles` lists of a launch whose check passed.
inline Lists::Packed pack_arrays(const LaunchLists& raw, int roles) {
  Lists lists(raw, std::vector<const char*>(raw.num_lists, ""));
  lists.index();
  return lists.pack_arrays(roles);
}

// ------------------------------------------------------------------------------------------- one check per launch
//
// Each takes the launch's lists, in its schema's order, and the arguments a kernel indexes, and returns the first
// violation's message ("" when there is none). acc: the launch's accumulation dtype (gpu::kFloat32 or kFloat64).

// ewc_penalty (with_grads false: grads empty), ewc_penalty_accumulate and ewc_penalty_backward (with_grads true):
// params, anchors, fisher, grads. grad_out_count: grad_out's elements for the backward, else -1.
inline std::string ewc_penalty(const LaunchLists& raw, bool with_grads, AccCode acc, int64_t grad_out_count = -1,
                               const void* grad_out = nullptr) {
  enum { kParams, kAnchors, kFisher, kGrads };
  Lists lists(raw, {"params", "anchors", "fisher", "grads"});
  return detail::first_failure(
      [&] { return lists.index(); }, [&] { return lists.same_layout(kAnchors, kParams); },
      [&] { return lists.same_layout(kFisher, kParams); },
      [&] {
        if (with_grads) return lists.same_layout(kGrads, kParams);
        return lists.size(kGrads) == 0 ? std::string() : "fastforget: the penalty alone takes no grads";
      },
      [&] { return lists.readable(kParams); }, [&] { return lists.readable(kAnchors); },
      [&] { return lists.readable(kFisher); }, [&] { return lists.readable(kGrads); },
      [&] { return lists.acc_of(acc, kParams); },
      [&] { return grad_out_count < 0 ? "" : detail::numel("grad_out", grad_out_count, grad_out, 1); });
}

// fisher_update: fisher, grads. grads[i] is shaped like fisher[i] or stacks k of them, (k, *fisher[i].shape)
// (common.h's check_stacks); on success samples[i] is that k (1 unstacked).
inline std::string fisher_update(const LaunchLists& raw, AccCode acc, std::vector<int64_t>* samples) {
  enum { kFisher, kGrads };
  Lists lists(raw, {"fisher", "grads"});
  const auto stacks = [&]() -> std::string {
    if (lists.size(kGrads) != lists.size(kFisher)) {
      return detail::cat("grads has ", lists.size(kGrads), " tensors but fisher has ", lists.size(kFisher));
    }
    samples->assign(lists.size(kFisher), 1);
    for (int64_t i = 0; i < lists.size(kFisher); ++i) {
      const detail::Tensor f = lists.at(kFisher, i), g = lists.at(kGrads, i);
      const detail::Tensor inner{g.sizes + 1, g.dim - 1, g.ptr, g.dtype};
      if (g.same_shape(f)) continue;
      if (g.dim != f.dim + 1 || !inner.same_shape(f)) {
        return detail::cat("grads[", i, "] has shape ", g.shape(), "; expected ", f.shape(), " or (k, ", f.shape(),
                           ")");
      }
      (*samples)[i] = g.sizes[0];
    }
    return "";
  };
  return detail::first_failure([&] { return lists.index(); }, stacks, [&] { return lists.readable(kFisher); },
                               [&] { return lists.readable(kGrads); }, [&] { return lists.acc_of(acc, kFisher); });
}

// scale_grads: grads; factors has one element per gradient.
inline std::string scale_grads(const LaunchLists& raw, AccCode acc, int64_t factors_count, const void* factors) {
  Lists lists(raw, {"grads"});
  return detail::first_failure(
      [&] { return lists.index(); }, [&] { return detail::numel("factors", factors_count, factors, lists.size(0)); },
      [&] { return lists.readable(0); }, [&] { return lists.acc_of(acc, 0); });
}

// grad_moments: grads; inv_scale has one element.
inline std::string grad_moments(const LaunchLists& raw, AccCode acc, int64_t inv_scale_count, const void* inv_scale) {
  Lists lists(raw, {"grads"});
  return detail::first_failure(
      [&] { return lists.index(); }, [&] { return detail::numel("inv_scale", inv_scale_count, inv_scale, 1); },
      [&] { return lists.readable(0); }, [&] { return lists.acc_of(acc, 0); });
}

// The per-list arguments of grad_ema_stats (var_scale and skip: count -1, not given) and grad_ema_protect.
struct GradEmaArgs {
  int64_t inv_scale_count;
  const void* inv_scale;
  int64_t alpha_count;
  const void* alpha;
  int64_t var_scale_count = -1;
  const void* var_scale = nullptr;
  int64_t skip_count = -1;
  const void* skip = nullptr;
};

// grad_ema_stats / grad_ema_protect: grads, mean, var. mean and var are the state, read and written as acc_t:
// shaped like the grads and of the accumulation dtype.
inline std::string grad_ema(const LaunchLists& raw, AccCode acc, const GradEmaArgs& a) {
  enum { kGrads, kMean, kVar };
  Lists lists(raw, {"grads", "mean", "var"});
  const auto n = [&] { return lists.size(kGrads); };
  return detail::first_failure(
      [&] { return lists.index(); },
      [&] { return a.skip_count < 0 ? "" : detail::numel("skip", a.skip_count, a.skip, 1); },
      [&] { return a.var_scale_count < 0 ? "" : detail::numel("var_scale", a.var_scale_count, a.var_scale, n()); },
      [&] { return detail::numel("inv_scale", a.inv_scale_count, a.inv_scale, 1); },
      [&] { return detail::numel("alpha", a.alpha_count, a.alpha, n()); },
      [&] { return lists.same_layout(kMean, kGrads); }, [&] { return lists.same_layout(kVar, kGrads); },
      [&] { return lists.readable(kGrads); }, [&] { return lists.readable(kMean, acc); },
      [&] { return lists.readable(kVar, acc); });
}

// protected_adamw_step: params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega. The
// optional lists are given exactly when their mode is on (ewc: anchors and fisher; protect == kProtectElement:
// ema_mean and ema_var; si: omega); the moments and the other state lists are of the accumulation dtype.
inline std::string protected_adamw_step(const LaunchLists& raw, AccCode acc, bool ewc, int protect, bool si) {
  enum { kParams, kGrads, kExpAvg, kExpAvgSq, kAnchors, kFisher, kEmaMean, kEmaVar, kOmega, kLists };
  Lists lists(raw, {"params", "grads", "exp_avg", "exp_avg_sq", "anchors", "fisher", "ema_mean", "ema_var", "omega"});
  const std::string structure = lists.index();
  if (!structure.empty()) return structure;
  if (protect < gpu::kProtectNone || protect > gpu::kProtectElement) {
    return detail::cat("fastforget: protect is ", protect, "; expected ", int(gpu::kProtectNone), " (none), ",
                       int(gpu::kProtectTensor), " (per tensor) or ", int(gpu::kProtectElement), " (per element)");
  }
  const bool element = protect == gpu::kProtectElement;
  const bool given[kLists] = {true, true, true, true, ewc, ewc, element, element, si};
  const bool state[kLists] = {false, false, true, true, false, false, true, true, true};
  for (int r = kGrads; r < kLists; ++r) {
    std::string m = lists.size(r) == 0 ? "" : detail::cat("fastforget: ", lists.name(r), " given, but its mode is off");
    if (given[r]) m = lists.same_layout(r, kParams);
    if (!m.empty()) return m;
  }
  for (int r = kParams; r < kLists; ++r) {
    const std::string m = lists.readable(r, state[r] ? acc : kUnsupported);
    if (!m.empty()) return m;
  }
  return lists.acc_of(acc, kParams);
}

// weight_merge: out (one list) and its sources (models, fisher): models (and fisher, unless empty) hold
// num_weights lists of out's length, model-major, each tensor shaped like its out tensor; floors has num_weights
// entries when fisher is given (common.h's check_merge_lists).
inline std::string weight_merge(const LaunchLists& out_raw, const LaunchLists& sources_raw, int64_t num_weights,
                                int64_t num_floors, AccCode acc) {
  enum { kModels, kFisher };
  Lists out(out_raw, {"out"}), sources(sources_raw, {"models", "fisher"});
  const auto lists = [&]() -> std::string {
    const int64_t n = out.size(0), count = sources.size(kModels);
    const bool fisher = sources.size(kFisher) != 0;
    if (num_weights <= 0) return "fastforget: weight_merge needs at least one model";
    if (count != num_weights * n) {
      return detail::cat("fastforget: models has ", count, " tensors; expected ", num_weights, " x ", n);
    }
    if (fisher && sources.size(kFisher) != count) {
      return detail::cat("fastforget: fisher has ", sources.size(kFisher), " tensors; expected 0 or ", count);
    }
    if (num_floors != (fisher ? num_weights : 0)) {
      return detail::cat("fastforget: floors has ", num_floors, " entries; expected ", fisher ? num_weights : 0);
    }
    for (int64_t j = 0; j < count; ++j) {
      const detail::Tensor target = out.at(0, j % n);
      for (int r = kModels; r <= (fisher ? kFisher : kModels); ++r) {
        if (!sources.at(r, j).same_shape(target)) {
          return detail::cat("fastforget: source ", j, " of weight_merge has shape ", sources.at(r, j).shape(),
                             "; expected ", target.shape());
        }
      }
    }
    return "";
  };
  return detail::first_failure([&] { return out.index(); }, [&] { return sources.index(); }, lists,
                               [&] { return out.readable(0); }, [&] { return sources.readable(kModels); },
                               [&] { return sources.readable(kFisher); }, [&] { return out.acc_of(acc, 0); });
}

// anchored_lm_loss_rows: the pointers, sizes and dtype of its launch (the binding checks the tensors' shapes
// against rows and vocab first).
struct AnchoredRowsArgs {
  const void* logits;
  const void* ref;
  const void* labels;
  const void* scale;
  const void* loss;
  const void* grad;
  int64_t rows, vocab;
  int64_t dtype;  // the logits' (and ref's, grad's) gpu::DtypeCode
  double temperature;
  bool anchored;
};

inline std::string anchored_lm_loss_rows(const AnchoredRowsArgs& a) {
  if (a.rows < 0) return detail::cat("fastforget: logits has ", a.rows, " rows");
  if (a.vocab < 1) return "fastforget: logits has an empty vocabulary";
  if (!(a.temperature > 0 && std::isfinite(a.temperature))) return "fastforget: temperature must be finite and > 0";
  if (detail::dtype_name(a.dtype) == nullptr) {
    return detail::cat("fastforget: logits has an unsupported dtype (code ", a.dtype,
                       "); expected Float, BFloat16, Half or Double");
  }
  if (a.rows == 0) return "";
  const std::pair<const char*, const void*> needed[] = {
      {"logits", a.logits}, {"ref_logits", a.anchored ? a.ref : a.logits}, {"labels", a.labels},
      {"scale", a.scale},   {"loss", a.loss},                              {"grad", a.grad}};
  for (const auto& [name, ptr] : needed) {
    if (ptr == nullptr) return detail::cat("fastforget: ", name, " has no data pointer");
  }
  const int64_t bytes = detail::element_bytes(a.dtype);
  for (const void* p : {a.logits, a.grad, a.anchored ? a.ref : a.logits}) {
    if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
      return detail::cat("fastforget: the logits are not aligned to their ", bytes, "-byte elements");
    }
  }
  return "";
}

}  // namespace fastforget::checks
