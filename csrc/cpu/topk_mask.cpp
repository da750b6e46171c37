// Per-layer top-k mask on CPU: radix select on order-preserving integer keys.
//
// Large layers: one parallel pass builds per-thread histograms of the top B key bits (and detects NaN);
// the bucket holding the k-th largest key is found from the merged histogram; a second parallel pass
// writes the mask for everything outside that bucket and collects the (few) in-bucket indices per
// chunk, in index order. The in-bucket candidates are then resolved exactly: r-th largest key by
// nth_element, and equal keys at the threshold are taken in index order (lower index wins). That is two
// reads of the scores and one write of the mask. Small layers run the same selection serially, many
// layers in parallel.
#include "../sparse_sam.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>

namespace sparse_sam {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;        // elements per parallel work item
constexpr int64_t kParallelLayer = int64_t(1) << 18;  // layers at least this big are split across threads

// Resolves the in-bucket candidates (given in index order): sets exactly r of them, the largest keys
// first and, among keys equal to the threshold, the lowest indices first.
template <typename U>
void resolve_candidates(const std::vector<int64_t>& cand, const std::vector<U>& ckeys, int64_t r, bool* out) {
  if (r <= 0) return;
  const int64_t m = static_cast<int64_t>(cand.size());
  if (r >= m) {
    for (int64_t i : cand) out[i] = true;
    return;
  }
  std::vector<U> tmp(ckeys);
  std::nth_element(tmp.begin(), tmp.begin() + (r - 1), tmp.end(), std::greater<U>());
  const U t = tmp[r - 1];
  int64_t above = 0;
  for (U key : ckeys) above += key > t;
  int64_t take_equal = r - above;
  for (int64_t j = 0; j < m; ++j) {
    const U key = ckeys[j];
    if (key > t || (key == t && take_equal-- > 0)) out[cand[j]] = true;
  }
}

// One layer on the calling thread. Returns false on NaN.
template <typename T>
bool select_serial(const typename T::key_t* bits, bool* out, int64_t n, int64_t k) {
  using U = typename T::key_t;
  std::vector<U> keys(n);
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= key_is_nan<T>(bits[i]);
    keys[i] = order_key<T>(bits[i]);
  }
  if (nan) return false;
  std::memset(out, k == n ? 1 : 0, n);
  if (k == 0 || k == n) return true;
  std::vector<int64_t> all(n);
  for (int64_t i = 0; i < n; ++i) all[i] = i;
  resolve_candidates<U>(all, keys, k, out);
  return true;
}

