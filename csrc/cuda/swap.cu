// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CUDA, all layers in grouped
// launches without host synchronisation: a validation kernel flags bad layers (out of range, not strictly
// increasing) in a device buffer, a one-thread kernel reports them in the device's error word
// (common.cuh), and the exchange kernel does nothing at all when any layer was flagged, so a bad patch
// writes nothing. The host never waits for the flags: the Python wrapper reads the error word (see
// sparse_sam/_ext.py). Tables are cached on the device, so a warmed-up call can be captured in a CUDA graph.
#include "common.cuh"

namespace sparse_sam::cuda {
namespace {

struct SwapGroup {
  const int64_t* weight;      // [L] weight pointers
  const int64_t* values;      // [L] value pointers
  const int64_t* indices;     // [L] index pointers
  const int64_t* info;        // [L] element size (bytes) | (index is int64) << 8
  const int64_t* numel;       // [L] weight numel
  const int64_t* entry_start; // [L + 1] exclusive prefix of entries per layer
  int L;
};

__device__ __forceinline__ int64_t load_index(const SwapGroup& g, int l, int64_t j) {
  return (g.info[l] >> 8) ? reinterpret_cast<const int64_t*>(g.indices[l])[j]
                          : static_cast<int64_t>(reinterpret_cast<const int32_t*>(g.indices[l])[j]);
}

// bad[l]: bit 0 = an index outside [0, numel), bit 1 = not strictly increasing; bad[L]: any layer is bad.
__global__ void validate_kernel(SwapGroup g, int64_t total, int* bad) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int l = find_layer(g.entry_start, g.L, e);
    const int64_t j = e - g.entry_start[l];
    const int64_t idx = load_index(g, l, j);
    int flags = (idx < 0 || idx >= g.numel[l]) ? 1 : 0;
    if (j > 0 && load_index(g, l, j - 1) >= idx) flags |= 2;
    if (flags) {
      atomicOr(bad + l, flags);
      atomicOr(bad + g.L, 1);
    }
  }
}

// One thread: the lowest bad layer (call-wide index) and its flags into the device's error word.
__global__ void report_kernel(int L, const int* bad, ErrorWord* err) {
  if (!bad[L]) return;
  for (int l = 0; l < L; ++l) {
    if (bad[l]) {
      report_error(err, kErrBadSwap, l, bad[l]);
      return;
    }
  }
}

template <typename U>
__device__ __forceinline__ void exchange(int64_t wp, int64_t vp, int64_t idx, int64_t j) {
  U* w = reinterpret_cast<U*>(wp) + idx;
  U* v = reinterpret_cast<U*>(vp) + j;
  const U old = *w;
  *w = *v;
  *v = old;
}

__global__ void swap_kernel(SwapGroup g, int64_t total, const int* bad) {
  if (bad[g.L]) return;  // a bad layer anywhere: write nothing
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int l = find_layer(g.entry_start, g.L, e);
    const int64_t j = e - g.entry_start[l];
    const int64_t idx = load_index(g, l, j);
    switch (g.info[l] & 0xff) {
      case 2: exchange<uint16_t>(g.weight[l], g.values[l], idx, j); break;
      case 4: exchange<uint32_t>(g.weight[l], g.values[l], idx, j); break;
      default: exchange<uint64_t>(g.weight[l], g.values[l], idx, j); break;
    }
  }
}

}  // namespace
}  // namespace sparse_sam::cuda

namespace sparse_sam {

void swap_cuda(at::TensorList weights, at::TensorList indices, at::TensorList values) {
  check_swap_meta(weights, indices, values);
  const int L = static_cast<int>(weights.size());
  if (L == 0) return;
  const at::Device device = weights[0].device();
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> idx(L);
  std::vector<int64_t> wp(L), vp(L), ip(L), info(L), numel(L), start(L + 1, 0);
  for (int l = 0; l < L; ++l) {
    idx[l] = indices[l].contiguous();
    wp[l] = reinterpret_cast<int64_t>(weights[l].data_ptr());
    vp[l] = reinterpret_cast<int64_t>(values[l].data_ptr());
    ip[l] = reinterpret_cast<int64_t>(idx[l].const_data_ptr());
    info[l] = weights[l].element_size() | (int64_t(idx[l].scalar_type() == at::kLong) << 8);
    numel[l] = weights[l].numel();
    start[l + 1] = start[l] + idx[l].numel();
  }
  const int64_t total = start[L];
  if (total == 0) return;
  auto d_wp = cuda::to_device(wp, device), d_vp = cuda::to_device(vp, device), d_ip = cuda::to_device(ip, device);
  auto d_info = cuda::to_device(info, device), d_numel = cuda::to_device(numel, device);
  auto d_start = cuda::to_device(start, device);
  const cuda::SwapGroup g{d_wp.data_ptr<int64_t>(), d_vp.data_ptr<int64_t>(), d_ip.data_ptr<int64_t>(),
                          d_info.data_ptr<int64_t>(), d_numel.data_ptr<int64_t>(), d_start.data_ptr<int64_t>(), L};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto bad = at::zeros({L + 1}, at::TensorOptions().device(device).dtype(at::kInt));
  cuda::validate_kernel<<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(g, total, bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::report_kernel<<<1, 1, 0, stream>>>(L, bad.data_ptr<int>(), cuda::error_word(device));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cuda::swap_kernel<<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(g, total, bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparse_sam
