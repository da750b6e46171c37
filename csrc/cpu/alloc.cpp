// Output memory of the CPU ops.
//
// Every op returns fresh tensors. For large ones, the default allocator hands out memory that the
// kernel maps and the OS zeroes on first touch, page by page; on virtual machines that first touch can
// cost several times the op itself (sam_weight on 10M weights: ~5x). A training loop asks for the same
// sizes every step, so large outputs come from a small cache of freed blocks instead:
//
// * blocks of >= 1 MiB are rounded up to 2 MiB, aligned to 2 MiB and advised for transparent huge
//   pages (fewer TLB misses, 512x fewer faults the first time);
// * a freed block is kept for the next request of its size while the cache holds less than its limit
//   (SPARSE_SAM_CPU_CACHE_MB, default 512; 0 turns caching off), else returned to the OS;
// * torch.ops.sparse_sam.cpu_cache_stats() and cpu_cache_clear() inspect and empty it.
//
// Smaller outputs use PyTorch's own CPU allocator.
#include "../sparse_sam.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sparse_sam {
namespace {

constexpr size_t kMinCached = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

int64_t limit_from_env() {
  const char* env = std::getenv("SPARSE_SAM_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return int64_t(512) << 20;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0,
                    "SPARSE_SAM_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", env, "'");
  return int64_t(mb) << 20;
}

struct Block {
  void* ptr;
  size_t bytes;
};

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        cached_ -= int64_t(bytes);
        ++hits_;
        return {p, new Block{p, bytes}, &release, c10::Device(c10::kCPU)};
      }
      ++misses_;
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHugePage, bytes) != 0) {
      clear();  // give the held blocks back to the OS and try once more
      TORCH_CHECK(posix_memalign(&p, kHugePage, bytes) == 0, "sparse_sam: not enough memory for a ", n,
                  "-byte output (", bytes, " bytes with 2 MiB alignment)");
    }
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages are ordinary
#endif
    return {p, new Block{p, bytes}, &release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release(void* ctx) {
    auto* b = static_cast<Block*>(ctx);
    instance().put(b->ptr, b->bytes);
    delete b;
  }

  void put(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (cached_ + int64_t(bytes) <= limit_) {
        free_[bytes].push_back(p);
        cached_ += int64_t(bytes);
        return;
      }
    }
    std::free(p);
  }

  void clear() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [bytes, ptrs] : free_) drop.insert(drop.end(), ptrs.begin(), ptrs.end());
      free_.clear();
      cached_ = 0;
    }
    for (void* p : drop) std::free(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {cached_, limit_, hits_, misses_};
  }

  bool enabled() const { return limit_ > 0; }

  static BlockCache& instance() {
    static BlockCache* cache = [] {
      auto* c = new BlockCache();  // never destroyed: tensors may outlive static teardown
      // A child forked while another thread held the lock (DataLoader workers fork) would block
      // forever on its first large output: the child starts with a fresh, unlocked mutex.
      pthread_atfork(nullptr, nullptr, [] { new (&instance().mu_) std::mutex(); });
      return c;
    }();
    return *cache;
  }

 private:
  BlockCache() : limit_(limit_from_env()) {}

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t cached_ = 0, hits_ = 0, misses_ = 0;
  const int64_t limit_;
};

}  // namespace

at::Tensor empty_output_cpu(at::IntArrayRef sizes, at::ScalarType dtype) {
  const int64_t numel = c10::multiply_integers(sizes);
  const size_t nbytes = size_t(numel) * c10::elementSize(dtype);
  BlockCache& cache = BlockCache::instance();
  c10::Allocator* alloc = (nbytes >= kMinCached && cache.enabled()) ? static_cast<c10::Allocator*>(&cache)
                                                                    : c10::GetCPUAllocator();
  return at::detail::empty_generic(sizes, alloc, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

std::vector<int64_t> cpu_cache_stats() { return BlockCache::instance().stats(); }

void cpu_cache_clear() { BlockCache::instance().clear(); }

}  // namespace sparse_sam
