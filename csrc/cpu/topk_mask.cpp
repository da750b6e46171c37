// Per-layer top-k mask on CPU: selection on order-preserving integer keys, all layers in one call and
// one round of work shared between threads.
//
// Large layers (sampling): one key per kSampleStride, at jittered positions, gives a bracket [lo, hi]
// that holds the k-th largest key with high probability. One pass per chunk then writes the mask
// (key > hi), counts those keys and collects the few keys inside the bracket; NaN is caught in the same
// pass. For float32 on CPUs with AVX2 (checked at run time, so the build stays portable) the pass is
// written with 256-bit intrinsics: per 32 scores, 8 compares, a pack to bytes, one store, and a single
// branch that is rarely taken. The thread that finishes a layer's last chunk resolves its candidates.
// If the counts show that the bracket missed (unlucky sample, adversarial layout), the layer is redone
// the whole-layer way in a second round.
// Small layers (whole-layer): one work item per layer: a histogram of the top key bits gives the bucket
// holding the k-th largest key; the bucket's key range is then the bracket of the same pass as above.
// Either way the collected candidates (in index order) are resolved exactly: the r-th largest by
// nth_element, and keys equal to it go to the lowest indices.
//
// One round of shared work per call (two if a bracket missed; see parallel.h): threads take work items
// as they finish one (whole small layers first, then chunks), so an uneven mix of layers keeps every
// thread busy, and the caller never waits for a thread that a busy machine has not scheduled.
//
// Counters and indices are 64-bit throughout, so layers of >= 2^31 scores and k >= 2^31 work.
#include "../sparse_sam.h"
#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPARSE_SAM_X86_AVX2_DISPATCH 1
#include <immintrin.h>
#endif

