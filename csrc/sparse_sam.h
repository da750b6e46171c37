// Declarations shared by the CPU and CUDA implementations of the sparse_sam ops, plus the host-side
// argument checks both run before touching data. Semantics: sparse_sam/reference.py.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

namespace sparse_sam {

// ---------------------------------------------------------------------------------------------------
// Order-preserving integer keys for top-k: for non-NaN a, b (with -0.0 == +0.0),
// a > b  <=>  order_key(bits(a)) > order_key(bits(b)) as unsigned integers.
template <typename U, U InfBits>
struct KeyTraits {
  using key_t = U;
  static constexpr int kBits = 8 * sizeof(U);
  static constexpr U kSign = U(U(1) << (kBits - 1));
  static constexpr U kInf = InfBits;
};
using F32Keys = KeyTraits<uint32_t, 0x7f800000u>;
using F64Keys = KeyTraits<uint64_t, 0x7ff0000000000000ull>;
using F16Keys = KeyTraits<uint16_t, 0x7c00u>;
using BF16Keys = KeyTraits<uint16_t, 0x7f80u>;

#if defined(__CUDACC__)
#define SPARSE_SAM_HD __host__ __device__ __forceinline__
#else
#define SPARSE_SAM_HD inline
#endif

template <typename T>
SPARSE_SAM_HD bool key_is_nan(typename T::key_t u) {
  return typename T::key_t(u & typename T::key_t(~T::kSign)) > T::kInf;
}

// Branch-free so that CPU loops over it vectorise: negative floats flip all bits, others the sign bit.
template <typename T>
SPARSE_SAM_HD typename T::key_t order_key(typename T::key_t u) {
  using U = typename T::key_t;
  using S = std::make_signed_t<U>;
  u = (u == T::kSign) ? U(0) : u;  // -0.0 ties with +0.0
  const U negative = static_cast<U>(static_cast<S>(u) >> (T::kBits - 1));
  return U(u ^ (negative | T::kSign));
}

// Calls f(KeyTraits{}) for the key traits of a floating dtype.
template <typename F>
void dispatch_keys(at::ScalarType st, const char* what, F&& f) {
  switch (st) {
    case at::kFloat: f(F32Keys{}); break;
    case at::kDouble: f(F64Keys{}); break;
    case at::kHalf: f(F16Keys{}); break;
    case at::kBFloat16: f(BF16Keys{}); break;
    default: TORCH_CHECK_TYPE(false, what, ": unsupported dtype ", st);
  }
}

// Accumulation type of an elementwise op over the given storage types: torch evaluates float16 and
// bfloat16 arithmetic in float and rounds once, so float unless a double is involved.
template <typename... Ts>
using acc_type_t = std::conditional_t<(std::is_same_v<Ts, double> || ...), double, float>;

// ---------------------------------------------------------------------------------------------------
// dtype dispatch of sam_weight (both backends): f.template operator()<W, V>() for the forward and
// f.template operator()<G, V, S>() for the backward, so callers pass `[&]<typename w_t, ...>() {...}`.
template <typename T>
struct type_tag {
  using type = T;
};

// The ops check dtypes first (is_float_dtype), with messages naming the op and the argument.
template <typename F>
void dispatch_float(at::ScalarType st, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "sam_weight", [&] { f(type_tag<scalar_t>{}); });
}

template <typename F>
void dispatch_sam_weight_forward(at::ScalarType w, at::ScalarType v, F&& f) {
  dispatch_float(w, [&](auto wt) {
    dispatch_float(v, [&](auto vt) {
      f.template operator()<typename decltype(wt)::type, typename decltype(vt)::type>();
    });
  });
}

template <typename F>
void dispatch_sam_weight_backward(at::ScalarType g, at::ScalarType v, at::ScalarType s, F&& f) {
  dispatch_float(g, [&](auto gt) {
    dispatch_float(v, [&](auto vt) {
      dispatch_float(s, [&](auto st) {
        f.template operator()<typename decltype(gt)::type, typename decltype(vt)::type,
                              typename decltype(st)::type>();
      });
    });
  });
}

// ---------------------------------------------------------------------------------------------------
// Host-side checks (metadata only; the data-dependent checks run in each backend before any write).
inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16;
}

inline void check_topk_args(at::TensorList scores, at::IntArrayRef ks) {
  TORCH_CHECK_VALUE(scores.size() == ks.size(), "topk_mask: got ", scores.size(), " score tensors but ",
                    ks.size(), " budgets");
  for (size_t i = 0; i < scores.size(); ++i) {
    TORCH_CHECK_TYPE(is_float_dtype(scores[i].scalar_type()), "topk_mask: scores of layer #", i,
                     " have dtype ", scores[i].scalar_type(), ", expected a floating dtype");
    TORCH_CHECK_VALUE(ks[i] >= 0 && ks[i] <= scores[i].numel(), "topk_mask: k=", ks[i], " for layer #", i,
                      " is outside [0, ", scores[i].numel(), "]");
    TORCH_CHECK_VALUE(scores[i].device() == scores[0].device(), "topk_mask: layer #", i, " is on ",
                      scores[i].device(), " but layer #0 is on ", scores[0].device());
  }
}

