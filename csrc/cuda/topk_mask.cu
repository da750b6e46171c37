// Per-layer top-k mask on CUDA: grouped MSB-first radix select over all layers at once.
//
// Layers with the same key width form one group; every kernel below covers the whole group in one
// launch (blocks map to (layer, tile) through a prefix table). Per 8-bit digit, from the most
// significant: a histogram of the digit over the elements still matching the chosen prefix, then one
// thread per layer picks the digit holding the k-th largest key. After the last digit the threshold key
// t is exact and `rem` says how many elements equal to t are taken; they go to the lowest indices, via a
// per-tile count of equal keys, a per-layer scan over tiles and a block scan inside each tile.
//
// No host synchronisation: NaN scores are reported through the device's error word (common.cuh), which
// the Python wrapper reads after the call (or not: check_nan=False); the per-layer tables depend only on
// the layers' addresses, sizes and budgets and are cached on the device, and the masks are views of one
// output buffer addressed by offsets, so a warmed-up call copies nothing from the host and can be captured
// in a CUDA graph. Sizes and counts are int64 throughout.
#include "common.cuh"

#include <climits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace sparse_sam::cuda {
namespace {

constexpr int kItems = 8;
constexpr int64_t kTile = int64_t(kThreads) * kItems;
constexpr int kDigits = 256;

struct Group {
  const int64_t* src;         // [L] score pointers
  bool* out;                  // the masks of all layers, one buffer
  const int64_t* out_off;     // [L] where each layer's mask starts in `out`
  const int64_t* numel;       // [L]
  const int64_t* tile_start;  // [L + 1] exclusive prefix of tiles per layer
  int L;
};

struct TileRange {
  int layer;
  int64_t begin, end;
};

__device__ __forceinline__ TileRange tile_range(const Group& g, int64_t tile) {
  const int l = find_layer(g.tile_start, g.L, tile);
  const int64_t begin = (tile - g.tile_start[l]) * kTile;
  return {l, begin, min(g.numel[l], begin + kTile)};
}

template <typename T>
__global__ void digit_histogram_kernel(Group g, int level, const int64_t* active, const uint64_t* prefix,
                                       unsigned long long* hist, int* nan) {
  using U = typename T::key_t;
  __shared__ unsigned int local[kDigits];
  const TileRange r = tile_range(g, blockIdx.x);
  const U* src = reinterpret_cast<const U*>(g.src[r.layer]);
  const bool counting = active[r.layer] != 0;
  if (level == 0) {  // NaN scan of every layer, fused into the first pass
    bool has_nan = false;
    for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) has_nan |= key_is_nan<T>(src[i]);
    if (__syncthreads_or(has_nan) && threadIdx.x == 0) atomicOr(nan + r.layer, 1);
  }
  if (!counting) return;  // uniform per block
  for (int d = threadIdx.x; d < kDigits; d += kThreads) local[d] = 0;
  __syncthreads();
  const int shift = T::kBits - 8 * (level + 1);
  const U want = static_cast<U>(prefix[r.layer]);
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) {
    const U key = order_key<T>(src[i]);
    // At level 0 every key matches (and a shift by the full width would be undefined).
    if (level == 0 || U(key >> (shift + 8)) == want) atomicAdd(local + ((key >> shift) & 0xff), 1u);
  }
  __syncthreads();
  for (int d = threadIdx.x; d < kDigits; d += kThreads) {
    if (local[d]) atomicAdd(hist + int64_t(r.layer) * kDigits + d, static_cast<unsigned long long>(local[d]));
  }
}

// One thread per layer: the selection state before the first digit. Layers with k = 0 or k = n are
// inactive: a threshold that selects nothing (all-ones key) or everything (zero key; NaN excluded).
template <typename T>
__global__ void init_select_kernel(int L, const int64_t* ks, const int64_t* numel, uint64_t* prefix, int64_t* rem) {
  using U = typename T::key_t;
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  const int64_t k = ks[l], n = numel[l];
  const bool active = k > 0 && k < n;
  prefix[l] = k == 0 ? static_cast<uint64_t>(U(~U(0))) : 0;
  rem[l] = active ? k : 0;
}