namespace sparse_sam {
namespace {

constexpr int64_t kChunk = int64_t(1) << 16;
constexpr int64_t kSampleMinNumel = int64_t(1) << 16;  // smaller layers are one whole-layer item
constexpr int64_t kSampleStride = 256;                 // power of two
constexpr int64_t kBlock = 16;                         // candidate search granularity (generic pass)

enum class Mode { kFill, kWhole, kSample };

struct Layer {
  at::ScalarType dtype;
  const void* bits = nullptr;
  uint8_t* out = nullptr;  // written as bytes: byte stores vectorise, bool stores do not
  int64_t n = 0, k = 0;
  Mode mode = Mode::kFill;
  int64_t first_chunk = 0, nchunks = 0;
  uint64_t lo = 0, hi = 0;  // sample mode: keys > hi are in; keys in [lo, hi] are candidates
};

struct Chunk {
  int64_t layer, begin, end;
};

// Candidates of one chunk (or layer), in index order.
struct Candidates {
  std::vector<int64_t> idx;
  std::vector<uint64_t> keys;
  void push(int64_t i, uint64_t key) {
    idx.push_back(i);
    keys.push_back(key);
  }
};

struct ChunkResult {
  Candidates cand;
  int64_t above = 0;  // keys > hi
};

template <typename T>
bool nan_scan(const typename T::key_t* src, int64_t b, int64_t e) {
  int nan = 0;
  for (int64_t i = b; i < e; ++i) nan |= key_is_nan<T>(src[i]);
  return nan != 0;
}

// Sets exactly r of the candidates: the largest keys first and, among keys equal to the r-th largest,
// the lowest indices.
void resolve_candidates(const Candidates& c, int64_t r, uint8_t* out) {
  const int64_t m = static_cast<int64_t>(c.idx.size());
  if (r <= 0) return;
  if (r >= m) {
    for (int64_t i : c.idx) out[i] = 1;
    return;
  }
  std::vector<uint64_t> tmp(c.keys);
  std::nth_element(tmp.begin(), tmp.begin() + (r - 1), tmp.end(), std::greater<uint64_t>());
  const uint64_t t = tmp[r - 1];
  int64_t above = 0;
  for (uint64_t key : c.keys) above += key > t;
  int64_t take_equal = r - above;
  for (int64_t j = 0; j < m; ++j) {
    if (c.keys[j] > t || (c.keys[j] == t && take_equal-- > 0)) out[c.idx[j]] = 1;
  }
}

// ------------------------------------------------------------------------------------ sampled layers
// Bracket [lo, hi] around the k-th largest key from one key per kSampleStride, at a pseudo-random
// position inside each stride so that periodic structure (rows, channels) cannot line up with it.
template <typename T>
void sample_bracket(Layer& L) {
  using U = typename T::key_t;
  const U* src = static_cast<const U*>(L.bits);
  const int64_t strides = L.n / kSampleStride;
  std::vector<U> s;
  s.reserve(strides);
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int64_t j = 0; j < strides; ++j) {
    h = h * 6364136223846793005ull + 1442695040888963407ull;
    const U u = src[j * kSampleStride + static_cast<int64_t>((h >> 40) & (kSampleStride - 1))];
    if (!key_is_nan<T>(u)) s.push_back(order_key<T>(u));  // NaN is reported by the full pass
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

// The bracket bounds as floats. A key bound of all ones / zero means "no bound" (those keys are NaN
// bit patterns): +inf / -inf.
template <typename T, typename V>
std::pair<V, V> float_bracket(const Layer& L) {
  using U = typename T::key_t;
  const V hi = L.hi == static_cast<uint64_t>(U(~U(0))) ? std::numeric_limits<V>::infinity()
                                                       : std::bit_cast<V>(key_to_bits<T>(U(L.hi)));
  const V lo = L.lo == 0 ? -std::numeric_limits<V>::infinity() : std::bit_cast<V>(key_to_bits<T>(U(L.lo)));
  return {lo, hi};
}

// Portable pass. Compares with the bracket bounds as keys (any float type) or, for float32/float64,
// directly as floats: native float compares vectorise far better than unsigned ones, treat
// -0.0 == +0.0 and are false for NaN, which is scanned for separately.
template <typename T, typename V>
bool bracket_chunk_generic(const Layer& L, const Chunk& c, ChunkResult& res) {
  using U = typename T::key_t;
  constexpr bool kFloat = !std::is_same_v<V, U>;
  auto value = [](U u) {
    if constexpr (kFloat) return std::bit_cast<V>(u);
    else return order_key<T>(u);
  };
  V lo, hi;
  if constexpr (kFloat) std::tie(lo, hi) = float_bracket<T, V>(L);
  else lo = V(L.lo), hi = V(L.hi);
  const U* const src = static_cast<const U*>(L.bits);  // locals: byte stores may alias fields
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
      if (x >= lo && x <= hi) res.cand.push(i, order_key<T>(src[i]));
    }
  }
  res.above = above;
  return nan != 0;
}

#ifdef SPARSE_SAM_X86_AVX2_DISPATCH
// float32 pass with AVX2. A score is a candidate when !(x < lo) && !(x > hi): that is also true for
// NaN, so NaN costs no extra instruction in the common path and is told apart when candidates are
// collected.
__attribute__((target("avx2,popcnt,bmi"))) bool bracket_chunk_f32_avx2(const Layer& L, const Chunk& c,
                                                                        ChunkResult& res) {
  const auto [lo, hi] = float_bracket<F32Keys, float>(L);
  const float* const src = static_cast<const float*>(L.bits);
  uint8_t* const dst = L.out;
  const __m256 vhi = _mm256_set1_ps(hi), vlo = _mm256_set1_ps(lo);
  const __m256i one = _mm256_set1_epi8(1);
  // After packing 4 x 8 lanes to bytes the 4-byte groups come out as a0 b0 c0 d0 a1 b1 c1 d1.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t above = 0;
  bool nan = false;
  auto collect = [&](int64_t i) {
    const float x = src[i];
    if (x != x) nan = true;
    else res.cand.push(i, order_key<F32Keys>(std::bit_cast<uint32_t>(x)));
  };
  int64_t i = c.begin;
  for (; i + 32 <= c.end; i += 32) {
    const __m256 x0 = _mm256_loadu_ps(src + i), x1 = _mm256_loadu_ps(src + i + 8);
    const __m256 x2 = _mm256_loadu_ps(src + i + 16), x3 = _mm256_loadu_ps(src + i + 24);
    const __m256 g0 = _mm256_cmp_ps(x0, vhi, _CMP_GT_OQ), g1 = _mm256_cmp_ps(x1, vhi, _CMP_GT_OQ);
    const __m256 g2 = _mm256_cmp_ps(x2, vhi, _CMP_GT_OQ), g3 = _mm256_cmp_ps(x3, vhi, _CMP_GT_OQ);
    const __m256 c0 = _mm256_andnot_ps(g0, _mm256_cmp_ps(x0, vlo, _CMP_NLT_UQ));
    const __m256 c1 = _mm256_andnot_ps(g1, _mm256_cmp_ps(x1, vlo, _CMP_NLT_UQ));
    const __m256 c2 = _mm256_andnot_ps(g2, _mm256_cmp_ps(x2, vlo, _CMP_NLT_UQ));
    const __m256 c3 = _mm256_andnot_ps(g3, _mm256_cmp_ps(x3, vlo, _CMP_NLT_UQ));
    const __m256i g01 = _mm256_packs_epi32(_mm256_castps_si256(g0), _mm256_castps_si256(g1));
    const __m256i g23 = _mm256_packs_epi32(_mm256_castps_si256(g2), _mm256_castps_si256(g3));
    const __m256i g = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(g01, g23), order);  // 0 / -1 bytes
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_and_si256(g, one));
    above += _mm_popcnt_u32(static_cast<uint32_t>(_mm256_movemask_epi8(g)));
    const __m256 any = _mm256_or_ps(_mm256_or_ps(c0, c1), _mm256_or_ps(c2, c3));
    if (!_mm256_testz_ps(any, any)) {
      uint32_t bits = uint32_t(_mm256_movemask_ps(c0)) | uint32_t(_mm256_movemask_ps(c1)) << 8 |
                      uint32_t(_mm256_movemask_ps(c2)) << 16 | uint32_t(_mm256_movemask_ps(c3)) << 24;
      for (; bits; bits &= bits - 1) collect(i + std::countr_zero(bits));
    }
  }
  for (; i < c.end; ++i) {
    const float x = src[i];
    const bool gt = x > hi;
    dst[i] = gt;
    above += gt;
    if (!gt && !(x < lo)) collect(i);
  }
  res.above = above;
  return nan;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
  return has;
}
#endif

