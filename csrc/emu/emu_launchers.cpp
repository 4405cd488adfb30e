// Every CUDA launcher of csrc/cuda/*.cuh on CPU memory, through the emulator (cuda_emu.h), behind a C ABI that
// tests/test_cuda_emulator.py calls with ctypes on CPU tensors' data pointers. Built at test time (not part of the
// extension):  g++ -std=c++17 -O1 -shared -fPIC -I csrc/emu emu_launchers.cpp -o libffemu.so
//
// Each entry point takes what the real binding (csrc/cuda/*.cu) computes on the host after its checks: the lists'
// element counts, data pointers and dtype codes (role r of tensor i at [r * n + i]), packs them with the same
// gpu::pack_meta_words, allocates the same scratch and calls the same launcher. acc_fp64 selects acc_t = double.
// Returns the cudaError_t; ff_emu_last_message() says why a launch failed.
#include "cuda_emu.h"  // first: defines the CUDA keywords the headers use

#include <cstdint>
#include <vector>

#include "../cuda/anchored_lm_loss.cuh"
#include "../cuda/ewc_penalty.cuh"
#include "../cuda/fisher_update.cuh"
#include "../cuda/grad_ema.cuh"
#include "../cuda/grad_moments.cuh"
#include "../cuda/multi_tensor.cuh"
#include "../cuda/protected_adamw8bit_step.cuh"
#include "../cuda/protected_adamw_step.cuh"
#include "../cuda/scale_grads.cuh"
#include "../cuda/weight_merge.cuh"

namespace gpu = fastforget::gpu;

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

template <typename F>
int dispatch(bool fp64, F f) {
  return fp64 ? f(double{}) : f(float{});
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

int ff_emu_ewc_penalty(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype, double lam,
                       int accumulate, int acc_fp64, void* out) {
  const Packed m = pack<gpu::TensorMeta<gpu::kEwcRoles>>(n, numel, ptr, dtype);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks);
    return gpu::launch_ewc_penalty<acc_t>(m.words.data(), n, m.num_blocks, lam, accumulate != 0, partials.data(),
                                          static_cast<acc_t*>(out), nullptr);
  });
}

int ff_emu_ewc_penalty_backward(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                                double lam, const void* grad_out, int acc_fp64) {
  const Packed m = pack<gpu::TensorMeta<gpu::kEwcRoles>>(n, numel, ptr, dtype);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_ewc_penalty_backward<acc_t>(m.words.data(), n, m.num_blocks, lam,
                                                   static_cast<const acc_t*>(grad_out), nullptr);
  });
}

int ff_emu_fisher_update(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                         const int64_t* samples, double decay, double scale, int absolute, int acc_fp64) {
  const Packed m = pack<gpu::FisherUpdateMeta>(n, numel, ptr, dtype, gpu::SetSamples{samples});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_fisher_update<acc_t>(m.words.data(), n, m.num_blocks, decay, scale, absolute != 0, nullptr);
  });
}

int ff_emu_scale_grads(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                       const void* factors, int acc_fp64) {
  const Packed m = pack<gpu::ScaleGradsMeta>(n, numel, ptr, dtype, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_scale_grads<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(factors),
                                          nullptr);
  });
}

// out: n tensors (role 0 only); sources: count = num_models * n (model, Fisher) records packed as the binding does.
int ff_emu_weight_merge(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype, int64_t count,
                        const int64_t* src_numel, const int64_t* src_ptr, const int64_t* src_dtype,
                        int64_t num_models, const void* coefs, int fisher, int acc_fp64) {
  const Packed m = pack<gpu::MergeMeta>(n, numel, ptr, dtype, gpu::SetIndex{});
  std::vector<int64_t> sources(count * gpu::MergeSource::kWords);
  gpu::pack_merge_sources(sources.data(), count, src_numel, src_ptr, src_dtype);
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_weight_merge<acc_t>(m.words.data(), n, m.num_blocks, sources.data(), num_models,
                                           static_cast<const acc_t*>(coefs), fisher != 0, nullptr);
  });
}

int ff_emu_grad_ema_stats(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                          const void* inv_scale, const void* alphas, void* out, int acc_fp64) {
  const Packed m = pack<gpu::GradEmaMeta>(n, numel, ptr, dtype, gpu::SetGradEmaExtra{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks);
    return gpu::launch_grad_ema_stats<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(inv_scale),
                                             static_cast<const acc_t*>(alphas), partials.data(),
                                             static_cast<acc_t*>(out), nullptr);
  });
}

int ff_emu_grad_ema_protect(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                            const void* inv_scale, const void* alphas, const void* var_scales, const bool* skip,
                            double threshold, int acc_fp64) {
  const Packed m = pack<gpu::GradEmaMeta>(n, numel, ptr, dtype, gpu::SetGradEmaExtra{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    return gpu::launch_grad_ema_protect<acc_t>(m.words.data(), n, m.num_blocks,
                                               static_cast<const acc_t*>(inv_scale), static_cast<const acc_t*>(alphas),
                                               static_cast<const acc_t*>(var_scales), skip,
                                               static_cast<acc_t>(threshold), nullptr);
  });
}

int ff_emu_grad_moments(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                        const void* inv_scale, void* out, int acc_fp64) {
  const Packed m = pack<gpu::GradMomentsMeta>(n, numel, ptr, dtype, gpu::SetFirstBlock{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(2 * m.num_blocks);
    return gpu::launch_grad_moments<acc_t>(m.words.data(), n, m.num_blocks, static_cast<const acc_t*>(inv_scale),
                                           partials.data(), static_cast<acc_t*>(out), nullptr);
  });
}

// scalars: two_lam, decay, beta1_complement, beta2, beta2_complement, eps, threshold (gpu::AdamwScalars' order).
int ff_emu_protected_adamw_step(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype, int ewc,
                                int protect, int si, const void* per_tensor, const void* grad_factor,
                                const double* scalars, const float* found_inf, double lam, void* penalty,
                                int acc_fp64) {
  const Packed m = pack<gpu::AdamwMeta>(n, numel, ptr, dtype, gpu::SetIndex{});
  return dispatch(acc_fp64, [&](auto zero) {
    using acc_t = decltype(zero);
    std::vector<acc_t> partials(m.num_blocks > 1 ? m.num_blocks : 1);
    return gpu::launch_protected_adamw_step<acc_t>(
        m.words.data(), n, m.num_blocks, ewc != 0, protect, si != 0, static_cast<const acc_t*>(per_tensor),
        static_cast<const acc_t*>(grad_factor), adamw_scalars<acc_t>(scalars), found_inf, partials.data(),
        static_cast<acc_t>(lam), static_cast<acc_t*>(penalty), nullptr);
  });
}

// As ff_emu_protected_adamw_step (acc_t float: the 8-bit step's params are 16- or 32-bit), with
// gpu::Adamw8bitMeta's roles and the two maps.
int ff_emu_protected_adamw8bit_step(int64_t n, const int64_t* numel, const int64_t* ptr, const int64_t* dtype,
                                    int ewc, int protect, int si, const float* per_tensor, const float* grad_factor,
                                    const double* scalars, const float* qmap_signed, const float* qmap_unsigned,
                                    const float* found_inf, double lam, float* penalty) {
  const Packed m = pack<gpu::Adamw8bitMeta>(n, numel, ptr, dtype, gpu::SetIndex{});
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
    default: return run(float{}, float{});
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
