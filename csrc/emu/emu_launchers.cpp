// Every CUDA launcher of csrc/cuda/*.cuh on CPU memory, through the emulator (cuda_emu.h), behind a C ABI that
// tests/test_cuda_emulator.py calls with ctypes on CPU tensors' data pointers. Built at test time (not part of the
// extension):  g++ -std=c++17 -O1 -shared -fPIC -I csrc/emu emu_launchers.cpp -o libffemu.so
//
// Each entry point takes what the real binding (csrc/cuda/*.cu) reads off its tensors: the lists as
// checks::LaunchLists (each tensor's shape, data pointer and dtype code) and the element counts of the per-tensor
// and scalar arguments. It runs the binding's checks (csrc/launch_checks.h), packs the metadata with the same
// gpu::pack_meta_words, allocates the same scratch and calls the same launcher. acc_fp64 selects acc_t = double.
// Returns the cudaError_t; ff_emu_last_message() says why a launch failed, or why it was refused
// (cudaErrorInvalidValue, nothing written: the message is the one the real binding raises).
#include "cuda_emu.h"  // first: defines the CUDA keywords the headers use

#include <cstdint>
#include <string>
#include <vector>

#include "../cuda/anchored_lm_loss.cuh"
#include "../cuda/ewc_penalty.cuh"
#include "../cuda/fisher_update.cuh"
#include "../cuda/grad_ema.cuh"
#include "../cuda/grad_moments.cuh"
#include "../cuda/mofo.cuh"
#include "../cuda/multi_tensor.cuh"
#include "../cuda/protected_adamw8bit_step.cuh"
#include "../cuda/protected_adamw_step.cuh"
#include "../cuda/scale_grads.cuh"
#include "../cuda/weight_merge.cuh"
#include "../launch_checks.h"

namespace gpu = fastforget::gpu;
namespace checks = fastforget::checks;
using checks::LaunchLists;

namespace {

struct Packed {
  std::vector<int64_t> words;
  int64_t num_blocks;
};

template <typename Meta, typename FillExtra = gpu::NoExtra>
Packed pack(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype, FillExtra fill = {}) {
  Packed p;
  p.num_blocks = gpu::planned_blocks(numel, n);
  p.words.resize(gpu::meta_words<Meta>(n, p.num_blocks));
  gpu::pack_meta_words<Meta>(p.words.data(), n, numel, ptr, dtype, fill);
  return p;
}

// The lists' metadata, packed from checked lists (role r of tensor i: list r's tensor i).
template <typename Meta, typename FillExtra = gpu::NoExtra>
Packed pack(const LaunchLists& lists, FillExtra fill = {}) {
  const auto a = checks::pack_arrays(lists, Meta::kRoles);
  return pack<Meta>(lists.length[0], a.numel.data(), a.ptr.data(), a.dtype.data(), fill);
}

template <typename F>
int dispatch(bool fp64, F f) {
  return fp64 ? f(double{}) : f(float{});
}

checks::AccCode acc_code(int acc_fp64) { return acc_fp64 ? gpu::kFloat64 : gpu::kFloat32; }

// A launch the binding would refuse: cudaErrorInvalidValue, with its message (nothing was written).
int refuse(const std::string& message) {
  ff_emu::sched().last_message = message;
  return cudaErrorInvalidValue;
}

// gpu::AdamwScalars from two_lam, decay, beta1_complement, beta2, beta2_complement, eps, threshold (its order).
template <typename acc_t>
gpu::AdamwScalars<acc_t> adamw_scalars(const double* v) {
  return {static_cast<acc_t>(v[0]), static_cast<acc_t>(v[1]), static_cast<acc_t>(v[2]), static_cast<acc_t>(v[3]),
          static_cast<acc_t>(v[4]), static_cast<acc_t>(v[5]), static_cast<acc_t>(v[6])};
}

}  // namespace