// One thread per layer: the digit holding the rem-th largest key among those matching the prefix. After
// the first level it also reports NaN layers (lowest call-wide layer index) in the device's error word.
__global__ void pick_digit_kernel(int L, const int64_t* active, uint64_t* prefix, int64_t* rem,
                                  unsigned long long* hist, int level, const int* nan, const int64_t* layer_id,
                                  ErrorWord* err) {
  const int l = blockIdx.x * blockDim.x + threadIdx.x;
  if (l >= L) return;
  if (level == 0 && nan[l]) report_error(err, kErrNanScores, static_cast<int>(layer_id[l]), 0);
  if (!active[l]) return;
  unsigned long long* h = hist + int64_t(l) * kDigits;
  int64_t above = 0;
  int digit = kDigits - 1;
  for (; digit > 0; --digit) {
    const int64_t c = static_cast<int64_t>(h[digit]);
    if (above + c >= rem[l]) break;
    above += c;
  }
  prefix[l] = (prefix[l] << 8) | static_cast<uint64_t>(digit);
  rem[l] -= above;
  for (int d = 0; d < kDigits; ++d) h[d] = 0;  // ready for the next level
}

template <typename T>
__global__ void count_equal_kernel(Group g, const uint64_t* prefix, int64_t* tile_equal) {
  using U = typename T::key_t;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const TileRange r = tile_range(g, blockIdx.x);
  const U* src = reinterpret_cast<const U*>(g.src[r.layer]);
  const U t = static_cast<U>(prefix[r.layer]);
  int64_t c = 0;
  for (int64_t i = r.begin + threadIdx.x; i < r.end; i += kThreads) c += order_key<T>(src[i]) == t;
  const int64_t total = Reduce(tmp).Sum(c);
  if (threadIdx.x == 0) tile_equal[blockIdx.x] = total;
}

// One block per layer: exclusive scan of the per-tile equal counts, in tile (= index) order.
__global__ void scan_tiles_kernel(const int64_t* tile_start, int64_t* tile_equal) {
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ int64_t carry;
  const int64_t begin = tile_start[blockIdx.x], end = tile_start[blockIdx.x + 1];
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < end ? tile_equal[i] : 0;
    int64_t excl, total;
    Scan(tmp).ExclusiveSum(v, excl, total);
    if (i < end) tile_equal[i] = carry + excl;
    __syncthreads();
    if (threadIdx.x == 0) carry += total;
    __syncthreads();
  }
}

template <typename T>
__global__ void write_mask_kernel(Group g, const uint64_t* prefix, const int64_t* rem, const int64_t* equal_before) {
  using U = typename T::key_t;
  using Scan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const TileRange r = tile_range(g, blockIdx.x);
  const U* src = reinterpret_cast<const U*>(g.src[r.layer]);
  bool* dst = g.out + g.out_off[r.layer];
  const U t = static_cast<U>(prefix[r.layer]);
  // Blocked arrangement: thread j owns kItems consecutive elements, so a block scan of per-thread
  // equal counts ranks the equal keys in index order.
  const int64_t first = r.begin + int64_t(threadIdx.x) * kItems;
  U keys[kItems];
  int64_t mine = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    keys[j] = first + j < r.end ? order_key<T>(src[first + j]) : U(0);
    mine += first + j < r.end && keys[j] == t;
  }
  int64_t rank;
  Scan(tmp).ExclusiveSum(mine, rank);
  rank += equal_before[blockIdx.x];
  const int64_t take = rem[r.layer];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (first + j < r.end) {
      const bool eq = keys[j] == t;
      dst[first + j] = keys[j] > t || (eq && rank < take);
      rank += eq;
    }
  }
}

