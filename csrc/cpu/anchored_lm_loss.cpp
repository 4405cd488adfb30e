// Row kernel of the anchored LM loss on the CPU (the math: fastforget/ops/anchored_lm_loss.py). For each row of a
// chunk of logits z (and reference logits a), with s the 1 / (counted tokens) scale and T the temperature:
//
//   loss_row = s c (w CE + kl_weight T^2 KL),   d loss / d z_j = s c (w (p_j - [j = y]) + kl_weight T g_j)
//
// with DFT (Wu et al. 2025) w multiplied by the label's probability p_y = exp(-CE), never differentiated.
//
// One parallel region over the chunk's rows; each row is summed by one thread in a fixed order (deterministic for
// any thread count). Per row: the maxima, then one pass that writes e = exp(z - max) (and the tempered and
// reference ones) to thread-local buffers while summing them, then the pass that writes the gradient from those
// buffers: two or three exponentials per element. Every loop runs on GCC/Clang vector extensions (one AVX-512
// register, or two AVX2 ones) with a Cephes-style exp in fp32; fp64 (gradcheck) takes std::exp per lane. 16-bit
// inputs are widened to fp32 into the buffers and the gradient rounded once to the logits' dtype.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastforget::anchored {
namespace {

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = sizeof(Vec<T>) / sizeof(T);
typedef int32_t IntVec __attribute__((vector_size(64)));

template <typename T>
Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename T>
void store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof v);
}

template <typename T>
T lane_sum(const Vec<T>& v) {
  T sum = 0;
  for (int64_t l = 0; l < kLanes<T>; ++l) sum += v[l];
  return sum;
}

// exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 in two steps, exp(r) by Cephes' degree-6 polynomial
// (about 1 ulp); x is clamped to the range whose result is a normal float (exp(-87.3) ~ 1e-38 stands for 0).
Vec<float> vexp(Vec<float> x) {
  const Vec<float> hi = Vec<float>{} + 88.3762626647949f, lo = Vec<float>{} + -87.3365447504019f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const Vec<float> t = x * 1.44269504088896341f + 0.5f;
  IntVec n = __builtin_convertvector(t, IntVec);
  n += t < __builtin_convertvector(n, Vec<float>);  // truncation -> floor (a true comparison is -1)
  const Vec<float> nf = __builtin_convertvector(n, Vec<float>);
  const Vec<float> r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
  Vec<float> p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * reinterpret_cast<Vec<float>>((n + 127) << 23);
}

Vec<double> vexp(Vec<double> x) {
  for (int64_t l = 0; l < kLanes<double>; ++l) x[l] = std::exp(x[l]);
  return x;
}

template <typename T>
T max_of(const T* x, int64_t n) {
  const int64_t L = kLanes<T>;
  Vec<T> m = Vec<T>{} - std::numeric_limits<T>::infinity();
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec<T> v = load(x + j);
    m = v > m ? v : m;
  }
  T out = -std::numeric_limits<T>::infinity();
  for (int64_t l = 0; l < L; ++l) out = std::max(out, m[l]);
  for (; j < n; ++j) out = std::max(out, x[j]);
  return out;
}

// out = exp(x * scale - shift); returns its sum
template <typename T>
T exp_sum(const T* x, T scale, T shift, T* out, int64_t n) {
  const int64_t L = kLanes<T>;
  Vec<T> sum{};
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    const Vec<T> e = vexp(load(x + j) * scale - shift);
    store(out + j, e);
    sum += e;
  }
  T total = lane_sum<T>(sum);
  for (; j < n; ++j) total += out[j] = std::exp(x[j] * scale - shift);
  return total;
}

// sum_j e_j (u_j - v_j)
template <typename T>
T weighted_difference(const T* e, const T* u, const T* v, int64_t n) {
  const int64_t L = kLanes<T>;
  Vec<T> sum{};
  int64_t j = 0;
  for (; j + L <= n; j += L) sum += load(e + j) * (load(u + j) - load(v + j));
  T total = lane_sum<T>(sum);
  for (; j < n; ++j) total += e[j] * (u[j] - v[j]);
  return total;
}

template <typename scalar_t, typename acc_t>
const acc_t* widened(const scalar_t* x, acc_t* buffer, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<acc_t>(x[j]);
    return buffer;
  }
}

struct Options {
  int64_t vocab;
  double kl_weight, temperature;
  bool reverse, anchored, dft;
  int64_t ignore_index;
};

