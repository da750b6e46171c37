// SwapPlanCpu: the CPU swap_ prepared once for a patch, registered as torch.classes.sparse_sam.SwapPlan
// (csrc/cpu/swap.cpp). Kept out of sparse_sam.h, which the CUDA sources include too.
#pragma once

#include <torch/custom_class.h>

#include <vector>

namespace sparse_sam {

// A CPU swap_ prepared once for a patch (torch.classes.sparse_sam.SwapPlan; csrc/cpu/swap.cpp). The
// constructor validates like swap_; swap(check) exchanges every layer in one call, bumps the weights'
// version counters (when made with bump_versions) and, with check, returns whether the bits taken out of
// the weights equal `expect` (one tensor per layer, like values; empty: nothing to compare, true).
// unchanged(): no weight was written or reallocated since the plan's last swap (or its creation).
struct SwapPlanCpu : torch::CustomClassHolder {
  SwapPlanCpu(std::vector<at::Tensor> weights, std::vector<at::Tensor> indices, std::vector<at::Tensor> values,
              std::vector<at::Tensor> expect, bool bump_versions);
  bool swap(bool check);
  bool unchanged() const;

 private:
  std::vector<int64_t> versions() const;
  std::vector<at::Tensor> weights_, indices_, values_, expect_;
  std::vector<const void*> storage_;
  std::vector<int64_t> numel_, start_, versions_;
  bool bump_;
};

}  // namespace sparse_sam