template <typename T>
bool bracket_chunk(const Layer& L, const Chunk& c, ChunkResult& res) {
  using U = typename T::key_t;
  if constexpr (std::is_same_v<T, F32Keys>) {
#ifdef SPARSE_SAM_X86_AVX2_DISPATCH
    if (cpu_has_avx2()) return bracket_chunk_f32_avx2(L, c, res);
#endif
    return bracket_chunk_generic<T, float>(L, c, res);
  } else if constexpr (std::is_same_v<T, F64Keys>) {
    return bracket_chunk_generic<T, double>(L, c, res);
  } else {
    return bracket_chunk_generic<T, U>(L, c, res);
  }
}

// ------------------------------------------------------------------------------ whole-layer selection
// Radix selection on the top B key bits, then the bracket pass; returns true if the layer holds NaN
// (nothing else is done then).
template <typename T>
bool select_whole(const Layer& L) {
  using U = typename T::key_t;
  const U* const src = static_cast<const U*>(L.bits);  // locals: byte stores may alias struct fields
  uint8_t* const dst = L.out;
  const int64_t n = L.n;
  // Enough bins that the threshold bucket is small, few enough (<= n/64) that the histogram stays in
  // cache and costs little to clear and scan.
  const int log_n = 63 - std::countl_zero(static_cast<uint64_t>(n));
  const int B = std::min({16, T::kBits, std::max(4, log_n - 6)});
  const int shift = T::kBits - B;
  // kWays interleaved histograms: consecutive scores often share a bin (few exponents dominate), and
  // increments of one counter would wait on each other's stores.
  constexpr int64_t kWays = 4;
  const int64_t nbins = int64_t(1) << B;
  std::vector<int64_t> hist(kWays * nbins, 0);
  int nan = 0;
  // Bins are computed a block at a time in a loop that vectorises; only the increments are scalar.
  constexpr int64_t kBins = 1024;
  uint32_t bin[kBins];
  for (int64_t b = 0; b < n; b += kBins) {
    const int64_t len = std::min(kBins, n - b);
    for (int64_t j = 0; j < len; ++j) {
      const U u = src[b + j];
      nan |= key_is_nan<T>(u);
      bin[j] = static_cast<uint32_t>((order_key<T>(u) >> shift) + (j & (kWays - 1)) * nbins);
    }
    for (int64_t j = 0; j < len; ++j) ++hist[bin[j]];
  }
  if (nan) return true;
  for (int64_t w = 1; w < kWays; ++w) {
    for (int64_t i = 0; i < nbins; ++i) hist[i] += hist[w * nbins + i];
  }
  int64_t above = 0, bucket = nbins - 1;
  for (; bucket > 0 && above + hist[bucket] < L.k; --bucket) above += hist[bucket];
  // The bucket's key range is the bracket: one pass of the sampled layers' kind writes the mask above
  // it and collects the keys inside it, which hold the k-th largest.
  Layer W = L;
  W.lo = static_cast<uint64_t>(bucket) << shift;
  W.hi = ((static_cast<uint64_t>(bucket) + 1) << shift) - 1;
  ChunkResult res;
  bracket_chunk<T>(W, Chunk{0, 0, n}, res);
  const int64_t take = L.k - res.above;
  TORCH_INTERNAL_ASSERT(take >= 0 && take <= static_cast<int64_t>(res.cand.idx.size()),
                        "topk_mask: histogram bucket does not hold the threshold");
  resolve_candidates(res.cand, take, dst);
  return false;
}

