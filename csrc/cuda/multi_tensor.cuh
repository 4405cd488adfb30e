// Torch-free building blocks for "multi-tensor apply" kernels: one launch covers a whole list of tensors.
//
// The host packs one int64 metadata buffer, copies it to the device, and launches one block per chunk:
//
//   [ Meta x num_tensors ][ BlockMeta x num_blocks ]
//
// Meta is TensorMeta<R>, or an op's struct that extends it with words of its own (fisher_update.cuh appends
// one). TensorMeta<R> describes tensor i in each of R roles (e.g. param, anchor, fisher, grad): a data pointer
// and a DtypeCode per role, plus the element count of role 0 (for most ops, that of every role). BlockMeta maps
// block b to (tensor index, chunk start); block b handles elements [begin, min(begin + kChunkSize, numel)) of
// that tensor. Every field is an int64, so the structs have no padding and alias the buffer directly; Meta::kWords
// is the record's size in words.
//
// Dtypes may differ between tensors (and roles) of one launch: each element is loaded through a switch on its
// dtype code, which is uniform across a block, so the branch never diverges.
//
// Reductions are deterministic (no atomics): each block reduces its chunk with a fixed tree and writes one
// partial; a single block then sums the partials in a fixed order (launch_sum_partials), or an op merges them
// in its own fixed order (grad_moments.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace fastforget::gpu {

constexpr int kBlockThreads = 256;
constexpr int64_t kChunkSize = 4096;        // elements per block: 16 per thread
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x limit

// kUInt8: the codes of a block-wise 8-bit state (read by the op's kernel itself, never by load/store).
enum DtypeCode : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3, kUInt8 = 4 };

template <int R>
struct TensorMeta {
  static constexpr int kRoles = R;
  static constexpr int64_t kWords = 1 + 2 * R;
  int64_t numel;
  int64_t ptr[R];    // data pointer of each role, as an integer (0 when a role is unused)
  int64_t dtype[R];  // DtypeCode of each role
};

struct BlockMeta {
  int64_t tensor;  // index into the TensorMeta array
  int64_t begin;   // first element of this block's chunk
};

static_assert(sizeof(TensorMeta<4>) == TensorMeta<4>::kWords * sizeof(int64_t), "TensorMeta must be unpadded");
static_assert(sizeof(BlockMeta) == 2 * sizeof(int64_t), "BlockMeta must be unpadded");
static_assert(sizeof(void*) == sizeof(int64_t), "pointers are stored as int64");

// ---------------------------------------------------------------------------------------------- host side

