// W_eff = where(m, W + v, W) and its fused backward on CUDA: one elementwise pass each, same arithmetic
// and rounding as the CPU kernels (csrc/cpu/sam_weight.cpp).
#include "common.cuh"

namespace sparse_sam::cuda {
namespace {

template <typename w_t, typename v_t>
__global__ void forward_kernel(const w_t* __restrict__ w, const bool* __restrict__ m, const v_t* __restrict__ v,
                               w_t* __restrict__ out, int64_t n) {
  using acc_t = acc_type_t<w_t, v_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    // Where m is 0 the stored bits of W pass through (W + 0 would turn -0.0 into +0.0).
    out[i] = m[i] ? static_cast<w_t>(static_cast<acc_t>(w[i]) + static_cast<acc_t>(v[i])) : w[i];
  }
}

template <typename g_t, typename v_t, typename s_t>
__global__ void backward_kernel(const g_t* __restrict__ g, const bool* __restrict__ m, const v_t* __restrict__ v,
                                v_t* __restrict__ gd, s_t* __restrict__ gs, int64_t n, bool dense) {
  using acc_t = acc_type_t<g_t, v_t, s_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const g_t gi = g[i];
    gd[i] = (dense || m[i]) ? static_cast<v_t>(gi) : v_t(0);
    gs[i] = static_cast<s_t>(static_cast<acc_t>(gi) * static_cast<acc_t>(v[i]));
  }
}

}  // namespace
}  // namespace sparse_sam::cuda

namespace sparse_sam {

at::Tensor sam_weight_forward_cuda(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& delta) {
  check_sam_weight_args("sam_weight_forward", weight, mask, delta);
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto w = weight.contiguous(), m = mask.contiguous(), v = delta.contiguous();
  auto out = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = w.numel();
  if (n == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_sam_weight_forward(w.scalar_type(), v.scalar_type(), [&]<typename w_t, typename v_t>() {
    cuda::forward_kernel<w_t, v_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        w.const_data_ptr<w_t>(), m.const_data_ptr<bool>(), v.const_data_ptr<v_t>(), out.data_ptr<w_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sam_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& mask,
                                                            const at::Tensor& delta, at::ScalarType scores_dtype,
                                                            bool dense) {
  check_sam_weight_backward_args(grad, mask, delta, scores_dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  const auto g = grad.contiguous(), m = mask.contiguous(), v = delta.contiguous();
  auto gd = at::empty(v.sizes(), v.options());
  auto gs = at::empty(v.sizes(), v.options().dtype(scores_dtype));
  const int64_t n = v.numel();
  if (n == 0) return {gd, gs};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_sam_weight_backward(g.scalar_type(), v.scalar_type(), scores_dtype, [&]<typename g_t, typename v_t, typename s_t>() {
    cuda::backward_kernel<g_t, v_t, s_t><<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(
        g.const_data_ptr<g_t>(), m.const_data_ptr<bool>(), v.const_data_ptr<v_t>(), gd.data_ptr<v_t>(),
        gs.data_ptr<s_t>(), n, dense);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gd, gs};
}

}  // namespace sparse_sam