// share_items, except that small jobs run on the calling thread: helpers cost more than they save.
template <typename F>
void parallel_items(int64_t n, int64_t work, const F& f) {
  if (work < 2 * kChunk) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  share_items(n, f);
}

template <typename F>
void with_keys(const Layer& L, F&& f) {
  dispatch_keys(L.dtype, "topk_mask", std::forward<F>(f));
}

}  // namespace

std::vector<at::Tensor> topk_mask_cpu(at::TensorList scores, at::IntArrayRef ks) {
  check_topk_args(scores, ks);
  const int64_t nl = static_cast<int64_t>(scores.size());
  std::vector<at::Tensor> flat(nl), masks(nl);
  std::vector<Layer> layers(nl);
  std::vector<int64_t> whole;  // whole-layer items, largest first
  std::vector<Chunk> chunks;   // chunks of sampled and fill layers
  int64_t total = 0;
  for (int64_t l = 0; l < nl; ++l) {
    flat[l] = scores[l].contiguous();
    masks[l] = empty_output_cpu(scores[l].sizes(), at::kBool);
    Layer& L = layers[l];
    L.dtype = flat[l].scalar_type();
    L.bits = flat[l].const_data_ptr();
    L.out = reinterpret_cast<uint8_t*>(masks[l].data_ptr<bool>());
    L.n = flat[l].numel();
    L.k = ks[l];
    total += L.n;
    if (L.n == 0) continue;
    if (L.k == 0 || L.k == L.n) {
      L.mode = Mode::kFill;
    } else if (L.n >= kSampleMinNumel) {
      L.mode = Mode::kSample;
      // On this thread: a few loads and a selection per kSampleStride scores, far less than the pass.
      with_keys(L, [&](auto tr) { sample_bracket<decltype(tr)>(L); });
    } else {
      L.mode = Mode::kWhole;
      whole.push_back(l);
      continue;
    }
    L.first_chunk = static_cast<int64_t>(chunks.size());
    L.nchunks = (L.n + kChunk - 1) / kChunk;
    for (int64_t b = 0; b < L.n; b += kChunk) chunks.push_back({l, b, std::min(L.n, b + kChunk)});
  }
  std::stable_sort(whole.begin(), whole.end(), [&](int64_t a, int64_t b) { return layers[a].n > layers[b].n; });

  // Flags and counters per layer, written from any thread.
  std::unique_ptr<std::atomic<bool>[]> nan(new std::atomic<bool>[nl]);
  std::unique_ptr<std::atomic<bool>[]> missed(new std::atomic<bool>[nl]);
  std::unique_ptr<std::atomic<int64_t>[]> chunks_left(new std::atomic<int64_t>[nl]);
  for (int64_t l = 0; l < nl; ++l) {
    nan[l].store(false, std::memory_order_relaxed);
    missed[l].store(false, std::memory_order_relaxed);
    chunks_left[l].store(layers[l].nchunks, std::memory_order_relaxed);
  }
  std::vector<ChunkResult> res(chunks.size());

  // The last chunk of a sampled layer resolves its candidates (or marks the bracket as missed).
  auto finish_sampled = [&](int64_t l) {
    const Layer& L = layers[l];
    int64_t above = 0, count = 0;
    for (int64_t c = L.first_chunk; c < L.first_chunk + L.nchunks; ++c) {
      above += res[c].above;
      count += static_cast<int64_t>(res[c].cand.idx.size());
    }
    const int64_t take = L.k - above;
    if (take < 0 || take > count) {  // the threshold lies outside the bracket
      missed[l].store(true, std::memory_order_relaxed);
      return;
    }
    Candidates all;
    all.idx.reserve(count);
    all.keys.reserve(count);
    for (int64_t c = L.first_chunk; c < L.first_chunk + L.nchunks; ++c) {
      all.idx.insert(all.idx.end(), res[c].cand.idx.begin(), res[c].cand.idx.end());
      all.keys.insert(all.keys.end(), res[c].cand.keys.begin(), res[c].cand.keys.end());
      res[c].cand = Candidates();
    }
    resolve_candidates(all, take, L.out);
  };

  const int64_t nw = static_cast<int64_t>(whole.size());
  parallel_items(nw + static_cast<int64_t>(chunks.size()), total, [&](int64_t i) {
    if (i < nw) {
      const Layer& L = layers[whole[i]];
      bool has_nan = false;
      with_keys(L, [&](auto tr) { has_nan = select_whole<decltype(tr)>(L); });
      if (has_nan) nan[whole[i]].store(true, std::memory_order_relaxed);
      return;
    }
    const int64_t c = i - nw;
    const Chunk& ch = chunks[c];
    const int64_t l = ch.layer;
    const Layer& L = layers[l];
    bool has_nan = false;
    if (L.mode == Mode::kFill) {
      std::memset(L.out + ch.begin, L.k == L.n ? 1 : 0, ch.end - ch.begin);
      with_keys(L, [&](auto tr) {
        using T = decltype(tr);
        has_nan = nan_scan<T>(static_cast<const typename T::key_t*>(L.bits), ch.begin, ch.end);
      });
    } else {
      with_keys(L, [&](auto tr) { has_nan = bracket_chunk<decltype(tr)>(L, ch, res[c]); });
    }
    if (has_nan) nan[l].store(true, std::memory_order_relaxed);
    // acq_rel: the thread that takes the count to zero sees every other chunk's results and flags.
    if (chunks_left[l].fetch_sub(1, std::memory_order_acq_rel) == 1 && L.mode == Mode::kSample &&
        !nan[l].load(std::memory_order_relaxed)) {
      finish_sampled(l);
    }
  });
  for (int64_t l = 0; l < nl; ++l) {
    TORCH_CHECK_VALUE(!nan[l].load(std::memory_order_relaxed), "topk_mask: scores of layer #", l, " contain NaN");
  }
  std::vector<int64_t> retry;
  int64_t retry_work = 0;
  for (int64_t l = 0; l < nl; ++l) {
    if (missed[l].load(std::memory_order_relaxed)) {
      retry.push_back(l);
      retry_work += layers[l].n;
    }
  }
  parallel_items(static_cast<int64_t>(retry.size()), retry_work, [&](int64_t i) {
    const Layer& L = layers[retry[i]];
    with_keys(L, [&](auto tr) { select_whole<decltype(tr)>(L); });
  });
  return masks;
}

}  // namespace sparse_sam
