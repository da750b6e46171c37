"""Triton kernels: the ``triton`` backend of :mod:`sparse_sam.backends`.

Importing this package raises ``ImportError`` when Triton is missing, which the backend registry
reports as the reason the backend is unavailable. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1``, which must be set before Triton is first imported.

``sam_linear_forward`` is intentionally absent: see :mod:`sparse_sam.kernels.sam_conv` for why a linear
layer is better served by materialising ``W_eff`` and calling cuBLAS.
"""
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .patch_swap import swap_
from .sam_conv import sam_conv2d_forward, sam_conv_transpose2d_forward
from .sam_weight import sam_weight_backward, sam_weight_forward, sam_weight_forward_grouped
from .topk_mask import topk_mask

__all__ = ["topk_mask", "sam_weight_forward", "sam_weight_backward", "sam_weight_forward_grouped", "swap_",
           "sam_conv2d_forward", "sam_conv_transpose2d_forward", "triton_version"]


def triton_version() -> str:
    """The installed Triton version string."""
    return triton.__version__
