// SwapPlanCpu: the CPU swap_ prepared once for a patch, registered as torch.classes.sparse_sam.SwapPlan
// (csrc/cpu/swap.cpp). Kept out of sparse_sam.h, which the CUDA sources include too.
#pragma once

#include <torch/custom_class.h>

#include <vector>

namespace sparse_sam {

// A CPU swap_ prepared once for a patch (torch.classes.sparse_sam.SwapPlan; csrc/cpu/swap.cpp). The
// constructor validates like swap_. swap(check, only_if_unchanged) is one whole switch in one call:
//   - with only_if_unchanged, when a weight was written or reallocated since the last swap (or the
//     plan's creation), it writes nothing and returns kSkipped;
//   - otherwise it exchanges every layer, bumps the weights' version counters (when made with
//     bump_versions) and returns kUnchanged if no weight had been written since the last swap, plus
//     kMatched if the bits taken out of the weights equal `expect` (one tensor per layer, like values;
//     always set without check or with `expect` empty).
// unchanged(): no weight was written or reallocated since the plan's last swap (or its creation).
struct SwapPlanCpu : torch::CustomClassHolder {
  SwapPlanCpu(std::vector<at::Tensor> weights, std::vector<at::Tensor> indices, std::vector<at::Tensor> values,
              std::vector<at::Tensor> expect, bool bump_versions);
  static constexpr int64_t kSkipped = -1, kUnchanged = 1, kMatched = 2;
  int64_t swap(bool check, bool only_if_unchanged);
  bool unchanged() const;

 private:
  std::vector<int64_t> versions() const;
  std::vector<at::Tensor> weights_, indices_, values_, expect_;
  std::vector<const void*> storage_;
  std::vector<int64_t> numel_, start_, versions_;
  bool bump_;
};

}  // namespace sparse_sam