extern "C" {

void ff_emu_seed(uint64_t seed) { ff_emu::set_seed(seed); }

const char* ff_emu_last_message() { return ff_emu::last_message(); }

// lists: params, anchors, fisher, grads (those accumulate adds the gradient to; empty otherwise).
int ff_emu_ewc_penalty(const LaunchLists* lists, double lam, int accumulate, int acc_fp64, void* out) {
  const std::string refused = checks::ewc_penalty(*lists, accumulate != 0, acc_code(acc_fp64));
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::TensorMeta<gpu::kEwcRoles>>(*lists);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks);
    return gpu::launch_ewc_penalty<acc_t>(m.words.data(), n, m.num_blocks, lam, accumulate != 0, partials.data(),
                                          static_cast<acc_t*>(out), nullptr);
  });
}

// lists: params, anchors, fisher, grads (the gradients written).
int ff_emu_ewc_penalty_backward(const LaunchLists* lists, double lam, const void* grad_out, int64_t grad_out_count,
                                int acc_fp64) {
  const std::string refused = checks::ewc_penalty(*lists, true, acc_code(acc_fp64), grad_out_count, grad_out);
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::TensorMeta<gpu::kEwcRoles>>(*lists);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_ewc_penalty_backward<acc_t>(m.words.data(), n, m.num_blocks, lam,
                                                   static_cast<const acc_t*>(grad_out), nullptr);
  });
}

// lists: fisher, grads (each shaped like its fisher, or k of them stacked).
int ff_emu_fisher_update(const LaunchLists* lists, double decay, double scale, int absolute, int acc_fp64) {
  std::vector<int64_t> samples;
  const std::string refused = checks::fisher_update(*lists, acc_code(acc_fp64), &samples);
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::FisherUpdateMeta>(*lists, gpu::SetSamples{samples.data()});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_fisher_update<acc_t>(m.words.data(), n, m.num_blocks, decay, scale, absolute != 0, nullptr);
  });
}

// lists: grads.
int ff_emu_scale_grads(const LaunchLists* lists, const void* factors, int64_t factors_count, int acc_fp64) {
  const std::string refused = checks::scale_grads(*lists, acc_code(acc_fp64), factors_count, factors);
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::ScaleGradsMeta>(*lists, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_scale_grads<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(factors),
                                          nullptr);
  });
}

// out: its one list; sources: models and fisher (empty for a linear merge), num_models * n tensors each,
// model-major; coefs: the num_models weights, then the num_floors floors.
int ff_emu_weight_merge(const LaunchLists* out, const LaunchLists* sources, int64_t num_models, int64_t num_floors,
                        const void* coefs, int acc_fp64) {
  const std::string refused = checks::weight_merge(*out, *sources, num_models, num_floors, acc_code(acc_fp64));
  if (!refused.empty()) return refuse(refused);
  const int64_t n = out->length[0], count = sources->length[0];
  const bool fisher = sources->length[1] != 0;
  const Packed m = pack<gpu::MergeMeta>(*out, gpu::SetIndex{});
  const auto a = checks::pack_arrays(*sources, gpu::kMergeSourceRoles);
  std::vector<int64_t> words(count * gpu::MergeSource::kWords);
  gpu::pack_merge_sources(words.data(), count, a.numel.data(), a.ptr.data(), a.dtype.data());
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_weight_merge<acc_t>(m.words.data(), n, m.num_blocks, words.data(), num_models,
                                           static_cast<const acc_t*>(coefs), fisher, nullptr);
  });
}

// lists: grads, mean, var.
int ff_emu_grad_ema_stats(const LaunchLists* lists, const void* inv_scale, int64_t inv_scale_count,
                          const void* alphas, int64_t alpha_count, void* out, int acc_fp64) {
  const std::string refused =
      checks::grad_ema(*lists, acc_code(acc_fp64), {inv_scale_count, inv_scale, alpha_count, alphas});
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::GradEmaMeta>(*lists, gpu::SetGradEmaExtra{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks);
    return gpu::launch_grad_ema_stats<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(inv_scale),
                                             static_cast<const acc_t*>(alphas), partials.data(),
                                             static_cast<acc_t*>(out), nullptr);
  });
}

