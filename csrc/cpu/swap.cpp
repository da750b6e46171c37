// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CPU, all layers in one
// call. Every layer is validated (range, strictly increasing) before the first write, so a bad patch
// leaves every tensor untouched even when the op is called directly through torch.ops.
//
// SwapPlanCpu (torch.classes.sparse_sam.SwapPlan) is the same exchange for a patch prepared once:
// validated when it is made, then each swap() checks only that no weight was written or reallocated
// (O(L) version and pointer compares), bumps the weights' version counters like any in-place write, and
// can compare the bits it takes out with the base bits they must be, in the same pass.
#include "../sparse_sam.h"
#include "parallel.h"
#include "swap_plan.h"

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

// Exchanges entries [b, e) of a layer with n entries. With kCheck, also compares the bits taken out of
// the weight with expect[j]; returns whether all of them matched (always true without).
template <bool kCheck, typename U, typename I>
bool swap_bits(U* __restrict__ w, const I* __restrict__ idx, U* __restrict__ val, const U* __restrict__ expect,
               int64_t b, int64_t e, int64_t n) {
  // Sorted indices scatter over the whole weight: prefetching a few entries ahead keeps several cache
  // misses in flight. Blocks of one layer run back to back or on other threads, so the look-ahead runs
  // to the layer's end, not the block's, and starts before the block's first entry.
  constexpr int64_t kAhead = 64;
  for (int64_t j = b; j < std::min(b + kAhead, n); ++j) __builtin_prefetch(w + idx[j], 1);
  U differ = 0;
  for (int64_t j = b; j < e; ++j) {
    if (j + kAhead < n) __builtin_prefetch(w + idx[j + kAhead], 1);
    U* p = w + idx[j];
    const U old = *p;
    *p = val[j];
    val[j] = old;
    if constexpr (kCheck) differ |= old ^ expect[j];
  }
  return differ == 0;
}

template <typename U, typename I>
bool swap_bits(U* w, const I* idx, U* val, const U* expect, int64_t b, int64_t e, int64_t n) {
  return expect != nullptr ? swap_bits<true>(w, idx, val, expect, b, e, n)
                           : swap_bits<false>(w, idx, val, expect, b, e, n);
}

template <typename U>
bool swap_range(const at::Tensor& w, const at::Tensor& idx, const at::Tensor& val, const at::Tensor* expect,
                int64_t b, int64_t e) {
  U* wp = static_cast<U*>(w.data_ptr());
  U* vp = static_cast<U*>(val.data_ptr());
  const U* ep = expect != nullptr ? static_cast<const U*>(expect->data_ptr()) : nullptr;
  const int64_t n = idx.numel();
  if (idx.scalar_type() == at::kLong) return swap_bits<U>(wp, idx.const_data_ptr<int64_t>(), vp, ep, b, e, n);
  return swap_bits<U>(wp, idx.const_data_ptr<int32_t>(), vp, ep, b, e, n);
}

// Range and order checks of every layer's (contiguous) indices, before anything is written.
void check_indices(at::TensorList weights, const std::vector<at::Tensor>& idx) {
  // Validation reads the indices once, sequentially: cheap next to the scattered exchange, so it runs
  // on this thread (a parallel region costs more than it saves when the machine is busy).
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i].numel() == 0) continue;
    const IndexStats st = idx[i].scalar_type() == at::kLong
                              ? index_stats(idx[i].const_data_ptr<int64_t>(), idx[i].numel())
                              : index_stats(idx[i].const_data_ptr<int32_t>(), idx[i].numel());
    const int64_t n = weights[i].numel();
    raise_bad_indices(i, n, st.lo, st.hi, st.lo >= 0 && st.hi < n, st.increasing);
  }
}

// The exchange of validated layers. The entries of all layers go in blocks shared between threads
// (parallel.h), from 2 blocks on: the exchange waits on cache misses, so two threads nearly halve it.
// `expect` is empty or holds one tensor per layer (see swap_bits); returns whether all bits matched.
bool exchange(at::TensorList weights, const std::vector<at::Tensor>& idx, at::TensorList values,
              const std::vector<at::Tensor>& expect, const std::vector<int64_t>& start) {
  constexpr int64_t kBlockEntries = int64_t(1) << 14;
  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t blocks = (start[L] + kBlockEntries - 1) / kBlockEntries;
  std::vector<char> matched(blocks, 1);
  auto block = [&](int64_t blk) {
    const int64_t b = blk * kBlockEntries, e = std::min(start[L], b + kBlockEntries);
    int64_t i = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    bool ok = true;
    for (; i < L && start[i] < e; ++i) {
      const int64_t lb = std::max(b, start[i]) - start[i], le = std::min(e, start[i + 1]) - start[i];
      if (lb >= le) continue;
      const at::Tensor* ex = expect.empty() ? nullptr : &expect[i];
      switch (weights[i].element_size()) {
        case 2: ok &= swap_range<uint16_t>(weights[i], idx[i], values[i], ex, lb, le); break;
        case 4: ok &= swap_range<uint32_t>(weights[i], idx[i], values[i], ex, lb, le); break;
        default: ok &= swap_range<uint64_t>(weights[i], idx[i], values[i], ex, lb, le); break;
      }
    }
    matched[blk] = ok;
  };
  share_items(blocks, block);
  return std::all_of(matched.begin(), matched.end(), [](char c) { return c != 0; });
}

