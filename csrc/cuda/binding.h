// Host-side helpers shared by the CUDA bindings (*.cu here): checks, dtype codes and the metadata packing of
// multi_tensor.cuh. Includes torch; never included by the torch-free kernel headers.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <array>
#include <initializer_list>
#include <string>
#include <vector>

#include "../launch_checks.h"
#include "multi_tensor.cuh"

namespace fastforget {

// All tensors must be on tensors[0]'s device: one launch there reads every pointer.
inline void check_one_device(const char* name, at::TensorList tensors) {
  for (size_t i = 1; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == tensors[0].device(), "fastforget: ", name, "[", i, "] is on ",
                tensors[i].device(), " but ", name, "[0] is on ", tensors[0].device());
  }
}

// tensors[i] is on like[i]'s device (for lists whose lengths launch_checks.h checked).
inline void check_same_devices(const char* name, at::TensorList tensors, const char* like_name, at::TensorList like) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device() == like[i].device(), "fastforget: ", name, "[", i, "] is on ", tensors[i].device(),
                " but ", like_name, "[", i, "] is on ", like[i].device());
  }
}

// The gpu::DtypeCode of a dtype the kernels read, else checks::kUnsupported.
inline int64_t code_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return gpu::kFloat32;
    case at::kBFloat16: return gpu::kBFloat16;
    case at::kHalf: return gpu::kFloat16;
    case at::kDouble: return gpu::kFloat64;
    case at::kByte: return gpu::kUInt8;  // the codes of a block-wise 8-bit state
    default: return checks::kUnsupported;
  }
}

// A launch's tensor lists as launch_checks.h reads them (checks::LaunchLists): each tensor's shape, data pointer
// and dtype code, read off the tensors. raw() is valid while this object lives.
class HostLists {
 public:
  HostLists(std::initializer_list<at::TensorList> lists) {
    for (const at::TensorList& list : lists) {
      length_.push_back(static_cast<int64_t>(list.size()));
      for (const at::Tensor& t : list) {
        dim_.push_back(t.dim());
        sizes_.insert(sizes_.end(), t.sizes().begin(), t.sizes().end());
        ptr_.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
        dtype_.push_back(code_of(t.scalar_type()));
      }
    }
  }
  checks::LaunchLists raw() const {
    return {static_cast<int64_t>(length_.size()), length_.data(), dim_.data(), sizes_.data(), ptr_.data(),
            dtype_.data()};
  }

 private:
  std::vector<int64_t> length_, dim_, sizes_, ptr_, dtype_;
};

// Raises launch_checks.h's message, if any: the emulated launchers refuse the same metadata with the same text.
inline void check_launch(const std::string& message) { TORCH_CHECK(message.empty(), message); }

inline int64_t dtype_code(at::ScalarType type) {
  const int64_t code = code_of(type);
  TORCH_CHECK(code != checks::kUnsupported, "fastforget: unsupported dtype ", type);
  return code;
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