template <typename T>
void topk_group(const std::vector<at::Tensor>& scores, const at::Tensor& out, const std::vector<int64_t>& out_off,
                const std::vector<int64_t>& ks, const std::vector<int64_t>& layers) {
  const at::Device device = scores[layers[0]].device();
  const int L = static_cast<int>(layers.size());
  std::vector<int64_t> src(L), off(L), numel(L), tile_start(L + 1, 0), active(L), k(L);
  for (int j = 0; j < L; ++j) {
    const int64_t i = layers[j], n = scores[i].numel();
    src[j] = reinterpret_cast<int64_t>(scores[i].const_data_ptr());
    off[j] = out_off[i];
    numel[j] = n;
    k[j] = ks[i];
    tile_start[j + 1] = tile_start[j] + ceil_div(n, kTile);
    active[j] = ks[i] > 0 && ks[i] < n;
  }
  const int64_t tiles = tile_start[L];
  if (tiles == 0) return;
  TORCH_CHECK(tiles <= INT_MAX, "topk_mask (cuda): ", tiles, " tiles of ", kTile, " scores exceed the grid limit");
  // Read-only tables, cached on the device (see to_device).
  auto d_src = to_device(src, device), d_off = to_device(off, device), d_numel = to_device(numel, device);
  auto d_tiles = to_device(tile_start, device), d_active = to_device(active, device);
  auto d_k = to_device(k, device), d_layer = to_device(layers, device);
  auto opts = at::TensorOptions().device(device);
  // Mutable selection state: fresh device buffers, initialised on the device.
  auto d_prefix = at::empty({L}, opts.dtype(at::kLong)), d_rem = at::empty({L}, opts.dtype(at::kLong));
  auto hist = at::zeros({int64_t(L) * kDigits}, opts.dtype(at::kLong));
  auto nan = at::zeros({L}, opts.dtype(at::kInt));
  auto tile_equal = at::empty({tiles}, opts.dtype(at::kLong));
  const Group g{d_src.data_ptr<int64_t>(), out.data_ptr<bool>(), d_off.data_ptr<int64_t>(),
                d_numel.data_ptr<int64_t>(), d_tiles.data_ptr<int64_t>(), L};
  auto* prefix_p = reinterpret_cast<uint64_t*>(d_prefix.data_ptr<int64_t>());
  auto* hist_p = reinterpret_cast<unsigned long long*>(hist.data_ptr<int64_t>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const unsigned int grid = static_cast<unsigned int>(tiles);
  const unsigned int layer_grid = static_cast<unsigned int>(ceil_div(L, kThreads));
  ErrorWord* err = error_word(device);

  init_select_kernel<T><<<layer_grid, kThreads, 0, stream>>>(L, d_k.data_ptr<int64_t>(), d_numel.data_ptr<int64_t>(),
                                                              prefix_p, d_rem.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int level = 0; level < T::kBits / 8; ++level) {
    digit_histogram_kernel<T><<<grid, kThreads, 0, stream>>>(g, level, d_active.data_ptr<int64_t>(), prefix_p,
                                                             hist_p, nan.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    pick_digit_kernel<<<layer_grid, kThreads, 0, stream>>>(L, d_active.data_ptr<int64_t>(), prefix_p,
                                                           d_rem.data_ptr<int64_t>(), hist_p, level, nan.data_ptr<int>(),
                                                           d_layer.data_ptr<int64_t>(), err);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  count_equal_kernel<T><<<grid, kThreads, 0, stream>>>(g, prefix_p, tile_equal.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scan_tiles_kernel<<<static_cast<unsigned int>(L), kThreads, 0, stream>>>(d_tiles.data_ptr<int64_t>(),
                                                                            tile_equal.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  write_mask_kernel<T><<<grid, kThreads, 0, stream>>>(g, prefix_p, d_rem.data_ptr<int64_t>(),
                                                      tile_equal.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace sparse_sam::cuda

namespace sparse_sam {

std::vector<at::Tensor> topk_mask_cuda(at::TensorList scores, at::IntArrayRef ks) {
  check_topk_args(scores, ks);
  const size_t L = scores.size();
  std::vector<at::Tensor> flat(L), masks(L);
  std::vector<int64_t> k(ks.begin(), ks.end()), out_off(L);
  if (L == 0) return masks;
  const c10::cuda::CUDAGuard guard(scores[0].device());
  // Group layers by key width / NaN encoding: one launch sequence per group.
  std::vector<int64_t> f32, f64, f16, bf16;
  int64_t total = 0;
  for (size_t i = 0; i < L; ++i) {
    flat[i] = scores[i].contiguous();
    out_off[i] = total;
    total += scores[i].numel();
    switch (scores[i].scalar_type()) {
      case at::kFloat: f32.push_back(i); break;
      case at::kDouble: f64.push_back(i); break;
      case at::kHalf: f16.push_back(i); break;
      default: bf16.push_back(i); break;  // check_topk_args admits only the four float dtypes
    }
  }
  auto out = at::empty({total}, scores[0].options().dtype(at::kBool));
  for (size_t i = 0; i < L; ++i) masks[i] = out.narrow(0, out_off[i], scores[i].numel()).view(scores[i].sizes());
  if (!f32.empty()) cuda::topk_group<F32Keys>(flat, out, out_off, k, f32);
  if (!f64.empty()) cuda::topk_group<F64Keys>(flat, out, out_off, k, f64);
  if (!f16.empty()) cuda::topk_group<F16Keys>(flat, out, out_off, k, f16);
  if (!bf16.empty()) cuda::topk_group<BF16Keys>(flat, out, out_off, k, bf16);
  return masks;
}

}  // namespace sparse_sam
