// Helpers shared by the CUDA kernels: launch geometry, per-layer metadata tables, host <-> device copies.
#pragma once

#include "../sparse_sam.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

namespace sparse_sam::cuda {

constexpr int kThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid size for a grid-stride loop over n elements (bounded: the loop covers the rest).
inline unsigned int grid_for(int64_t n) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), 65535 * 8)));
}

// Copies a host table of int64 to the tensors' device (one small transfer per launch group).
inline at::Tensor to_device(const std::vector<int64_t>& host, const at::Device& device) {
  auto cpu = at::empty({static_cast<int64_t>(host.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(host.begin(), host.end(), cpu.data_ptr<int64_t>());
  return cpu.to(device);
}

// Layer owning global position `pos`, given the exclusive prefix `start` of per-layer sizes (L + 1 entries).
__device__ __forceinline__ int find_layer(const int64_t* start, int L, int64_t pos) {
  int lo = 0, hi = L - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= pos) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

}  // namespace sparse_sam::cuda