// lists: grads, mean, var.
int ff_emu_grad_ema_protect(const LaunchLists* lists, const void* inv_scale, int64_t inv_scale_count,
                            const void* alphas, int64_t alpha_count, const void* var_scales, int64_t var_scale_count,
                            const bool* skip, int64_t skip_count, double threshold, int acc_fp64) {
  const std::string refused = checks::grad_ema(
      *lists, acc_code(acc_fp64),
      {inv_scale_count, inv_scale, alpha_count, alphas, var_scale_count, var_scales, skip_count, skip});
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::GradEmaMeta>(*lists, gpu::SetGradEmaExtra{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_grad_ema_protect<acc_t>(m.words.data(), n, m.num_blocks,
                                               static_cast<const acc_t*>(inv_scale), static_cast<const acc_t*>(alphas),
                                               static_cast<const acc_t*>(var_scales), skip,
                                               static_cast<acc_t>(threshold), nullptr);
  });
}

// lists: grads.
int ff_emu_grad_moments(const LaunchLists* lists, const void* inv_scale, int64_t inv_scale_count, void* out,
                        int acc_fp64) {
  const std::string refused = checks::grad_moments(*lists, acc_code(acc_fp64), inv_scale_count, inv_scale);
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::GradMomentsMeta>(*lists, gpu::SetFirstBlock{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(2 * m.num_blocks);
    return gpu::launch_grad_moments<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(inv_scale),
                                           partials.data(), static_cast<acc_t*>(out), nullptr);
  });
}

// lists: params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega; per_tensor: the binding's
// per-tensor table (n x kAdamwColumns); scalars: two_lam, decay, beta1_complement, beta2, beta2_complement, eps,
// threshold (gpu::AdamwScalars' order).
int ff_emu_protected_adamw_step(const LaunchLists* lists, int ewc, int protect, int si, const void* per_tensor,
                                const void* grad_factor, const double* scalars, const float* found_inf, double lam,
                                void* penalty, int acc_fp64) {
  const std::string refused = checks::protected_adamw_step(*lists, acc_code(acc_fp64), ewc != 0, protect, si != 0);
  if (!refused.empty()) return refuse(refused);
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::AdamwMeta>(*lists, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks > 1 ? m.num_blocks : 1);
    return gpu::launch_protected_adamw_step<acc_t>(
        m.words.data(), n, m.num_blocks, ewc != 0, protect, si != 0, static_cast<const acc_t*>(per_tensor),
        static_cast<const acc_t*>(grad_factor), adamw_scalars<acc_t>(scalars), found_inf, partials.data(),
        static_cast<acc_t>(lam), static_cast<acc_t*>(penalty), nullptr);
  });
}

// out: n x kBins int32, zeroed by the caller (as the binding's at::zeros).
int ff_emu_mofo_histogram(const LaunchLists* lists, const int64_t* prefix, int shift, int digit_bits, int* out,
                          int acc_fp64) {
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::MofoSelectMeta>(*lists, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_mofo_histogram<acc_t>(m.words.data(), n, m.num_blocks, prefix, shift, digit_bits, out, nullptr);
  });
}

int ff_emu_mofo_thresholds(const LaunchLists* lists, const int64_t* ks, int64_t* out, int acc_fp64) {
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::MofoSelectMeta>(*lists, gpu::SetIndex{});
  std::vector<int> hist(n * fastforget::mofo::kBins);  // left uninitialised by the binding (at::empty): the kernels
  for (auto& h : hist) h = -7;                          // must zero it, so it starts as garbage here
  std::vector<int64_t> need(n), prefix(n);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_mofo_thresholds<acc_t>(m.words.data(), n, m.num_blocks, ks, hist.data(), need.data(),
                                              prefix.data(), out, nullptr);
  });
}

