// LoRA linear on the CPU: ../lora_linear.h with the thin (rank-r) products computed here for fp32 and fp64.
//
// A BLAS runs LoRA's thin products (one dimension r = 1..64 against M x 1024-sized operands) at a tenth of its
// GEMM rate; these kernels stream the big operand once, keep the r-sized side in registers or L1 and let the
// compiler vectorise the inner loop (-march=native). Each output element is summed by one thread in a fixed
// order: deterministic for any thread count. 16-bit inputs (and any non-contiguous operand) go to ATen.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../lora_linear.h"

namespace fastforget::lora {
namespace {

constexpr int64_t kLanes = 16;       // project: r in blocks of kLanes accumulators (one AVX-512 fp32 register)
constexpr int64_t kRowTile = 4;      // project: rows accumulated together
constexpr int64_t kRows = 8;         // expand: parallel_for grain in rows

bool fast(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    const auto type = t->scalar_type();
    if ((type != at::kFloat && type != at::kDouble) || !t->is_contiguous()) return false;
  }
  return true;
}

const bool* mask_of(const OptionalTensor& keep) { return keep ? keep->const_data_ptr<bool>() : nullptr; }

// out (M, r) = alpha (X * keep) F^T. F^T is padded to a multiple of kLanes columns; kRowTile rows at a time
// accumulate x[m, k] * F^T[k, j0:j0+kLanes] over k (independent accumulators, so the FMAs pipeline).
template <typename T>
void project_kernel(const at::Tensor& X, const at::Tensor& F, const bool* keep, T alpha, at::Tensor& out) {
  const int64_t M = X.size(0), K = X.size(1), r = F.size(0);
  const int64_t padded = (r + kLanes - 1) / kLanes * kLanes;
  at::Tensor Ft = at::zeros({K, padded}, F.options());
  Ft.narrow(1, 0, r).copy_(F.t());
  const T* x = X.const_data_ptr<T>();
  const T* ft = Ft.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  const int64_t tiles = (M + kRowTile - 1) / kRowTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t m0 = tile * kRowTile, rows = std::min(kRowTile, M - m0);
      for (int64_t j0 = 0; j0 < r; j0 += kLanes) {
        T acc[kRowTile][kLanes] = {};
        for (int64_t k = 0; k < K; ++k) {
          const T* f = ft + k * padded + j0;
          T v[kRowTile];
          for (int64_t i = 0; i < kRowTile; ++i) {
            const int64_t at = (m0 + std::min(i, rows - 1)) * K + k;  // a short tile repeats its last row
            v[i] = keep && !keep[at] ? T(0) : x[at];
          }
#pragma GCC unroll 8
          for (int64_t i = 0; i < kRowTile; ++i) {
            for (int64_t j = 0; j < kLanes; ++j) acc[i][j] += v[i] * f[j];
          }
        }
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < std::min(kLanes, r - j0); ++j) o[(m0 + i) * r + j0 + j] = alpha * acc[i][j];
        }
      }
    }
  });
}

// out (M, N) = bias + P F, or (P F) * keep: row m is an L1-resident sum of r scaled rows of F.
template <typename T>
void expand_kernel(const at::Tensor& P, const at::Tensor& F, const T* bias, const bool* keep, at::Tensor& out) {
  const int64_t M = P.size(0), r = P.size(1), N = F.size(1);
  const T* p = P.const_data_ptr<T>();
  const T* f = F.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  at::parallel_for(0, M, kRows, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      T* om = o + m * N;
      for (int64_t n = 0; n < N; ++n) om[n] = bias ? bias[n] : T(0);
      for (int64_t k = 0; k < r; ++k) {
        const T pk = p[m * r + k];
        const T* fk = f + k * N;
        for (int64_t n = 0; n < N; ++n) om[n] += pk * fk[n];
      }
      if (keep) {
        const bool* km = keep + m * N;
        for (int64_t n = 0; n < N; ++n) om[n] = km[n] ? om[n] : T(0);
      }
    }
  });
}

struct CpuProducts {
  static at::Tensor project(const at::Tensor& X, const at::Tensor& F, const OptionalTensor& keep, double alpha) {
    if (!fast({&X})) return AtenProducts::project(X, F, keep, alpha);
    at::Tensor out = at::empty({X.size(0), F.size(0)}, X.options());
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "lora_project", [&] {
      project_kernel<scalar_t>(X, F, mask_of(keep), static_cast<scalar_t>(alpha), out);
    });
    return out;
  }

  static at::Tensor expand(const at::Tensor& P, const at::Tensor& F, const OptionalTensor& bias,
                           const OptionalTensor& keep) {
    const at::Tensor Fc = F.contiguous();  // lora_B^T for y: out x r, small
    if (!fast({&P, &Fc}) || (bias && !bias->is_contiguous())) return AtenProducts::expand(P, F, bias, keep);
    at::Tensor out = at::empty({P.size(0), F.size(1)}, P.options());
    AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "lora_expand", [&] {
      expand_kernel<scalar_t>(P, Fc, bias ? bias->const_data_ptr<scalar_t>() : nullptr, mask_of(keep), out);
    });
    return out;
  }

  // P^T X reduces over M: a BLAS does that as fast as a hand-written kernel here (measured: MKL 3 ms on one core
  // for (16 x 4096) x (4096 x 1024), a register-tiled loop 20 ms).
  static at::Tensor reduce(const at::Tensor& P, const at::Tensor& X, const OptionalTensor& keep) {
    return AtenProducts::reduce(P, X, keep);
  }
};

}  // namespace
}  // namespace fastforget::lora

TORCH_LIBRARY_IMPL(fastforget, CPU, m) {
  m.impl("lora_linear", &fastforget::lora::lora_linear<fastforget::lora::CpuProducts>);
  m.impl("lora_linear_backward", &fastforget::lora::lora_linear_backward<fastforget::lora::CpuProducts>);
}