inline void check_sam_weight_args(const char* op, const at::Tensor& a, const at::Tensor& mask,
                                  const at::Tensor& delta) {
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK_TYPE(is_float_dtype(a.scalar_type()) && is_float_dtype(delta.scalar_type()), op,
                   ": unsupported dtypes ", a.scalar_type(), " / ", delta.scalar_type());
  TORCH_CHECK_VALUE(a.sizes() == mask.sizes() && a.sizes() == delta.sizes(), op,
                    ": shapes differ: ", a.sizes(), " vs mask ", mask.sizes(), " vs delta ", delta.sizes());
  TORCH_CHECK_VALUE(a.device() == mask.device() && a.device() == delta.device(), op,
                    ": tensors must share a device");
}

inline void check_sam_weight_backward_args(const at::Tensor& grad, const at::Tensor& mask,
                                           const at::Tensor& delta, at::ScalarType scores_dtype) {
  check_sam_weight_args("sam_weight_backward", grad, mask, delta);
  TORCH_CHECK_TYPE(is_float_dtype(scores_dtype), "sam_weight_backward: unsupported scores dtype ", scores_dtype);
}

inline void check_swap_meta(at::TensorList weights, at::TensorList indices, at::TensorList values) {
  TORCH_CHECK_VALUE(weights.size() == indices.size() && weights.size() == values.size(), "swap_: got ",
                    weights.size(), " weights, ", indices.size(), " index and ", values.size(),
                    " value tensors; they must match");
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto &w = weights[i], &idx = indices[i], &val = values[i];
    TORCH_CHECK_VALUE(w.is_contiguous(), "swap_: weight of layer #", i, " is not contiguous");
    TORCH_CHECK_TYPE(is_float_dtype(w.scalar_type()), "swap_: unsupported weight dtype ", w.scalar_type(),
                     " in layer #", i);
    TORCH_CHECK_VALUE((idx.scalar_type() == at::kInt || idx.scalar_type() == at::kLong) && idx.dim() == 1,
                      "swap_: indices of layer #", i, " must be a 1-D int32/int64 tensor, got ",
                      idx.scalar_type(), " of shape ", idx.sizes());
    TORCH_CHECK_VALUE(val.scalar_type() == w.scalar_type() && val.sizes() == idx.sizes(),
                      "swap_: values of layer #", i, " must be ", w.scalar_type(), " of shape ", idx.sizes(),
                      ", got ", val.scalar_type(), " of shape ", val.sizes());
    TORCH_CHECK_VALUE(idx.device() == w.device() && val.device() == w.device(), "swap_: layer #", i,
                      ": weight, indices and values must share a device");
    TORCH_CHECK_VALUE(val.is_contiguous(), "swap_: values of layer #", i, " are not contiguous");
    TORCH_CHECK_VALUE(w.device() == weights[0].device(), "swap_: layer #", i, " is on ", w.device(),
                      " but layer #0 is on ", weights[0].device());
  }
}

// Raises the error for a layer whose indices failed the data checks (shared wording CPU/CUDA).
inline void raise_bad_indices(size_t layer, int64_t numel, int64_t lo, int64_t hi, bool in_range,
                              bool increasing) {
  TORCH_CHECK_VALUE(in_range, "swap_: indices of layer #", layer, " fall outside [0, ", numel, "): min ", lo,
                    ", max ", hi);
  TORCH_CHECK_VALUE(increasing, "swap_: indices of layer #", layer,
                    " are not strictly increasing (unsorted or duplicate)");
}

// ---------------------------------------------------------------------------------------------------
// A fresh contiguous CPU tensor for an op's output; large ones come from a cache of freed blocks
// (csrc/cpu/alloc.cpp). Stats: {cached bytes, limit bytes, hits, misses}.
at::Tensor empty_output_cpu(at::IntArrayRef sizes, at::ScalarType dtype);
std::vector<int64_t> cpu_cache_stats();
void cpu_cache_clear();

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks);
at::Tensor sam_weight_forward_cpu(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& delta);
std::tuple<at::Tensor, at::Tensor> sam_weight_backward_cpu(const at::Tensor& grad, const at::Tensor& mask,
                                                           const at::Tensor& delta, at::ScalarType scores_dtype,
                                                           bool dense);
void swap_cpu(at::TensorList weights, at::TensorList indices, at::TensorList values);

#ifdef SPARSE_SAM_WITH_CUDA
std::vector<at::Tensor> topk_mask_cuda(at::TensorList scores, at::IntArrayRef ks);
at::Tensor sam_weight_forward_cuda(const at::Tensor& weight, const at::Tensor& mask, const at::Tensor& delta);
std::tuple<at::Tensor, at::Tensor> sam_weight_backward_cuda(const at::Tensor& grad, const at::Tensor& mask,
                                                            const at::Tensor& delta, at::ScalarType scores_dtype,
                                                            bool dense);
void swap_cuda(at::TensorList weights, at::TensorList indices, at::TensorList values);
// Reads and clears the device's error word: {code, lowest layer or -1, swap flags} (csrc/cuda/status.cu).
std::vector<int64_t> cuda_take_error(int64_t device_index);
#endif

}  // namespace sparse_sam
