"""Triton kernels: the ``triton`` backend of :mod:`sparse_sam.backends`.

Importing this package raises ``ImportError`` when Triton is missing, which the backend registry
reports as the reason the backend is unavailable. On CPU tensors the kernels run only under
``TRITON_INTERPRET=1``, which must be set before Triton is first imported.
"""
import triton  # noqa: F401  (ImportError here marks the backend unavailable)

from .topk_mask import topk_mask

__all__ = ["topk_mask", "triton_version"]


def triton_version() -> str:
    """The installed Triton version string."""
    return triton.__version__
