// In-place raw-bit exchange weights[l].flat[indices[l][j]] <-> values[l][j] on CPU, all layers in one
// call. Every layer is validated (range, strictly increasing) before the first write, so a bad patch
// leaves every tensor untouched even when the op is called directly through torch.ops.
//
// SwapPlanCpu (torch.classes.sparse_sam.SwapPlan) switches a patch prepared once: validated when it is
// made, then each swap() checks only that no weight was written or reallocated (O(L) version and pointer
// compares) and makes one pass over the entries, bumping the weights' version counters like any in-place
// write. It holds both the patched and the base bits, so switching on reads and compares the weights'
// bits but writes only the weights, and switching off only writes them: fewer memory streams than an
// exchange, whose saved bits would have to be written back each time.
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
inline __attribute__((always_inline)) IndexStats index_stats(const I* idx, int64_t n) {
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

// The order check is a compare per index, which vectorizes, but the baseline x86-64 ISA has no 64-bit
// vector compare: so it is also built for AVX2 and picked at load time where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define SPARSE_SAM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPARSE_SAM_CLONES
#endif
SPARSE_SAM_CLONES IndexStats index_stats_i64(const int64_t* idx, int64_t n) { return index_stats(idx, n); }
SPARSE_SAM_CLONES IndexStats index_stats_i32(const int32_t* idx, int64_t n) { return index_stats(idx, n); }

// What one pass does to entry j of a layer, at p = w + idx[j]:
//   kExchange: *p <-> val[j]                   (swap_)
//   kApply:    *p = val[j] if *p == base[j]; otherwise *p is left as it is and j is logged
//   kRestore:  *p = base[j]                    (kApply and kRestore: the plan switching on and off)
enum class Pass { kExchange, kApply, kRestore };

template <Pass kPass, typename U, typename I>
void pass_bits(U* __restrict__ w, const I* __restrict__ idx, U* __restrict__ val, const U* __restrict__ base,
               int64_t b, int64_t e, int64_t n, int64_t first, std::vector<int64_t>& bad) {
  // Sorted indices scatter over the whole weight: prefetching a few entries ahead keeps several cache
  // misses in flight. Blocks of one layer run back to back or on other threads, so the look-ahead runs
  // to the layer's end, not the block's, and starts before the block's first entry.
  constexpr int64_t kAhead = 64;
  for (int64_t j = b; j < std::min(b + kAhead, n); ++j) __builtin_prefetch(w + idx[j], 1);
  for (int64_t j = b; j < e; ++j) {
    if (j + kAhead < n) __builtin_prefetch(w + idx[j + kAhead], 1);
    U* p = w + idx[j];
    if constexpr (kPass == Pass::kExchange) {
      const U old = *p;
      *p = val[j];
      val[j] = old;
    } else if constexpr (kPass == Pass::kApply) {
      const U old = *p;
      const bool match = old == base[j];
      *p = match ? val[j] : old;
      if (__builtin_expect(!match, 0)) bad.push_back(first + j);  // `first`: the layer's first entry
    } else {
      *p = base[j];
    }
  }
}

// Calls f(U{}, I{}) with U the unsigned integer of the weight's width and I the index type.
template <typename F>
void with_types(const at::Tensor& w, const at::Tensor& idx, const F& f) {
  auto with_index = [&](auto u) {
    if (idx.scalar_type() == at::kLong) {
      f(u, int64_t{});
    } else {
      f(u, int32_t{});
    }
  };
  switch (w.element_size()) {
    case 2: with_index(uint16_t{}); break;
    case 4: with_index(uint32_t{}); break;
    default: with_index(uint64_t{}); break;
  }
}

template <Pass kPass>
void pass_range(const at::Tensor& w, const at::Tensor& idx, const at::Tensor& val, const at::Tensor* base,
                int64_t b, int64_t e, int64_t first, std::vector<int64_t>& bad) {
  with_types(w, idx, [&](auto u, auto i) {
    using U = decltype(u);
    using I = decltype(i);
    pass_bits<kPass>(static_cast<U*>(w.data_ptr()), idx.const_data_ptr<I>(), static_cast<U*>(val.data_ptr()),
                     base != nullptr ? static_cast<const U*>(base->data_ptr()) : nullptr, b, e, idx.numel(), first,
                     bad);
  });
}

// Range and order checks of every layer's (contiguous) indices, before anything is written.
void check_indices(at::TensorList weights, const std::vector<at::Tensor>& idx) {
  // Validation reads the indices once, sequentially: cheap next to the scattered exchange, so it runs
  // on this thread (a parallel region costs more than it saves when the machine is busy).
  for (size_t i = 0; i < idx.size(); ++i) {
    if (idx[i].numel() == 0) continue;
    const IndexStats st = idx[i].scalar_type() == at::kLong
                              ? index_stats_i64(idx[i].const_data_ptr<int64_t>(), idx[i].numel())
                              : index_stats_i32(idx[i].const_data_ptr<int32_t>(), idx[i].numel());
    const int64_t n = weights[i].numel();
    raise_bad_indices(i, n, st.lo, st.hi, st.lo >= 0 && st.hi < n, st.increasing);
  }
}

// One pass over validated layers (`base`: empty for kExchange, else one tensor per layer). The entries
// of all layers go in blocks shared between threads (parallel.h), from 2 blocks on: the pass waits on
// cache misses, so two threads nearly halve it. Returns the entries kApply logged, ascending (global
// positions: layer i's entry j is start[i] + j).
template <Pass kPass>
std::vector<int64_t> run_pass(at::TensorList weights, const std::vector<at::Tensor>& idx, at::TensorList values,
                              const std::vector<at::Tensor>& base, const std::vector<int64_t>& start) {
  constexpr int64_t kBlockEntries = int64_t(1) << 14;
  const int64_t L = static_cast<int64_t>(weights.size());
  const int64_t blocks = (start[L] + kBlockEntries - 1) / kBlockEntries;
  std::vector<std::vector<int64_t>> bad(blocks);
  share_items(blocks, [&](int64_t blk) {
    const int64_t b = blk * kBlockEntries, e = std::min(start[L], b + kBlockEntries);
    int64_t i = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (; i < L && start[i] < e; ++i) {
      const int64_t lb = std::max(b, start[i]) - start[i], le = std::min(e, start[i + 1]) - start[i];
      if (lb < le) pass_range<kPass>(weights[i], idx[i], values[i], base.empty() ? nullptr : &base[i], lb, le,
                                     start[i], bad[blk]);
    }
  });
  std::vector<int64_t> all;
  for (const auto& v : bad) all.insert(all.end(), v.begin(), v.end());
  return all;
}

// Undoes a kApply that logged `bad` (ascending): every entry it wrote gets its base bits back; the
// logged ones were never written. Runs on this thread: it only follows a caught mismatch.
void undo_apply(at::TensorList weights, const std::vector<at::Tensor>& idx, const std::vector<at::Tensor>& base,
                const std::vector<int64_t>& start, const std::vector<int64_t>& bad) {
  size_t k = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    with_types(weights[i], idx[i], [&](auto u, auto t) {
      using U = decltype(u);
      using I = decltype(t);
      U* w = static_cast<U*>(weights[i].data_ptr());
      const I* ix = idx[i].const_data_ptr<I>();
      const U* b = static_cast<const U*>(base[i].data_ptr());
      for (int64_t j = 0; j < idx[i].numel(); ++j) {
        if (k < bad.size() && bad[k] == start[i] + j) {
          ++k;
          continue;
        }
        w[ix[j]] = b[j];
      }
    });
  }
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
  run_pass<Pass::kExchange>(weights, idx, values, {}, offsets(idx));
}