// The per-thread buffers and the per-row math; kTempered: T != 1 (else q = p and one exponential is saved).
template <typename scalar_t, typename acc_t, bool kTempered>
struct Rows {
  const Options& o;
  std::vector<acc_t> buffers;  // z, a (16-bit inputs only), e_z, e_q (tempered only), e_r

  explicit Rows(const Options& options) : o(options), buffers(5 * options.vocab) {}

  // loss of one counted row; d (vocab entries) receives its gradient
  acc_t row(const scalar_t* z_in, const scalar_t* a_in, int64_t label, acc_t weight, acc_t scale, acc_t* d) {
    const int64_t n = o.vocab;
    acc_t* buf = buffers.data();
    const acc_t* z = widened(z_in, buf, n);
    acc_t *e_z = buf + 2 * n, *e_q = kTempered ? buf + 3 * n : e_z, *e_r = buf + 4 * n;
    const acc_t m_z = max_of(z, n);
    const acc_t s_z = exp_sum(z, acc_t(1), m_z, e_z, n);
    const acc_t ce = m_z + std::log(s_z) - z[label];
    if (o.dft) weight *= std::exp(-ce);  // DFT: the CE weighted by sg(p_y)
    const acc_t grad_p = scale * weight / s_z;  // d CE part = grad_p e_z - scale weight [j = y]
    if (!o.anchored) {
      for (int64_t j = 0; j < n; ++j) d[j] = grad_p * e_z[j];
      d[label] -= scale * weight;
      return scale * weight * ce;
    }
    const acc_t inv_t = acc_t(1) / static_cast<acc_t>(o.temperature);
    const acc_t* a = widened(a_in, buf + n, n);
    const acc_t m_q = m_z * inv_t, m_r = max_of(a, n) * inv_t;  // max(x / T) = max(x) / T for T > 0
    const acc_t s_q = kTempered ? exp_sum(z, inv_t, m_q, e_q, n) : s_z;
    const acc_t s_r = exp_sum(a, inv_t, m_r, e_r, n);
    const acc_t lse_gap = (m_r + std::log(s_r)) - (m_q + std::log(s_q));  // log Z_r - log Z_q
    // forward KL = sum_j r_j (a_j - z_j) / T + log Z_q - log Z_r; reverse = sum_j q_j (z_j - a_j) / T - (same)
    const acc_t kl = o.reverse ? weighted_difference(e_q, z, a, n) * inv_t / s_q + lse_gap
                               : weighted_difference(e_r, a, z, n) * inv_t / s_r - lse_gap;
    const acc_t t = static_cast<acc_t>(o.temperature), kl_scale = scale * static_cast<acc_t>(o.kl_weight) * t;
    const acc_t q_scale = kl_scale / s_q, r_scale = kl_scale / s_r;
    const int64_t L = kLanes<acc_t>;
    int64_t j = 0;
    if (o.reverse) {  // g_j = q_j (log q_j - log r_j - KL) = q_j ((z_j - a_j) / T + lse_gap - KL)
      const acc_t offset = lse_gap - kl;
      for (; j + L <= n; j += L) {
        const Vec<acc_t> g = load(e_q + j) * ((load(z + j) - load(a + j)) * inv_t + offset);
        store(d + j, grad_p * load(e_z + j) + q_scale * g);
      }
      for (; j < n; ++j) d[j] = grad_p * e_z[j] + q_scale * e_q[j] * ((z[j] - a[j]) * inv_t + offset);
    } else {  // g_j = q_j - r_j
      for (; j + L <= n; j += L) {
        store(d + j, grad_p * load(e_z + j) + q_scale * load(e_q + j) - r_scale * load(e_r + j));
      }
      for (; j < n; ++j) d[j] = grad_p * e_z[j] + q_scale * e_q[j] - r_scale * e_r[j];
    }
    d[label] -= scale * weight;
    return scale * (weight * ce + static_cast<acc_t>(o.kl_weight) * t * t * kl);
  }
};

