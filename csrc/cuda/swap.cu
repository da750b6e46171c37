// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CUDA, all layers in two
// grouped launches: a validation kernel flags bad layers (out of range, not strictly increasing); the
// host reads the flags and raises before the exchange kernel is launched, so a bad patch writes nothing.
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

// bad[l]: bit 0 = an index outside [0, numel), bit 1 = not strictly increasing.
__global__ void validate_kernel(SwapGroup g, int64_t total, int* bad) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int l = find_layer(g.entry_start, g.L, e);
    const int64_t j = e - g.entry_start[l];
    const int64_t idx = load_index(g, l, j);
    int flags = (idx < 0 || idx >= g.numel[l]) ? 1 : 0;
    if (j > 0 && load_index(g, l, j - 1) >= idx) flags |= 2;
    if (flags) atomicOr(bad + l, flags);
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

__global__ void swap_kernel(SwapGroup g, int64_t total) {
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
  auto bad = at::zeros({L}, at::TensorOptions().device(device).dtype(at::kInt));
  cuda::validate_kernel<<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(g, total, bad.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto flags = bad.cpu();  // synchronises: nothing is written until every layer has passed
  for (int l = 0; l < L; ++l) {
    const int f = flags.data_ptr<int>()[l];
    if (f == 0) continue;
    // Min / max for the message only (error path).
    const int64_t lo = idx[l].min().item<int64_t>(), hi = idx[l].max().item<int64_t>();
    raise_bad_indices(l, numel[l], lo, hi, !(f & 1), !(f & 2));
  }
  cuda::swap_kernel<<<cuda::grid_for(total), cuda::kThreads, 0, stream>>>(g, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace sparse_sam