// ------------------------------------------------------------------------------------ SwapPlanCpu
SwapPlanCpu::SwapPlanCpu(std::vector<at::Tensor> weights, std::vector<at::Tensor> indices,
                         std::vector<at::Tensor> patched, std::vector<at::Tensor> base, bool bump_versions)
    : weights_(std::move(weights)), patched_(std::move(patched)), base_(std::move(base)), bump_(bump_versions) {
  check_swap_meta(weights_, indices, patched_);
  TORCH_CHECK_VALUE(base_.size() == weights_.size(), "SwapPlan: got ", base_.size(), " base-bits tensors for ",
                    weights_.size(), " layers");
  for (size_t i = 0; i < weights_.size(); ++i) {
    TORCH_CHECK_VALUE(weights_[i].device().is_cpu(), "SwapPlan: layer #", i, " is on ", weights_[i].device(),
                      "; the plan is the CPU backend's");
    const auto& b = base_[i];
    TORCH_CHECK_VALUE(b.scalar_type() == patched_[i].scalar_type() && b.sizes() == patched_[i].sizes() &&
                          b.is_contiguous() && b.device().is_cpu(),
                      "SwapPlan: base bits of layer #", i, " must be contiguous ", patched_[i].scalar_type(),
                      " of shape ", patched_[i].sizes(), " on the CPU");
  }
  indices_.resize(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) indices_[i] = indices[i].contiguous();
  check_indices(weights_, indices_);
  start_ = offsets(indices_);
  for (const auto& w : weights_) {
    storage_.push_back(w.data_ptr());
    numel_.push_back(w.numel());
    versions_.push_back(w._version());
  }
}

int64_t SwapPlanCpu::swap(bool only_if_unchanged) {
  const bool was_unchanged = unchanged();
  if (only_if_unchanged && !was_unchanged) return kSkipped;
  for (size_t i = 0; i < weights_.size(); ++i) {
    const auto& w = weights_[i];
    TORCH_CHECK_VALUE(w.data_ptr() == storage_[i] && w.numel() == numel_[i] && w.is_contiguous(),
                      "SwapPlan: the weight of layer #", i, " was reallocated or reshaped since the plan was made");
  }
  bool matched = true;
  if (!on_) {
    const std::vector<int64_t> bad = run_pass<Pass::kApply>(weights_, indices_, patched_, base_, start_);
    matched = bad.empty();
    if (!matched) undo_apply(weights_, indices_, base_, start_, bad);
    on_ = matched;
  } else {
    run_pass<Pass::kRestore>(weights_, indices_, patched_, base_, start_);
    on_ = false;
  }
  for (size_t i = 0; i < weights_.size(); ++i) {
    if (bump_) weights_[i].unsafeGetTensorImpl()->bump_version();
    versions_[i] = weights_[i]._version();
  }
  return (was_unchanged ? kUnchanged : 0) | (matched ? kMatched : 0);
}

bool SwapPlanCpu::unchanged() const {
  for (size_t i = 0; i < weights_.size(); ++i) {
    if (weights_[i]._version() != versions_[i] || weights_[i].data_ptr() != storage_[i]) return false;
  }
  return true;
}

}  // namespace sparse_sam
