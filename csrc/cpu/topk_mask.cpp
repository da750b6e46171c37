// Per-layer top-k mask on CPU: selection on order-preserving integer keys, all layers in one call.
//
// Large layers (sampling): a strided sample of the keys gives a bracket [lo, hi] that holds the k-th
// largest key with high probability. One vectorised pass per chunk then writes the mask (key > hi),
// counts those keys, scans for NaN, and collects the few keys inside the bracket. If the counts show
// that the bracket missed (unlucky sample, heavy ties), the layer is redone the histogram way.
// Small layers (histogram): per-thread histograms of the top B key bits give the bucket holding the
// k-th largest key; a second pass writes the mask outside that bucket and collects the keys inside it.
// Either way the collected candidates (in index order) are resolved exactly: the r-th largest by
// nth_element, and keys equal to it go to the lowest indices.
//
// Work is split into chunks across all layers and the op runs in three parallel regions whatever the
// number of layers: each region ends in a barrier, which is expensive when the machine is busy. Inside
// a region threads take work items as they finish one (whole-layer samples and candidate sets first),
// so an uneven mix of layers keeps every thread busy.
#include "../sparse_sam.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <limits>
#include <type_traits>
#include <cstring>
#include <functional>

namespace sparse_sam {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kSampleMinNumel = int64_t(1) << 15;  // smaller layers use the histogram
constexpr int64_t kSampleStride = 64;
constexpr int64_t kBlock = 16;  // candidate search granularity: ~10% of blocks hold one

enum class Mode { kFill, kHistogram, kSample };

struct Layer {
  at::ScalarType dtype;
  const void* bits = nullptr;
  uint8_t* out = nullptr;  // written as bytes: byte stores vectorise, bool stores do not
  int64_t n = 0, k = 0;
  Mode mode = Mode::kFill;
  int64_t first_chunk = 0, nchunks = 0;
  // histogram mode
  int shift = 0;          // key >> shift = bucket
  int64_t nbins = 0;
  int64_t hist_base = 0;  // hist[hist_base + thread * nbins + bin]
  int64_t bucket = 0, take = 0, bucket_count = 0;
  // sample mode: keys > hi are in; keys in [lo, hi] are candidates
  uint64_t lo = 0, hi = 0;
};

struct Chunk {
  int64_t layer, begin, end;
};

struct ChunkResult {
  std::vector<int64_t> cand;
  std::vector<uint64_t> keys;
  int64_t above = 0;  // sample mode: keys > hi
};

int key_bits(at::ScalarType st) {
  return st == at::kDouble ? 64 : st == at::kFloat ? 32 : 16;
}

template <typename T>
bool nan_scan(const Layer& L, const Chunk& c) {
  const auto* src = static_cast<const typename T::key_t*>(L.bits);
  int nan = 0;
  for (int64_t i = c.begin; i < c.end; ++i) nan |= key_is_nan<T>(src[i]);
  return nan != 0;
}

template <typename T>
bool histogram_chunk(const Layer& L, const Chunk& c, uint32_t* h) {
  using U = typename T::key_t;
  const U* src = static_cast<const U*>(L.bits);
  const int shift = L.shift;
  int nan = 0;
  // Bins are computed a block at a time in a loop that vectorises; only the increments are scalar.
  constexpr int64_t kBins = 1024;
  uint16_t bin[kBins];
  for (int64_t b = c.begin; b < c.end; b += kBins) {
    const int64_t len = std::min(kBins, c.end - b);
    for (int64_t j = 0; j < len; ++j) {
      const U u = src[b + j];
      nan |= key_is_nan<T>(u);
      bin[j] = static_cast<uint16_t>(order_key<T>(u) >> shift);
    }
    for (int64_t j = 0; j < len; ++j) ++h[bin[j]];
  }
  return nan != 0;
}

// Bracket [lo, hi] around the k-th largest key from every kSampleStride-th key.
template <typename T>
void sample_bracket(Layer& L) {
  using U = typename T::key_t;
  const U* src = static_cast<const U*>(L.bits);
  std::vector<U> s;
  s.reserve(L.n / kSampleStride + 1);
  for (int64_t i = kSampleStride / 2; i < L.n; i += kSampleStride) {
    if (!key_is_nan<T>(src[i])) s.push_back(order_key<T>(src[i]));  // NaN is reported by the full pass
  }
  const int64_t m = static_cast<int64_t>(s.size());
  const double q = double(L.k) / double(L.n), p = q * double(m);
  // The threshold's rank in the sample is ~Binomial(m, q): 3.5 standard deviations either side.
  const double delta = 3.5 * std::sqrt(p * (1.0 - q)) + 2.0;
  const int64_t hi_rank = static_cast<int64_t>(std::floor(p - delta));
  const int64_t lo_rank = static_cast<int64_t>(std::ceil(p + delta));
  // Ranks in descending order; the second selection only searches past the first one's partition.
  auto begin = s.begin();
  auto desc_at = [&](int64_t r) {
    std::nth_element(begin, s.begin() + r, s.end(), std::greater<U>());
    begin = s.begin() + r + 1;
    return static_cast<uint64_t>(s[r]);
  };
  L.hi = hi_rank < 0 ? static_cast<uint64_t>(U(~U(0))) : desc_at(hi_rank);
  L.lo = lo_rank >= m ? 0 : desc_at(lo_rank);
}

// Inverse of order_key for keys of non-NaN values.
template <typename T>
typename T::key_t key_to_bits(typename T::key_t key) {
  using U = typename T::key_t;
  return (key & T::kSign) ? U(key ^ T::kSign) : U(~key);
}

// Compares with the bracket bounds as keys (any float type) or, for float32/float64, directly as floats:
// native float compares vectorise far better than unsigned ones, treat -0.0 == +0.0 and are false for
// NaN, which is scanned for separately.
template <typename T, typename V>
bool bracket_chunk_impl(const Layer& L, const Chunk& c, ChunkResult& res) {
  using U = typename T::key_t;
  constexpr bool kFloat = !std::is_same_v<V, U>;
  auto value = [](U u) {
    if constexpr (kFloat) return std::bit_cast<V>(u);
    else return order_key<T>(u);
  };
  const U key_max = U(~U(0));
  // A key bound of all ones / zero means "no bound" (those keys are NaN bit patterns).
  const V hi = !kFloat ? V(L.hi) : L.hi == key_max ? std::numeric_limits<V>::infinity()
                                                    : std::bit_cast<V>(key_to_bits<T>(U(L.hi)));
  const V lo = !kFloat ? V(L.lo) : L.lo == 0 ? -std::numeric_limits<V>::infinity()
                                             : std::bit_cast<V>(key_to_bits<T>(U(L.lo)));
  // Locals, not struct fields: byte stores may alias anything, so fields would be reloaded every
  // iteration and the loops would not vectorise.
  const U* const src = static_cast<const U*>(L.bits);
  uint8_t* const dst = L.out;
  int nan = 0;
  int64_t above = 0;
  for (int64_t b = c.begin; b < c.end; b += kBlock) {
    const int64_t e = std::min(c.end, b + kBlock);
    int in_bracket = 0;
    int block_above = 0;
    for (int64_t i = b; i < e; ++i) {
      const U u = src[i];
      nan |= key_is_nan<T>(u);
      const V x = value(u);
      const int gt = x > hi;
      dst[i] = static_cast<uint8_t>(gt);
      block_above += gt;
      in_bracket |= (x >= lo) & (x <= hi);
    }
    above += block_above;
    if (!in_bracket) continue;
    for (int64_t i = b; i < e; ++i) {
      const V x = value(src[i]);
      if (x >= lo && x <= hi) {
        res.cand.push_back(i);
        res.keys.push_back(order_key<T>(src[i]));
      }
    }
  }
  res.above = above;
  return nan != 0;
}

template <typename T>
bool bracket_chunk(const Layer& L, const Chunk& c, ChunkResult& res) {
  using U = typename T::key_t;
  if constexpr (std::is_same_v<T, F32Keys>) return bracket_chunk_impl<T, float>(L, c, res);
  else if constexpr (std::is_same_v<T, F64Keys>) return bracket_chunk_impl<T, double>(L, c, res);
  else return bracket_chunk_impl<T, U>(L, c, res);
}

template <typename T>
void compare_chunk(const Layer& L, const Chunk& c, ChunkResult& res) {
  using U = typename T::key_t;
  const U* const src = static_cast<const U*>(L.bits);  // locals: see bracket_chunk
  uint8_t* const dst = L.out;
  const int shift = L.shift;
  const U bucket = static_cast<U>(L.bucket);
  const int64_t b = c.begin, e = c.end;
  if (L.take == L.bucket_count) {  // the whole bucket is in: no candidates
    for (int64_t i = b; i < e; ++i) dst[i] = U(order_key<T>(src[i]) >> shift) >= bucket;
    return;
  }
  int in_bucket = 0;
  for (int64_t i = b; i < e; ++i) {
    const U kb = U(order_key<T>(src[i]) >> shift);
    dst[i] = kb > bucket;
    in_bucket |= kb == bucket;
  }
  if (!in_bucket) return;
  for (int64_t i = b; i < e; ++i) {  // the chunk is still in cache
    const U key = order_key<T>(src[i]);
    if (U(key >> shift) == bucket) {
      res.cand.push_back(i);
      res.keys.push_back(key);
    }
  }
}

// Sets exactly r of the candidates (given in index order): the largest keys first and, among keys
// equal to the r-th largest, the lowest indices.
void resolve_candidates(const std::vector<int64_t>& cand, const std::vector<uint64_t>& keys, int64_t r,
                        uint8_t* out) {
  const int64_t m = static_cast<int64_t>(cand.size());
  if (r <= 0) return;
  if (r >= m) {
    for (int64_t i : cand) out[i] = 1;
    return;
  }
  std::vector<uint64_t> tmp(keys);
  std::nth_element(tmp.begin(), tmp.begin() + (r - 1), tmp.end(), std::greater<uint64_t>());
  const uint64_t t = tmp[r - 1];
  int64_t above = 0;
  for (uint64_t key : keys) above += key > t;
  int64_t take_equal = r - above;
  for (int64_t j = 0; j < m; ++j) {
    if (keys[j] > t || (keys[j] == t && take_equal-- > 0)) out[cand[j]] = 1;
  }
}

// Runs f(i) for i in [0, n) on all threads, each taking the next item as it finishes one (items are
// uneven: a whole layer's sample next to one chunk; a static split left one thread with every sample).
// List the costly items first.
template <typename F>
void parallel_items(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      f(i);
    }
  });
}

