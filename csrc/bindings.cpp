// Registers the sparse_sam ops with the PyTorch dispatcher (torch.ops.sparse_sam.*), so they run from
// Python, TorchScript and torch.compile alike. Fake (meta) kernels live in sparse_sam/_ext.py.
#include <Python.h>
#include <torch/library.h>

#include "sparse_sam.h"
#include "cpu/swap_plan.h"

// Lets the ahead-of-time build be imported as the Python module sparse_sam._C; importing it runs the
// static registrations below. The module itself has no attributes.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "sparse_sam compiled ops (torch.ops.sparse_sam)", -1,
                            nullptr};
  return PyModule_Create(&def);
}

TORCH_LIBRARY(sparse_sam, m) {
  m.def("topk_mask(Tensor[] scores, int[] ks) -> Tensor[]");
  m.def("sam_weight_forward(Tensor weight, Tensor mask, Tensor delta) -> Tensor");
  m.def(
      "sam_weight_backward(Tensor grad, Tensor mask, Tensor delta, ScalarType scores_dtype, bool dense)"
      " -> (Tensor, Tensor)");
  m.def("swap_(Tensor(a!)[] weights, Tensor[] indices, Tensor(b!)[] values) -> ()");
  // A patch's switch prepared once on the CPU (csrc/cpu/swap_plan.h): SwapPlan(weights, indices, patched,
  // base, bump_versions); .swap(only_if_unchanged) -> int (kSkipped -1, or kUnchanged 1 | kMatched 2),
  // .unchanged() -> bool, .on() -> bool.
  m.class_<sparse_sam::SwapPlanCpu>("SwapPlan")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, bool>())
      .def("swap", &sparse_sam::SwapPlanCpu::swap)
      .def("unchanged", &sparse_sam::SwapPlanCpu::unchanged)
      .def("on", &sparse_sam::SwapPlanCpu::on);
  // The cache of large CPU output blocks (csrc/cpu/alloc.cpp): {cached bytes, limit bytes, hits, misses}.
  m.def("cpu_cache_stats() -> int[]", &sparse_sam::cpu_cache_stats);
  m.def("cpu_cache_clear() -> ()", &sparse_sam::cpu_cache_clear);
#ifdef SPARSE_SAM_WITH_CUDA
  // The CUDA kernels report bad input (NaN scores, invalid swap indices) in a per-device error word
  // instead of synchronising: {code, lowest layer or -1, swap flags}; reading never blocks.
  m.def("cuda_take_error(int device) -> int[]", &sparse_sam::cuda_take_error);
#endif
}

TORCH_LIBRARY_IMPL(sparse_sam, CPU, m) {
  m.impl("topk_mask", &sparse_sam::topk_mask_cpu);
  m.impl("sam_weight_forward", &sparse_sam::sam_weight_forward_cpu);
  m.impl("sam_weight_backward", &sparse_sam::sam_weight_backward_cpu);
  m.impl("swap_", &sparse_sam::swap_cpu);
}

#ifdef SPARSE_SAM_WITH_CUDA
TORCH_LIBRARY_IMPL(sparse_sam, CUDA, m) {
  m.impl("topk_mask", &sparse_sam::topk_mask_cuda);
  m.impl("sam_weight_forward", &sparse_sam::sam_weight_forward_cuda);
  m.impl("sam_weight_backward", &sparse_sam::sam_weight_backward_cuda);
  m.impl("swap_", &sparse_sam::swap_cuda);
}
#endif