__host__ __device__ inline int64_t num_chunks(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

template <typename Meta>
inline int64_t meta_words(int64_t num_tensors, int64_t num_blocks) {
  return num_tensors * Meta::kWords + num_blocks * 2;
}

// Given the Meta records already written at the front of `words`, appends the block map: the chunks of tensor 0
// in order, then those of tensor 1, ... (num_chunks(numel) blocks per tensor; none if it is empty).
template <typename Meta>
inline void plan_blocks(int64_t* words, int64_t num_tensors) {
  const auto* tensors = reinterpret_cast<const Meta*>(words);
  auto* block = reinterpret_cast<BlockMeta*>(words + num_tensors * Meta::kWords);
  for (int64_t t = 0; t < num_tensors; ++t) {
    for (int64_t begin = 0; begin < tensors[t].numel; begin += kChunkSize) *block++ = {t, begin};
  }
}

// The number of blocks plan_blocks plans for tensors of numel[0 .. num_tensors) elements.
inline int64_t planned_blocks(const int64_t* numel, int64_t num_tensors) {
  int64_t blocks = 0;
  for (int64_t t = 0; t < num_tensors; ++t) blocks += num_chunks(numel[t]);
  return blocks;
}

// fill_extra for records that add nothing to TensorMeta.
struct NoExtra {
  template <typename Meta>
  void operator()(int64_t, Meta&) const {}
};

// fill_extra for records with an `index` word: the tensor's index in the list (its row of per-tensor arguments).
struct SetIndex {
  template <typename Meta>
  void operator()(int64_t i, Meta& m) const {
    m.index = i;
  }
};

// fill_extra for records with a `first_block` word: the index of the tensor's first block in the block map (its
// chunks are blocks first_block, first_block + 1, ...; plan_blocks lists the tensors' chunks in list order).
struct SetFirstBlock {
  int64_t next = 0;
  template <typename Meta>
  void operator()(int64_t, Meta& m) {
    m.first_block = next;
    next += num_chunks(m.numel);
  }
};

// The whole host-side packing, shared by the CUDA bindings (binding.h) and the emulator's driver (csrc/emu): writes
// num_tensors Meta records and the block map into `words` (meta_words<Meta>(num_tensors, planned_blocks(numel,
// num_tensors)) words). Record i describes tensor i: numel[i] elements and, in role r, the data pointer
// ptr[r * num_tensors + i] and DtypeCode dtype[r * num_tensors + i] (pointer 0 for a role not given). After its
// TensorMeta fields, fill_extra(i, record) sets the words Meta adds.
template <typename Meta, typename FillExtra = NoExtra>
inline void pack_meta_words(int64_t* words, int64_t num_tensors, const int64_t* numel, const int64_t* ptr,
                            const int64_t* dtype, FillExtra fill_extra = {}) {
  auto* records = reinterpret_cast<Meta*>(words);
  for (int64_t i = 0; i < num_tensors; ++i) {
    records[i].numel = numel[i];
    for (int r = 0; r < Meta::kRoles; ++r) {
      records[i].ptr[r] = ptr[r * num_tensors + i];
      records[i].dtype[r] = dtype[r * num_tensors + i];
    }
    fill_extra(i, records[i]);
  }
  plan_blocks<Meta>(words, num_tensors);
}

// Queues kernel<<<grid, kBlockThreads, 0, stream>>>(args...). Every launch goes through here, by CUDA's typed
// launch API (cudaLaunchKernelEx converts args to the kernel's parameter types, as <<<>>> does): one source for
// nvcc and for the CPU emulator (csrc/emu/cuda_emu.h), which implements the same API.
template <typename... KernelArgs, typename... Args>
cudaError_t launch_kernel(void (*kernel)(KernelArgs...), int64_t grid, cudaStream_t stream, Args... args) {
  if (grid > kMaxBlocks) return cudaErrorInvalidConfiguration;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(kBlockThreads);
  config.stream = stream;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

// Launches `kernel` with one kBlockThreads-thread block per planned chunk (nothing to do for zero blocks).
template <typename... KernelArgs, typename... Args>
cudaError_t launch_blocks(void (*kernel)(KernelArgs...), int64_t num_blocks, cudaStream_t stream, Args... args) {
  if (num_blocks == 0) return cudaSuccess;
  return launch_kernel(kernel, num_blocks, stream, args...);
}

// -------------------------------------------------------------------------------------------- device side

// The calling block's chunk: its tensor's record and the element range [begin, end) it handles.
template <typename Meta>
struct Chunk {
  Meta t;
  int64_t begin;
  int64_t end;
};

template <typename Meta>
__device__ __forceinline__ Chunk<Meta> block_chunk(const int64_t* words, int64_t num_tensors) {
  const auto* tensors = reinterpret_cast<const Meta*>(words);
  const auto* blocks = reinterpret_cast<const BlockMeta*>(words + num_tensors * Meta::kWords);
  const BlockMeta b = blocks[blockIdx.x];
  const Meta t = tensors[b.tensor];
  return {t, b.begin, t.numel - b.begin < kChunkSize ? t.numel : b.begin + kChunkSize};
}

__device__ __forceinline__ __nv_bfloat16 to_bfloat16(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ __nv_bfloat16 to_bfloat16(double v) { return __double2bfloat16(v); }
__device__ __forceinline__ __half to_half(float v) { return __float2half(v); }
__device__ __forceinline__ __half to_half(double v) { return __double2half(v); }

// Element i of the `role` tensor as acc_t (float or double). Exact, except a float64 element read as float.
template <typename acc_t, int R>
__device__ __forceinline__ acc_t load(const TensorMeta<R>& t, int role, int64_t i) {
  const int64_t p = t.ptr[role];
  switch (t.dtype[role]) {
    case kBFloat16: return static_cast<acc_t>(__bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p)[i]));
    case kFloat16: return static_cast<acc_t>(__half2float(reinterpret_cast<const __half*>(p)[i]));
    case kFloat64: return static_cast<acc_t>(reinterpret_cast<const double*>(p)[i]);
    default: return static_cast<acc_t>(reinterpret_cast<const float*>(p)[i]);
  }
}

// Stores v as element i of the `role` tensor, rounded once (to nearest even) to that tensor's dtype.
template <typename acc_t, int R>
__device__ __forceinline__ void store(const TensorMeta<R>& t, int role, int64_t i, acc_t v) {
  const int64_t p = t.ptr[role];
  switch (t.dtype[role]) {
    case kBFloat16: reinterpret_cast<__nv_bfloat16*>(p)[i] = to_bfloat16(v); break;
    case kFloat16: reinterpret_cast<__half*>(p)[i] = to_half(v); break;
    case kFloat64: reinterpret_cast<double*>(p)[i] = static_cast<double>(v); break;
    default: reinterpret_cast<float*>(p)[i] = static_cast<float>(v); break;
  }
}

// Sum over a warp with a fixed shuffle-down tree; the total is valid in lane 0.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_reduce_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over a kBlockThreads-thread block in a fixed order (each warp's tree, then the warp totals in warp
// order); the total is valid in thread 0. warp_sums is not guarded for reuse: a kernel calls this at most once,
// after any number of block_allreduce_sum calls (whose final barrier follows warp 0's reads of warp_sums).
template <typename acc_t>
__device__ __forceinline__ acc_t block_reduce_sum(acc_t v) {
  constexpr int kWarps = kBlockThreads / 32;
  static_assert(kBlockThreads % 32 == 0 && kWarps <= 32, "block must be whole warps, at most 32");
  __shared__ acc_t warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  v = warp_reduce_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_reduce_sum(lane < kWarps ? warp_sums[lane] : acc_t(0));
  return v;
}

// block_reduce_sum's total, returned to every thread of the block. May be called any number of times per kernel.
template <typename acc_t>
__device__ __forceinline__ acc_t block_allreduce_sum(acc_t v) {
  __shared__ acc_t total;
  v = block_reduce_sum(v);
  if (threadIdx.x == 0) total = v;
  __syncthreads();
  return total;
}

// One block: *out = scale * sum(partials[0 .. n)). Thread k sums partials k, k + kBlockThreads, ... in order,
// then block_reduce_sum combines the threads, so the result depends only on the inputs.
template <typename acc_t>
__global__ void __launch_bounds__(kBlockThreads)
    sum_partials_kernel(const acc_t* partials, int64_t n, acc_t scale, acc_t* out) {
  acc_t sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) sum += partials[i];
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) *out = scale * sum;
}

// Queues *out = scale * sum(partials) (scale * 0 for n == 0) on `stream`.
template <typename acc_t>
cudaError_t launch_sum_partials(const acc_t* partials, int64_t n, acc_t scale, acc_t* out, cudaStream_t stream) {
  return launch_kernel(sum_partials_kernel<acc_t>, 1, stream, partials, n, scale, out);
}

}  // namespace fastforget::gpu
