// The per-device error word and the device table cache declared in common.cuh, and the host-side op that
// reads and clears the error word (torch.ops.sparse_sam.cuda_take_error).
#include "common.cuh"

#include <ATen/ops/empty.h>

#include <climits>
#include <map>
#include <mutex>
#include <utility>

namespace sparse_sam::cuda {
namespace {

std::mutex g_mutex;
std::map<int, ErrorWord*> g_words;                                      // device index -> mapped word
std::map<std::pair<int, std::vector<int64_t>>, at::Tensor> g_tables;   // (device, content) -> table
constexpr size_t kMaxTables = 256;

}  // namespace

ErrorWord* error_word(const at::Device& device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_words.find(device.index());
  if (it != g_words.end()) return it->second;
  const c10::cuda::CUDAGuard guard(device);
  void* host = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(ErrorWord), cudaHostAllocMapped | cudaHostAllocPortable));
  void* dev = nullptr;
  C10_CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
  TORCH_CHECK(dev == host, "sparse_sam: the CUDA error word needs unified addressing (64-bit host)");
  auto* word = static_cast<ErrorWord*>(host);
  *word = ErrorWord{0, INT_MAX, 0, 0};
  g_words[device.index()] = word;  // kept for the life of the process
  return word;
}

at::Tensor to_device(const std::vector<int64_t>& host, const at::Device& device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto key = std::make_pair(static_cast<int>(device.index()), host);
  auto it = g_tables.find(key);
  if (it != g_tables.end()) return it->second;
  auto pinned = at::empty({static_cast<int64_t>(host.size())},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), pinned.data_ptr<int64_t>());
  // Asynchronous: the pinned block stays reserved until the copy has run (caching host allocator).
  auto table = pinned.to(device, /*non_blocking=*/true);
  if (g_tables.size() >= kMaxTables) g_tables.clear();
  g_tables.emplace(std::move(key), table);
  return table;
}

}  // namespace sparse_sam::cuda

namespace sparse_sam {

std::vector<int64_t> cuda_take_error(int64_t device_index) {
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  auto* word = cuda::error_word(device);
  volatile auto* v = word;
  std::vector<int64_t> out{v->code, v->layer == INT_MAX ? -1 : v->layer, v->flags};
  if (out[0] != 0) {  // clear only what was read (a racing kernel's report may be lost; the next call sees its own)
    v->code = 0;
    v->flags = 0;
    v->layer = INT_MAX;
  }
  return out;
}

}  // namespace sparse_sam
