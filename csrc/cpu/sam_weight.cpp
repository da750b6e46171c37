// W_eff = where(m, W + v, W) and its fused backward on CPU, one pass each.
#include "../sparse_sam.h"

#include <ATen/Parallel.h>

#include <bit>

namespace sparse_sam {
namespace {

constexpr int64_t kGrain = int64_t(1) << 15;

// The mask is read as bytes: bool loads are not vectorised by the compiler.
const uint8_t* mask_bytes(const at::Tensor& m) { return reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>()); }

template <typename w_t, typename v_t>
void forward_kernel(const w_t* __restrict__ w, const uint8_t* __restrict__ m, const v_t* __restrict__ v,
                    w_t* __restrict__ out, int64_t n) {
  using acc_t = acc_type_t<w_t, v_t>;
  using bits_t = std::conditional_t<sizeof(w_t) == 8, uint64_t, std::conditional_t<sizeof(w_t) == 4, uint32_t, uint16_t>>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      // Where m is 0 the stored bits of W pass through (W + 0 would turn -0.0 into +0.0). The select
      // is done on the bits: a floating select is not if-converted (vectorised) by the compiler.
      const w_t wi = w[i];
      const w_t added = static_cast<w_t>(static_cast<acc_t>(wi) + static_cast<acc_t>(v[i]));
      const bits_t take = bits_t(0) - bits_t(m[i] != 0);
      const bits_t r = (std::bit_cast<bits_t>(added) & take) | (std::bit_cast<bits_t>(wi) & bits_t(~take));
      out[i] = std::bit_cast<w_t>(r);
    }
  });
}

template <typename g_t, typename v_t, typename s_t>
void backward_kernel(const g_t* __restrict__ g, const uint8_t* __restrict__ m, const v_t* __restrict__ v,
                     v_t* __restrict__ gd, s_t* __restrict__ gs, int64_t n, bool dense) {
  // promote(s, g, v) is s itself, float or double; in every case rounding the product once from acc_t
  // to s_t equals the reference's multiply-in-promoted-dtype-then-cast.
  using acc_t = acc_type_t<g_t, v_t, s_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (dense) {
      for (int64_t i = b; i < e; ++i) gd[i] = static_cast<v_t>(g[i]);
    } else {
      for (int64_t i = b; i < e; ++i) {
        const v_t gi = static_cast<v_t>(g[i]);
        gd[i] = m[i] != 0 ? gi : v_t(0);
      }
    }
    for (int64_t i = b; i < e; ++i) gs[i] = static_cast<s_t>(static_cast<acc_t>(g[i]) * static_cast<acc_t>(v[i]));
  });
}

}  // namespace

at::Tensor sam_weight_forward_cpu(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& delta) {
  check_sam_weight_args("sam_weight_forward", weight, mask, delta);
  const auto w = weight.contiguous(), m = mask.contiguous(), v = delta.contiguous();
  auto out = empty_output_cpu(weight.sizes(), weight.scalar_type());
  dispatch_sam_weight_forward(w.scalar_type(), v.scalar_type(), [&]<typename w_t, typename v_t>() {
    forward_kernel<w_t, v_t>(w.const_data_ptr<w_t>(), mask_bytes(m), v.const_data_ptr<v_t>(), out.data_ptr<w_t>(),
                             w.numel());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sam_weight_backward_cpu(const at::Tensor& grad, const at::Tensor& mask,
                                                           const at::Tensor& delta, at::ScalarType scores_dtype,
                                                           bool dense) {
  check_sam_weight_backward_args(grad, mask, delta, scores_dtype);
  const auto g = grad.contiguous(), m = mask.contiguous(), v = delta.contiguous();
  auto gd = empty_output_cpu(v.sizes(), v.scalar_type());
  auto gs = empty_output_cpu(v.sizes(), scores_dtype);
  dispatch_sam_weight_backward(g.scalar_type(), v.scalar_type(), scores_dtype, [&]<typename g_t, typename v_t, typename s_t>() {
    backward_kernel<g_t, v_t, s_t>(g.const_data_ptr<g_t>(), mask_bytes(m), v.const_data_ptr<v_t>(),
                                   gd.data_ptr<v_t>(), gs.data_ptr<s_t>(), v.numel(), dense);
  });
  return {gd, gs};
}

}  // namespace sparse_sam
