// The protected AdamW step on the CPU with 8-bit moments (math: fastforget/ops/protected_adamw8bit_step.py): the
// 32-bit step's tile loop (adamw_tiles.h), each tile's moments -- and an 8-bit Fisher -- dequantized into tile
// buffers before the step and, after it, per block of 256 the new absmax and the codes requantized (quantize.h).
// Chunks and tiles start on block boundaries, so a block never spans two threads: fixed order, no atomics.
#include "adamw_tiles.h"
#include "quantize.h"

#include "../common.h"
#include "../protected_adamw8bit_step.h"

#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace fastforget::cpu {
namespace {

static_assert(kChunk % kQuantBlock == 0 && kTile % kQuantBlock == 0, "chunks and tiles must start on a block");
static_assert(kQuantBlock == kQuantBlockSize);

// codes[offset, offset + n) of one tensor, block by block: out = map[codes] * absmax[block].
void dequantize(const at::Tensor& codes, const at::Tensor& absmax, const QuantMap& map, int64_t offset, int64_t n,
                float* out) {
  const uint8_t* c = codes.const_data_ptr<uint8_t>() + offset;
  const float* scale = absmax.const_data_ptr<float>() + offset / kQuantBlock;
  for (int64_t start = 0; start < n; start += kQuantBlock) {
    map.dequantize(c + start, scale[start / kQuantBlock], out + start, std::min(kQuantBlock, n - start));
  }
}

// The new codes and absmax of values[0, n), the elements [offset, offset + n) of one tensor.
void quantize(const float* values, const QuantMap& map, int64_t offset, int64_t n, const at::Tensor& codes,
              const at::Tensor& absmax) {
  uint8_t* c = codes.mutable_data_ptr<uint8_t>() + offset;
  float* scale = absmax.mutable_data_ptr<float>() + offset / kQuantBlock;
  for (int64_t start = 0; start < n; start += kQuantBlock) {
    const int64_t len = std::min(kQuantBlock, n - start);
    const float block_max = block_absmax(values + start, len);
    scale[start / kQuantBlock] = block_max;
    map.quantize(values + start, 1.0f / std::max(block_max, kMinAbsmax), c + start, len);
  }
}

// The moments policy of adamw_tiles.h's tile loop for uint8 codes with block scales.
struct QuantizedMoments {
  at::TensorList exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, fisher, fisher_absmax;
  const QuantMap& signed_map;    // exp_avg
  const QuantMap& unsigned_map;  // exp_avg_sq and an 8-bit Fisher

  struct Tiles {
    Tile m1, m2, fisher;
  };

  std::tuple<float*, float*, const float*> load(int64_t t, int64_t offset, int64_t n, Tiles& buf) const {
    auto* m1 = reinterpret_cast<float*>(buf.m1.data());
    auto* m2 = reinterpret_cast<float*>(buf.m2.data());
    dequantize(exp_avg[t], exp_avg_absmax[t], signed_map, offset, n, m1);
    dequantize(exp_avg_sq[t], exp_avg_sq_absmax[t], unsigned_map, offset, n, m2);
    if (fisher.empty()) return {m1, m2, nullptr};
    if (fisher_absmax.empty()) return {m1, m2, load_tile<float>(fisher[t], offset, n, buf.fisher)};
    auto* f = reinterpret_cast<float*>(buf.fisher.data());
    dequantize(fisher[t], fisher_absmax[t], unsigned_map, offset, n, f);
    return {m1, m2, f};
  }

  void store(int64_t t, int64_t offset, int64_t n, const float* m1, const float* m2) const {
    quantize(m1, signed_map, offset, n, exp_avg[t], exp_avg_absmax[t]);
    quantize(m2, unsigned_map, offset, n, exp_avg_sq[t], exp_avg_sq_absmax[t]);
  }
};

at::Tensor protected_adamw8bit_step(
    at::TensorList params_, at::TensorList grads_, at::TensorList exp_avg, at::TensorList exp_avg_sq,
    at::TensorList exp_avg_absmax, at::TensorList exp_avg_sq_absmax, const at::Tensor& qmap_signed,
    const at::Tensor& qmap_unsigned, at::TensorList steps, at::TensorList anchors_, at::TensorList fisher_,
    at::TensorList fisher_absmax, const std::optional<at::Tensor>& factors, at::TensorList ema_mean,
    at::TensorList ema_var, const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& var_scale,
    at::TensorList omega, const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
    double lr, double beta1, double beta2, double eps, double weight_decay, double lam, double threshold,
    bool maximize) {
  const AdamwLists given{params_, grads_, exp_avg, exp_avg_sq, anchors_, fisher_, ema_mean, ema_var, omega};
  const QuantizedLists quantized{exp_avg_absmax, exp_avg_sq_absmax, fisher_absmax, qmap_signed, qmap_unsigned};
  check_protected_adamw8bit_inputs(given, quantized, steps, factors, alpha, var_scale);
  const auto options = at::TensorOptions().dtype(at::kFloat);
  if (params_.empty() || skipped(found_inf)) return at::scalar_tensor(0, options);  // a skipped step: no write
  const auto params = contiguous(params_);  // a non-contiguous one is updated through a copy, written back below
  const auto grads = contiguous(grads_), anchors = contiguous(anchors_), fisher = contiguous(fisher_);
  const AdamwLists l{params, grads, exp_avg, exp_avg_sq, anchors, fisher, ema_mean, ema_var, omega};
  const QuantMap signed_map(qmap_signed.const_data_ptr<float>()), unsigned_map(qmap_unsigned.const_data_ptr<float>());
  const QuantizedMoments moments{exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, fisher, fisher_absmax,
                                 signed_map, unsigned_map};
  const auto args = step_args<float>(steps, factors, alpha, var_scale, grad_factor(maximize, grad_scale), lr, beta1,
                                     beta2, eps, weight_decay, lam, threshold);
  const float sum = run_step(l, args, protect_mode(factors, ema_mean), moments);
  copy_back(params_, params);
  for (const auto& s : steps) s.add_(1);
  return at::scalar_tensor(static_cast<float>(lam) * sum, options);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("protected_adamw8bit_step", &protected_adamw8bit_step); }

}  // namespace fastforget::cpu