std::vector<int64_t> offsets(const std::vector<at::Tensor>& idx) {
  std::vector<int64_t> start(idx.size() + 1, 0);
  for (size_t i = 0; i < idx.size(); ++i) start[i + 1] = start[i] + idx[i].numel();
  return start;
}

}  // namespace

void swap_cpu(at::TensorList weights, at::TensorList indices, at::TensorList values) {
  check_swap_meta(weights, indices, values);
  std::vector<at::Tensor> idx(weights.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = indices[i].contiguous();
  check_indices(weights, idx);
  exchange(weights, idx, values, {}, offsets(idx));
}

// ------------------------------------------------------------------------------------ SwapPlanCpu
SwapPlanCpu::SwapPlanCpu(std::vector<at::Tensor> weights, std::vector<at::Tensor> indices,
                         std::vector<at::Tensor> values, std::vector<at::Tensor> expect, bool bump_versions)
    : weights_(std::move(weights)), values_(std::move(values)), expect_(std::move(expect)), bump_(bump_versions) {
  check_swap_meta(weights_, indices, values_);
  TORCH_CHECK_VALUE(expect_.empty() || expect_.size() == weights_.size(), "SwapPlan: got ", expect_.size(),
                    " expected-bits tensors for ", weights_.size(), " layers");
  for (size_t i = 0; i < weights_.size(); ++i) {
    TORCH_CHECK_VALUE(weights_[i].device().is_cpu(), "SwapPlan: layer #", i, " is on ", weights_[i].device(),
                      "; the plan is the CPU backend's");
    if (!expect_.empty()) {
      const auto& ex = expect_[i];
      TORCH_CHECK_VALUE(ex.scalar_type() == values_[i].scalar_type() && ex.sizes() == values_[i].sizes() &&
                            ex.is_contiguous() && ex.device().is_cpu(),
                        "SwapPlan: expected bits of layer #", i, " must be contiguous ", values_[i].scalar_type(),
                        " of shape ", values_[i].sizes(), " on the CPU");
    }
  }
  indices_.resize(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) indices_[i] = indices[i].contiguous();
  check_indices(weights_, indices_);
  start_ = offsets(indices_);
  for (const auto& w : weights_) {
    storage_.push_back(w.data_ptr());
    numel_.push_back(w.numel());
  }
  versions_ = versions();
}

int64_t SwapPlanCpu::swap(bool check, bool only_if_unchanged) {
  const bool was_unchanged = unchanged();
  if (only_if_unchanged && !was_unchanged) return kSkipped;
  for (size_t i = 0; i < weights_.size(); ++i) {
    const auto& w = weights_[i];
    TORCH_CHECK_VALUE(w.data_ptr() == storage_[i] && w.numel() == numel_[i] && w.is_contiguous(),
                      "SwapPlan: the weight of layer #", i, " was reallocated or reshaped since the plan was made");
  }
  static const std::vector<at::Tensor> kNone;
  const bool ok = exchange(weights_, indices_, values_, check ? expect_ : kNone, start_);
  for (size_t i = 0; i < weights_.size(); ++i) {
    if (bump_) weights_[i].unsafeGetTensorImpl()->bump_version();
    versions_[i] = weights_[i]._version();
  }
  return (was_unchanged ? kUnchanged : 0) | (ok || expect_.empty() ? kMatched : 0);
}

bool SwapPlanCpu::unchanged() const {
  for (size_t i = 0; i < weights_.size(); ++i) {
    if (weights_[i]._version() != versions_[i] || weights_[i].data_ptr() != storage_[i]) return false;
  }
  return true;
}

std::vector<int64_t> SwapPlanCpu::versions() const {
  std::vector<int64_t> v;
  v.reserve(weights_.size());
  for (const auto& w : weights_) v.push_back(w._version());
  return v;
}

}  // namespace sparse_sam
