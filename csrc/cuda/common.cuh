// Helpers shared by the CUDA kernels: launch geometry, per-layer metadata tables (cached on the device, so a
// warmed-up call copies nothing from the host), and the per-device error word through which kernels report
// bad input without the host ever waiting for them.
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

// A host table of int64 on the tensors' device. Tables are cached by content and device (the addresses
// and sizes of a model's layers do not change between steps), so a repeated call launches no copy; a new
// table is copied from pinned memory without blocking the host (csrc/cuda/status.cu).
at::Tensor to_device(const std::vector<int64_t>& host, const at::Device& device);

// Error codes of the per-device error word (bits of ErrorWord::code).
constexpr int kErrNanScores = 1;  // topk_mask: a layer's scores contain NaN (its mask is unspecified)
constexpr int kErrBadSwap = 2;    // swap_: a layer's indices failed validation (nothing was written)

// One per device, in host-mapped pinned memory: kernels set it with system-scope atomics and the host
// reads it with a plain load, so checking never blocks (it sees a kernel's report once that kernel has
// run). `layer` is the lowest offending layer index (INT_MAX: none); `flags` are swap's validation bits
// (1 = an index outside [0, numel), 2 = not strictly increasing).
struct ErrorWord {
  int code;
  int layer;
  int flags;
  int pad;
};

// The device's error word (same address on host and device under unified addressing); allocated on
// first use, before any capture when a warm-up call precedes it.
ErrorWord* error_word(const at::Device& device);

// Reports an error from device code: the lowest offending layer wins.
__device__ __forceinline__ void report_error(ErrorWord* err, int code, int layer, int flags) {
  atomicOr_system(&err->code, code);
  atomicMin_system(&err->layer, layer);
  if (flags) atomicOr_system(&err->flags, flags);
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