template <typename F>
void with_keys(const Layer& L, F&& f) {
  dispatch_keys(L.dtype, "topk_mask", std::forward<F>(f));
}

// Selects the layers `ids` (NaN-free or not yet checked). Returns the sampled layers whose bracket
// missed; they must be selected again with sampling off.
std::vector<int64_t> select_layers(std::vector<Layer>& layers, const std::vector<int64_t>& ids, bool sampling) {
  const int nthreads = at::get_num_threads();
  std::vector<Chunk> chunks;
  std::vector<int64_t> samplers;  // sampled layers, largest first
  int64_t hist_size = 0;
  for (int64_t l : ids) {
    Layer& L = layers[l];
    L.first_chunk = static_cast<int64_t>(chunks.size());
    L.nchunks = (L.n + kChunk - 1) / kChunk;
    for (int64_t b = 0; b < L.n; b += kChunk) chunks.push_back({l, b, std::min(L.n, b + kChunk)});
    if (L.k == 0 || L.k == L.n) {
      L.mode = Mode::kFill;
    } else if (sampling && L.n >= kSampleMinNumel) {
      L.mode = Mode::kSample;
      samplers.push_back(l);
    } else {
      L.mode = Mode::kHistogram;
      // Enough bins that the threshold bucket is small, few enough (<= n/64) that the per-thread
      // histograms stay in cache and cost little to clear and merge.
      int log_n = 0;
      while ((int64_t(1) << (log_n + 1)) <= L.n) ++log_n;
      const int B = std::min({16, key_bits(L.dtype), std::max(4, log_n - 6)});
      L.shift = key_bits(L.dtype) - B;
      L.nbins = int64_t(1) << B;
      L.hist_base = hist_size;
      hist_size += L.nbins * nthreads;
    }
  }
  std::stable_sort(samplers.begin(), samplers.end(),
                   [&](int64_t a, int64_t b) { return layers[a].n > layers[b].n; });
  const int64_t nc = static_cast<int64_t>(chunks.size());
  const int64_t ns = static_cast<int64_t>(samplers.size());
  std::vector<char> nan(layers.size(), 0);  // only ever set to 1, so concurrent writers agree

  // 1. Histograms (histogram layers), NaN scan (fill layers), brackets (sampled layers).
  std::vector<uint32_t> hist(hist_size, 0);
  // Only chunks of histogram and fill layers have work here; samples (a whole layer each) go first.
  std::vector<int64_t> work;
  for (int64_t c = 0; c < nc; ++c) {
    if (layers[chunks[c].layer].mode != Mode::kSample) work.push_back(c);
  }
  parallel_items(ns + static_cast<int64_t>(work.size()), [&](int64_t i) {
    if (i < ns) {
      Layer& L = layers[samplers[i]];
      with_keys(L, [&](auto tr) { sample_bracket<decltype(tr)>(L); });
      return;
    }
    const Chunk& ch = chunks[work[i - ns]];
    const Layer& L = layers[ch.layer];
    const int64_t tid = at::get_thread_num();
    bool has_nan = false;
    if (L.mode == Mode::kHistogram) {
      uint32_t* h = hist.data() + L.hist_base + tid * L.nbins;
      with_keys(L, [&](auto tr) { has_nan = histogram_chunk<decltype(tr)>(L, ch, h); });
    } else {
      with_keys(L, [&](auto tr) { has_nan = nan_scan<decltype(tr)>(L, ch); });
    }
    if (has_nan) nan[ch.layer] = 1;
  });
  for (int64_t l : ids) {
    Layer& L = layers[l];
    if (L.mode != Mode::kHistogram) continue;
    int64_t above = 0;
    for (int64_t bucket = L.nbins - 1; bucket >= 0; --bucket) {
      int64_t count = 0;
      for (int t = 0; t < nthreads; ++t) count += hist[L.hist_base + t * L.nbins + bucket];
      if (above + count >= L.k || bucket == 0) {
        L.bucket = bucket;
        L.bucket_count = count;
        L.take = L.k - above;
        break;
      }
      above += count;
    }
  }

  // 2. The mask outside the bucket / bracket, and the candidates inside it.
  std::vector<ChunkResult> res(nc);
  parallel_items(nc, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const Layer& L = layers[ch.layer];
    if (L.mode == Mode::kFill) {
      std::memset(L.out + ch.begin, L.k == L.n ? 1 : 0, ch.end - ch.begin);
    } else if (L.mode == Mode::kHistogram) {
      with_keys(L, [&](auto tr) { compare_chunk<decltype(tr)>(L, ch, res[c]); });
    } else {
      bool has_nan = false;
      with_keys(L, [&](auto tr) { has_nan = bracket_chunk<decltype(tr)>(L, ch, res[c]); });
      if (has_nan) nan[ch.layer] = 1;
    }
  });
  for (int64_t l : ids) {
    TORCH_CHECK_VALUE(!nan[l], "topk_mask: scores of layer #", l, " contain NaN");
  }

  // 3. Exact selection among the candidates: one work item per layer, the most candidates first.
  std::vector<char> missed(layers.size(), 0);
  std::vector<int64_t> order;  // positions in ids of the layers with candidates to resolve
  std::vector<int64_t> above(layers.size(), 0), count(layers.size(), 0);
  for (int64_t p = 0; p < static_cast<int64_t>(ids.size()); ++p) {
    const int64_t l = ids[p];
    const Layer& L = layers[l];
    if (L.mode == Mode::kFill || (L.mode == Mode::kHistogram && L.take == L.bucket_count)) continue;
    for (int64_t c = L.first_chunk; c < L.first_chunk + L.nchunks; ++c) {
      above[l] += res[c].above;
      count[l] += static_cast<int64_t>(res[c].cand.size());
    }
    order.push_back(l);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return count[a] > count[b]; });
  parallel_items(static_cast<int64_t>(order.size()), [&](int64_t i) {
    const int64_t l = order[i];
    const Layer& L = layers[l];
    const int64_t take = L.mode == Mode::kSample ? L.k - above[l] : L.take;
    if (take < 0 || take > count[l]) {  // the sampled bracket missed the threshold
      missed[l] = 1;
      return;
    }
    std::vector<int64_t> cand;
    std::vector<uint64_t> keys;
    cand.reserve(count[l]);
    keys.reserve(count[l]);
    for (int64_t c = L.first_chunk; c < L.first_chunk + L.nchunks; ++c) {
      cand.insert(cand.end(), res[c].cand.begin(), res[c].cand.end());
      keys.insert(keys.end(), res[c].keys.begin(), res[c].keys.end());
    }
    resolve_candidates(cand, keys, take, L.out);
  });
  std::vector<int64_t> retry;
  for (int64_t l : ids) {
    if (missed[l]) retry.push_back(l);
  }
  return retry;
}

}  // namespace

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks) {
  check_topk_args(scores, ks);
  const int64_t nl = static_cast<int64_t>(scores.size());
  std::vector<at::Tensor> flat(nl), masks(nl);
  std::vector<Layer> layers(nl);
  std::vector<int64_t> ids(nl);
  for (int64_t l = 0; l < nl; ++l) {
    flat[l] = scores[l].contiguous();
    masks[l] = empty_output_cpu(scores[l].sizes(), at::kBool);
    Layer& L = layers[l];
    L.dtype = flat[l].scalar_type();
    L.bits = flat[l].const_data_ptr();
    L.out = reinterpret_cast<uint8_t*>(masks[l].data_ptr<bool>());
    L.n = flat[l].numel();
    L.k = ks[l];
    ids[l] = l;
  }
  const std::vector<int64_t> retry = select_layers(layers, ids, /*sampling=*/true);
  if (!retry.empty()) select_layers(layers, retry, /*sampling=*/false);
  return masks;
}

}  // namespace sparse_sam
