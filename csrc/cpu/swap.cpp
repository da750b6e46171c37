// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CPU, all layers in one
// call. Every layer is validated (range, strictly increasing) before the first write, so a bad patch
// leaves every tensor untouched even when the op is called directly through torch.ops.
#include "../sparse_sam.h"
#include "parallel.h"

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
  if (n == 0) return st;
  int increasing = 1;
  for (int64_t j = 1; j < n; ++j) increasing &= idx[j] > idx[j - 1];
  st.increasing = increasing != 0;
  if (st.increasing) {  // the common case: the ends are the extremes
    st.lo = idx[0];
    st.hi = idx[n - 1];
    return st;
  }
  for (int64_t j = 0; j < n; ++j) {
    st.lo = std::min<int64_t>(st.lo, idx[j]);
    st.hi = std::max<int64_t>(st.hi, idx[j]);
  }
  return st;
}

// Exchanges entries [b, e) of a layer with n entries.
template <typename U, typename I>
void swap_bits(U* __restrict__ w, const I* __restrict__ idx, U* __restrict__ val, int64_t b, int64_t e,
               int64_t n) {
  // Sorted indices scatter over the whole weight: prefetching a few entries ahead keeps several cache
  // misses in flight. Blocks of one layer run back to back or on other threads, so the look-ahead runs
  // to the layer's end, not the block's, and starts before the block's first entry.
  constexpr int64_t kAhead = 64;
  for (int64_t j = b; j < std::min(b + kAhead, n); ++j) __builtin_prefetch(w + idx[j], 1);
  for (int64_t j = b; j < e; ++j) {
    if (j + kAhead < n) __builtin_prefetch(w + idx[j + kAhead], 1);
    U* p = w + idx[j];
    const U old = *p;
    *p = val[j];
    val[j] = old;
  }
}

template <typename U>
void swap_range(const at::Tensor& w, const at::Tensor& idx, const at::Tensor& val, int64_t b, int64_t e) {
  U* wp = static_cast<U*>(w.data_ptr());
  U* vp = static_cast<U*>(val.data_ptr());
  const int64_t n = idx.numel();
  if (idx.scalar_type() == at::kLong) swap_bits<U>(wp, idx.const_data_ptr<int64_t>(), vp, b, e, n);
  else swap_bits<U>(wp, idx.const_data_ptr<int32_t>(), vp, b, e, n);
}

}  // namespace

void swap_cpu(at::TensorList weights, at::TensorList indices, at::TensorList values) {
  check_swap_meta(weights, indices, values);
  const int64_t L = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> idx(L);
  std::vector<IndexStats> stats(L);
  for (int64_t i = 0; i < L; ++i) idx[i] = indices[i].contiguous();
  // Validation reads the indices once, sequentially: cheap next to the scattered exchange, so it runs
  // on this thread (a parallel region costs more than it saves when the machine is busy).
  for (int64_t i = 0; i < L; ++i) {
    stats[i] = idx[i].scalar_type() == at::kLong ? index_stats(idx[i].const_data_ptr<int64_t>(), idx[i].numel())
                                                 : index_stats(idx[i].const_data_ptr<int32_t>(), idx[i].numel());
  }
  for (int64_t i = 0; i < L; ++i) {
    if (idx[i].numel() == 0) continue;
    const int64_t n = weights[i].numel();
    raise_bad_indices(i, n, stats[i].lo, stats[i].hi, stats[i].lo >= 0 && stats[i].hi < n, stats[i].increasing);
  }
  // The entries of all layers in blocks shared between threads (parallel.h), from 2 blocks on: the
  // exchange waits on cache misses, so two threads nearly halve it.
  constexpr int64_t kBlockEntries = int64_t(1) << 14;
  std::vector<int64_t> start(L + 1, 0);
  for (int64_t i = 0; i < L; ++i) start[i + 1] = start[i] + idx[i].numel();
  auto block = [&](int64_t blk) {
    const int64_t b = blk * kBlockEntries, e = std::min(start[L], b + kBlockEntries);
    int64_t i = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (; i < L && start[i] < e; ++i) {
      const int64_t lb = std::max(b, start[i]) - start[i], le = std::min(e, start[i + 1]) - start[i];
      if (lb >= le) continue;
      switch (weights[i].element_size()) {
        case 2: swap_range<uint16_t>(weights[i], idx[i], values[i], lb, le); break;
        case 4: swap_range<uint32_t>(weights[i], idx[i], values[i], lb, le); break;
        default: swap_range<uint64_t>(weights[i], idx[i], values[i], lb, le); break;
      }
    }
  };
  share_items((start[L] + kBlockEntries - 1) / kBlockEntries, block);
}

}  // namespace sparse_sam
