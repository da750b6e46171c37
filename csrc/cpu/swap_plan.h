// SwapPlanCpu: the CPU swap_ prepared once for a patch, registered as torch.classes.sparse_sam.SwapPlan
// (csrc/cpu/swap.cpp). Kept out of sparse_sam.h, which the CUDA sources include too.
#pragma once

#include <torch/custom_class.h>

#include <vector>

namespace sparse_sam {

// A patch's CPU switch prepared once (torch.classes.sparse_sam.SwapPlan; csrc/cpu/swap.cpp): for each
// layer, the weight, its sorted flat indices, the patched bits and the base bits there (one tensor per
// layer each). The constructor validates like swap_; the plan starts off (the weights hold the base).
// swap(only_if_unchanged) is one whole switch in one call:
//   - with only_if_unchanged, when a weight was written or reallocated since the last swap (or the
//     plan's creation), it writes nothing and returns kSkipped;
//   - switching on, it writes the patched bits where the weights hold the base bits; if any entry does
//     not (an edit that bypassed the version counter), it puts back every entry it wrote and stays off;
//   - switching off, it writes the base bits;
//   - it bumps the weights' version counters (when made with bump_versions) and returns kUnchanged if
//     no weight had been written since the last swap, plus kMatched unless switching on found an entry
//     that was not the base bits.
// unchanged(): no weight was written or reallocated since the plan's last swap (or its creation).
struct SwapPlanCpu : torch::CustomClassHolder {
  SwapPlanCpu(std::vector<at::Tensor> weights, std::vector<at::Tensor> indices, std::vector<at::Tensor> patched,
              std::vector<at::Tensor> base, bool bump_versions);
  static constexpr int64_t kSkipped = -1, kUnchanged = 1, kMatched = 2;
  int64_t swap(bool only_if_unchanged);
  bool unchanged() const;
  bool on() const { return on_; }

 private:
  std::vector<at::Tensor> weights_, indices_, patched_, base_;
  std::vector<const void*> storage_;
  std::vector<int64_t> numel_, start_, versions_;
  bool bump_, on_ = false;
};

}  // namespace sparse_sam