// One large layer, split across threads. Returns false on NaN.
template <typename T>
bool select_parallel(const typename T::key_t* bits, bool* out, int64_t n, int64_t k) {
  using U = typename T::key_t;
  // Enough bins that the threshold bucket is small, few enough that per-thread histograms stay in cache.
  int log_n = 0;
  while ((int64_t(1) << (log_n + 1)) <= n) ++log_n;
  const int B = std::min({16, T::kBits, std::max(8, log_n - 6)});
  const int shift = T::kBits - B;
  const int64_t nbins = int64_t(1) << B;
  const int nthreads = at::get_num_threads();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;

  std::vector<uint32_t> hist(static_cast<size_t>(nthreads) * nbins, 0);
  std::atomic<bool> nan{false};
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    uint32_t* h = hist.data() + static_cast<int64_t>(at::get_thread_num()) * nbins;
    // Bins are computed a block at a time in a loop that vectorises; only the increments are scalar.
    constexpr int64_t kBlock = 1024;
    uint16_t bin[kBlock];
    int local_nan = 0;
    for (int64_t b = c0 * kChunk, e = std::min(n, c1 * kChunk); b < e; b += kBlock) {
      const int64_t len = std::min(kBlock, e - b);
      for (int64_t j = 0; j < len; ++j) {
        const U u = bits[b + j];
        local_nan |= key_is_nan<T>(u);
        bin[j] = static_cast<uint16_t>(order_key<T>(u) >> shift);
      }
      for (int64_t j = 0; j < len; ++j) ++h[bin[j]];
    }
    if (local_nan) nan = true;
  });
  if (nan) return false;

  if (k == 0 || k == n) {
    at::parallel_for(0, n, kChunk, [&](int64_t b, int64_t e) { std::memset(out + b, k == n, e - b); });
    return true;
  }
  // Bucket b* holding the k-th largest key; r = how many to take from it.
  int64_t above = 0, bucket = nbins - 1, count = 0;
  for (;; --bucket) {
    count = 0;
    for (int t = 0; t < nthreads; ++t) count += hist[t * nbins + bucket];
    if (above + count >= k) break;
    above += count;
  }
  const int64_t r = k - above;
  const U ub = static_cast<U>(bucket);

  uint8_t* out8 = reinterpret_cast<uint8_t*>(out);  // byte stores vectorise, bool stores do not
  if (r == count) {  // the whole bucket is in: no candidates to resolve
    at::parallel_for(0, n, kChunk, [&](int64_t b, int64_t e) {
      // Locals, not captures: byte stores may alias anything, so captured values would be reloaded
      // every iteration and the loop would not vectorise.
      const U* const src = bits;
      uint8_t* const dst = out8;
      const int sh = shift;
      const U bucket_id = ub;
      for (int64_t i = b; i < e; ++i) dst[i] = U(order_key<T>(src[i]) >> sh) >= bucket_id;
    });
    return true;
  }
  std::vector<std::vector<int64_t>> cand(nchunks);
  std::vector<std::vector<U>> ckeys(nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk, e = std::min(n, (c + 1) * kChunk);
      const U* const src = bits;  // locals: see above
      uint8_t* const dst = out8;
      const int sh = shift;
      const U bucket_id = ub;
      int in_bucket = 0;
      for (int64_t i = b; i < e; ++i) {
        const U kb = U(order_key<T>(src[i]) >> sh);
        dst[i] = kb > bucket_id;
        in_bucket |= kb == bucket_id;
      }
      if (!in_bucket) continue;
      // The chunk is still in cache: collect its candidates in a second, scalar scan.
      for (int64_t i = b; i < e; ++i) {
        const U key = order_key<T>(bits[i]);
        if (U(key >> shift) == ub) {
          cand[c].push_back(i);
          ckeys[c].push_back(key);
        }
      }
    }
  });
  std::vector<int64_t> all_cand;
  std::vector<U> all_keys;
  all_cand.reserve(count);
  all_keys.reserve(count);
  for (int64_t c = 0; c < nchunks; ++c) {
    all_cand.insert(all_cand.end(), cand[c].begin(), cand[c].end());
    all_keys.insert(all_keys.end(), ckeys[c].begin(), ckeys[c].end());
  }
  resolve_candidates<U>(all_cand, all_keys, r, out);
  return true;
}

template <typename T>
bool select_layer(const at::Tensor& s, at::Tensor& m, int64_t k, bool parallel) {
  const auto* bits = static_cast<const typename T::key_t*>(s.const_data_ptr());
  bool* out = m.data_ptr<bool>();
  return parallel ? select_parallel<T>(bits, out, s.numel(), k) : select_serial<T>(bits, out, s.numel(), k);
}

bool run_layer(const at::Tensor& s, at::Tensor& m, int64_t k, bool parallel) {
  bool ok = true;
  dispatch_keys(s.scalar_type(), "topk_mask", [&](auto traits) {
    ok = select_layer<decltype(traits)>(s, m, k, parallel);
  });
  return ok;
}

}  // namespace

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks) {
  check_topk_args(scores, ks);
  const size_t L = scores.size();
  std::vector<at::Tensor> flat(L), masks(L);
  std::vector<int64_t> small;
  for (size_t i = 0; i < L; ++i) {
    flat[i] = scores[i].contiguous();
    masks[i] = at::empty(scores[i].sizes(), scores[i].options().dtype(at::kBool));
    if (flat[i].numel() < kParallelLayer) small.push_back(static_cast<int64_t>(i));
  }
  // 1 = NaN found; layers are checked in order so the error names the first bad layer.
  std::vector<char> nan(L, 0);
  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      const int64_t i = small[j];
      nan[i] = !run_layer(flat[i], masks[i], ks[i], false);
    }
  });
  for (size_t i = 0; i < L; ++i) {
    if (flat[i].numel() >= kParallelLayer) nan[i] = !run_layer(flat[i], masks[i], ks[i], true);
  }
  for (size_t i = 0; i < L; ++i) {
    TORCH_CHECK_VALUE(!nan[i], "topk_mask: scores of layer #", i, " contain NaN");
  }
  return masks;
}

}  // namespace sparse_sam