template <typename scalar_t, typename acc_t, bool kTempered>
void run(const Options& o, const at::Tensor& logits, const at::Tensor& ref, const int64_t* labels,
         const acc_t* weights, acc_t scale, at::Tensor& loss, at::Tensor& grad) {
  const int64_t n = o.vocab, rows = logits.size(0);
  const scalar_t* z = logits.const_data_ptr<scalar_t>();
  const scalar_t* a = o.anchored ? ref.const_data_ptr<scalar_t>() : nullptr;
  acc_t* out = loss.mutable_data_ptr<acc_t>();
  scalar_t* dz = grad.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / n), [&](int64_t begin, int64_t end) {
    Rows<scalar_t, acc_t, kTempered> kernel(o);
    std::vector<acc_t> widened_grad(std::is_same_v<scalar_t, acc_t> ? 0 : n);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* d_row = dz + i * n;
      if (labels[i] == o.ignore_index) {
        out[i] = 0;
        std::fill(d_row, d_row + n, scalar_t(0));
        continue;
      }
      acc_t* d = std::is_same_v<scalar_t, acc_t> ? reinterpret_cast<acc_t*>(d_row) : widened_grad.data();
      const acc_t w = weights ? weights[i] : acc_t(1);
      out[i] = kernel.row(z + i * n, a ? a + i * n : nullptr, labels[i], w, scale, d);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) {
        for (int64_t j = 0; j < n; ++j) d_row[j] = static_cast<scalar_t>(d[j]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> anchored_lm_loss_rows(const at::Tensor& logits_,
                                                         const std::optional<at::Tensor>& ref_logits,
                                                         const at::Tensor& labels_,
                                                         const std::optional<at::Tensor>& token_weights,
                                                         const at::Tensor& scale, double kl_weight,
                                                         double temperature, bool reverse, int64_t ignore_index,
                                                         bool dft) {
  TORCH_CHECK(logits_.dim() == 2, "fastforget: logits must be 2-D (rows, vocab), got ", logits_.sizes());
  const int64_t rows = logits_.size(0), vocab = logits_.size(1);
  TORCH_CHECK(vocab >= 1, "fastforget: logits has an empty vocabulary");
  TORCH_CHECK(labels_.dim() == 1 && labels_.size(0) == rows && labels_.scalar_type() == at::kLong,
              "fastforget: labels must be int64 of shape (", rows, ",), got ", labels_.scalar_type(), " ",
              labels_.sizes());
  const bool anchored = ref_logits.has_value() && ref_logits->defined() && kl_weight != 0;
  if (anchored) {
    TORCH_CHECK(ref_logits->sizes() == logits_.sizes() && ref_logits->scalar_type() == logits_.scalar_type(),
                "fastforget: ref_logits must match logits (", logits_.sizes(), ", ", logits_.scalar_type(), ")");
  }
  const bool weighted = token_weights.has_value() && token_weights->defined();
  if (weighted) {
    TORCH_CHECK(token_weights->dim() == 1 && token_weights->size(0) == rows,
                "fastforget: token_weights must have shape (", rows, ",), got ", token_weights->sizes());
  }
  TORCH_CHECK(scale.numel() == 1, "fastforget: scale must have one element, got ", scale.numel());
  TORCH_CHECK(temperature > 0 && std::isfinite(temperature), "fastforget: temperature must be finite and > 0");
  const at::Tensor labels = labels_.contiguous();
  const int64_t* y = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(y[i] == ignore_index || (y[i] >= 0 && y[i] < vocab), "fastforget: labels[", i, "] = ", y[i],
                " is outside [0, ", vocab, ") and not ignore_index");
  }
  const at::Tensor logits = logits_.contiguous();
  const at::Tensor ref = anchored ? ref_logits->contiguous() : at::Tensor();
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor weights = weighted ? token_weights->to(acc_type).contiguous() : at::Tensor();
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_type));
  at::Tensor grad = at::empty({rows, vocab}, logits.options());
  const Options o{vocab, kl_weight, temperature, reverse, anchored, dft, ignore_index};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "anchored_lm_loss_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t s = scale.to(at::kDouble).item<double>();
    const acc_t* w = weighted ? weights.const_data_ptr<acc_t>() : nullptr;
    if (temperature != 1.0 && anchored) {
      run<scalar_t, acc_t, true>(o, logits, ref, y, w, s, loss, grad);
    } else {
      run<scalar_t, acc_t, false>(o, logits, ref, y, w, s, loss, grad);
    }
  });
  return {loss, grad};
}

}  // namespace
}  // namespace fastforget::anchored

TORCH_LIBRARY_IMPL(fastforget, CPU, m) { m.impl("anchored_lm_loss_rows", &fastforget::anchored::anchored_lm_loss_rows); }
