// Host-side helpers shared by the CUDA bindings (*.cu here): checks, dtype codes and the metadata packing of
// multi_tensor.cuh. Includes torch; never included by the torch-free kernel headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <vector>

#include "multi_tensor.cuh"

namespace fastforget {

// All tensors must be on tensors[0]'s device: one launch there reads every pointer.
inline void check_one_device(const char* name, at::TensorList tensors) {
  for (size_t i = 1; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == tensors[0].device(), "fastforget: ", name, "[", i, "] is on ",
                tensors[i].device(), " but ", name, "[0] is on ", tensors[0].device());
  }
}

inline int64_t dtype_code(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return gpu::kFloat32;
    case at::kBFloat16: return gpu::kBFloat16;
    case at::kHalf: return gpu::kFloat16;
    case at::kDouble: return gpu::kFloat64;
    case at::kByte: return gpu::kUInt8;
    default: TORCH_CHECK(false, "fastforget: unsupported dtype ", type);
  }
}

struct DeviceMeta {
  at::Tensor words;  // the packed metadata, on the device (int64)
  int64_t num_blocks;
};

// Packs the per-tensor Meta records for Meta::kRoles roles (an empty role list leaves that role's pointer null)
// and the block map (gpu::pack_meta_words, which the CPU emulator's driver shares) into one pinned buffer, and
// queues a single asynchronous copy to the device of roles[0][0]. roles[0] sets the tensor count and the element
// counts; fill_extra(i, record) sets the words Meta adds to gpu::TensorMeta (gpu::SetIndex, gpu::SetFirstBlock,
// ...). All tensors must be contiguous and must stay alive until the kernels using the result are queued.
template <typename Meta, typename FillExtra = gpu::NoExtra>
DeviceMeta pack_meta(const std::array<at::TensorList, Meta::kRoles>& roles, FillExtra fill_extra = {}) {
  const at::TensorList first = roles[0];
  const auto n = static_cast<int64_t>(first.size());
  std::vector<int64_t> numel(n), ptr(Meta::kRoles * n, 0), dtype(Meta::kRoles * n, gpu::kFloat32);
  for (int64_t i = 0; i < n; ++i) {
    numel[i] = first[i].numel();
    for (int r = 0; r < Meta::kRoles; ++r) {
      if (roles[r].empty()) continue;
      ptr[r * n + i] = reinterpret_cast<int64_t>(roles[r][i].data_ptr());
      dtype[r * n + i] = dtype_code(roles[r][i].scalar_type());
    }
  }
  const int64_t num_blocks = gpu::planned_blocks(numel.data(), n);
  at::Tensor host =
      at::empty({gpu::meta_words<Meta>(n, num_blocks)}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  gpu::pack_meta_words<Meta>(host.data_ptr<int64_t>(), n, numel.data(), ptr.data(), dtype.data(), fill_extra);
  return {host.to(first[0].device(), /*non_blocking=*/true), num_blocks};
}

// pack_meta for plain gpu::TensorMeta<R> records.
template <int R>
DeviceMeta pack_meta(const std::array<at::TensorList, R>& roles) {
  return pack_meta<gpu::TensorMeta<R>>(roles);
}

}  // namespace fastforget