int ff_emu_mofo_update(const LaunchLists* lists, int si, const void* per_tensor, const int64_t* thresholds,
                       const void* grad_factor, double decay, double eps, const float* found_inf, int acc_fp64) {
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::MofoUpdateMeta>(*lists, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_mofo_update<acc_t>(m.words.data(), n, m.num_blocks, si != 0,
                                          static_cast<const acc_t*>(per_tensor), thresholds,
                                          static_cast<const acc_t*>(grad_factor), static_cast<acc_t>(decay),
                                          static_cast<acc_t>(eps), found_inf, nullptr);
  });
}

// As ff_emu_protected_adamw_step (acc_t float: the 8-bit step's params are 16- or 32-bit), with
// gpu::Adamw8bitMeta's roles and the two maps.
int ff_emu_protected_adamw8bit_step(const LaunchLists* lists, int ewc, int protect, int si, const float* per_tensor,
                                    const float* grad_factor,
                                    const double* scalars, const float* qmap_signed, const float* qmap_unsigned,
                                    const float* found_inf, double lam, float* penalty) {
  const int64_t n = lists->length[0];
  const Packed m = pack<gpu::Adamw8bitMeta>(*lists, gpu::SetIndex{});
  std::vector<float> partials(m.num_blocks > 1 ? m.num_blocks : 1);
  return gpu::launch_protected_adamw8bit_step<float>(
      m.words.data(), n, m.num_blocks, ewc != 0, protect, si != 0, per_tensor, grad_factor,
      adamw_scalars<float>(scalars), qmap_signed, qmap_unsigned, found_inf, partials.data(), static_cast<float>(lam),
      penalty, nullptr);
}

// logits_dtype: a gpu::DtypeCode (acc_t is double for fp64 logits, else float).
int ff_emu_anchored_lm_loss_rows(const void* logits, const void* ref, const int64_t* labels, const void* weights,
                                 const void* scale, void* loss, void* grad, int64_t rows, int64_t vocab,
                                 double kl_weight, double temperature, int reverse, int anchored, int dft,
                                 int64_t ignore_index, int logits_dtype) {
  const std::string refused = checks::anchored_lm_loss_rows(
      {logits, ref, labels, scale, loss, grad, rows, vocab, logits_dtype, temperature, anchored != 0});
  if (!refused.empty()) return refuse(refused);
  const auto run = [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    return gpu::launch_anchored_lm_loss_rows<scalar_t, acc_t>(
        static_cast<const scalar_t*>(logits), static_cast<const scalar_t*>(ref), labels,
        static_cast<const acc_t*>(weights), static_cast<const acc_t*>(scale), static_cast<acc_t*>(loss),
        static_cast<scalar_t*>(grad), rows, vocab, kl_weight, temperature, reverse != 0, anchored != 0, dft != 0,
        ignore_index,
        nullptr);
  };
  switch (logits_dtype) {
    case gpu::kFloat64: return run(double{}, double{});
    case gpu::kBFloat16: return run(__nv_bfloat16{}, float{});
    case gpu::kFloat16: return run(__half{}, float{});
    default: return run(float{}, float{});  // kFloat32 (the check refused any other code)
  }
}

}  // extern "C"

extern "C" {

// The emulator's 16-bit conversions, for their own tests: out[i] = the bits of in[i] converted by `kind`
// (0: __float2bfloat16 of (float)in[i], 1: __double2bfloat16, 2: __float2half, 3: __double2half, 4:
// __float2bfloat16_rz).
void ff_emu_convert(const double* in, int64_t n, int kind, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float f = static_cast<float>(in[i]);
    switch (kind) {
      case 0: out[i] = __float2bfloat16(f).__x; break;
      case 1: out[i] = __double2bfloat16(in[i]).__x; break;
      case 2: out[i] = __float2half(f).__x; break;
      case 3: out[i] = __double2half(in[i]).__x; break;
      default: out[i] = __float2bfloat16_rz(f).__x; break;
    }
  }
}

}  // extern "C"
