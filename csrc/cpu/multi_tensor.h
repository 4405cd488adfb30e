// Multi-tensor helpers for the CPU kernels: one parallel region over a whole tensor list.
//
// The list is cut into chunks of kChunk elements (never spanning two tensors). Chunk boundaries depend only on
// the tensor sizes, never on the thread count, so a reduction that keeps one partial per chunk and sums the
// partials in chunk order is bitwise reproducible for any number of threads.
//
// Inside a chunk, elements are processed in tiles of kTile: a tile of any floating dtype is staged as acc_t in a
// stack buffer (or used in place when it already is acc_t), so each kernel body is written once, for acc_t only.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <vector>

namespace fastforget::cpu {

constexpr int64_t kChunk = int64_t{1} << 16;
constexpr int64_t kTile = 1024;

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) chunks.push_back({t, begin, std::min(n, begin + kChunk)});
  }
  return chunks;
}

// Runs body(chunk_index, chunk) for every chunk, in parallel.
template <typename Body>
void for_each_chunk(const std::vector<Chunk>& chunks, const Body& body) {
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) body(c, chunks[c]);
  });
}

using Tile = std::array<char, kTile * sizeof(double)>;  // room for kTile elements of any acc_t

// Elements [offset, offset + n) of t, as acc_t: in place when t already holds acc_t, else converted into buf.
template <typename acc_t>
const acc_t* load_tile(const at::Tensor& t, int64_t offset, int64_t n, Tile& buf) {
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return t.const_data_ptr<acc_t>() + offset;
  auto* out = reinterpret_cast<acc_t*>(buf.data());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "load_tile", [&] {
    at::vec::convert(t.const_data_ptr<scalar_t>() + offset, out, n);
  });
  return out;
}

// Where a kernel writes n acc_t results destined for t[offset:]: t's memory itself when t holds acc_t, else buf;
// store_tile then rounds buf into t (once per element).
template <typename acc_t>
acc_t* output_tile(const at::Tensor& t, int64_t offset, Tile& buf) {
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return t.mutable_data_ptr<acc_t>() + offset;
  return reinterpret_cast<acc_t*>(buf.data());
}

template <typename acc_t>
void store_tile(const at::Tensor& t, int64_t offset, int64_t n, const acc_t* values) {
  if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value) return;  // written in place already
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "store_tile", [&] {
    at::vec::convert(values, t.mutable_data_ptr<scalar_t>() + offset, n);
  });
}

// Fixed-order pairwise sum: deterministic and with O(log n) error growth.
template <typename acc_t>
acc_t pairwise_sum(const acc_t* x, int64_t n) {
  if (n == 0) return acc_t(0);
  if (n == 1) return x[0];
  const int64_t half = n / 2;
  return pairwise_sum(x, half) + pairwise_sum(x + half, n - half);
}

// Horizontal sum of a vector register in lane order.
template <typename acc_t>
acc_t lane_sum(const at::vec::Vectorized<acc_t>& v) {
  std::array<acc_t, at::vec::Vectorized<acc_t>::size()> lanes;
  v.store(lanes.data());
  return pairwise_sum(lanes.data(), static_cast<int64_t>(lanes.size()));
}

}  // namespace fastforget::cpu
