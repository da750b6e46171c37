// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CPU, all layers in one
// call. Every layer is validated (range, strictly increasing) before the first write, so a bad patch
// leaves every tensor untouched even when the op is called directly through torch.ops.
#include "../sparse_sam.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

namespace sparse_sam {
namespace {

struct IndexStats {
  int64_t lo = std::numeric_limits<int64_t>::max();
  int64_t hi = std::numeric_limits<int64_t>::min();
  bool increasing = true;
};

template <typename I>
IndexStats index_stats(const I* idx, int64_t n) {
  IndexStats st;
  for (int64_t j = 0; j < n; ++j) {
    st.lo = std::min<int64_t>(st.lo, idx[j]);
    st.hi = std::max<int64_t>(st.hi, idx[j]);
  }
  for (int64_t j = 1; j < n; ++j) st.increasing &= idx[j] > idx[j - 1];
  return st;
}

template <typename U, typename I>
void swap_bits(U* __restrict__ w, const I* __restrict__ idx, U* __restrict__ val, int64_t n) {
  // Sorted indices scatter over the whole weight: prefetching a few entries ahead keeps several cache
  // misses in flight.
  constexpr int64_t kAhead = 16;
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      if (j + kAhead < e) __builtin_prefetch(w + idx[j + kAhead], 1);
      U* p = w + idx[j];
      const U old = *p;
      *p = val[j];
      val[j] = old;
    }
  });
}

template <typename U>
void swap_layer(const at::Tensor& w, const at::Tensor& idx, const at::Tensor& val) {
  U* wp = static_cast<U*>(w.data_ptr());
  U* vp = static_cast<U*>(val.data_ptr());
  if (idx.scalar_type() == at::kLong) swap_bits<U>(wp, idx.const_data_ptr<int64_t>(), vp, idx.numel());
  else swap_bits<U>(wp, idx.const_data_ptr<int32_t>(), vp, idx.numel());
}

}  // namespace

void swap_cpu(at::TensorList weights, at::TensorList indices, at::TensorList values) {
  check_swap_meta(weights, indices, values);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> idx(L);
  std::vector<IndexStats> stats(L);
  for (int64_t i = 0; i < L; ++i) idx[i] = indices[i].contiguous();
  at::parallel_for(0, L, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      stats[i] = idx[i].scalar_type() == at::kLong ? index_stats(idx[i].const_data_ptr<int64_t>(), idx[i].numel())
                                                   : index_stats(idx[i].const_data_ptr<int32_t>(), idx[i].numel());
    }
  });
  for (int64_t i = 0; i < L; ++i) {
    if (idx[i].numel() == 0) continue;
    const int64_t n = weights[i].numel();
    raise_bad_indices(i, n, stats[i].lo, stats[i].hi, stats[i].lo >= 0 && stats[i].hi < n, stats[i].increasing);
  }
  for (int64_t i = 0; i < L; ++i) {
    switch (weights[i].element_size()) {
      case 2: swap_layer<uint16_t>(weights[i], idx[i], values[i]); break;
      case 4: swap_layer<uint32_t>(weights[i], idx[i], values[i]); break;
      case 8: swap_layer<uint64_t>(weights[i], idx[i], values[i]); break;
      default: TORCH_CHECK(false, "swap_: unexpected element size");
    }
  }
}

}  // namespace sparse_sam
