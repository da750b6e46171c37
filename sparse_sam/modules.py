"""SAM layers: wrap a base Conv2d / ConvTranspose2d / Linear and compute with ``W + m ⊙ v``.

A SAM layer never copies the base weight: it registers the base module's own ``weight`` and ``bias``
Parameter objects, so ``state_dict`` keys of the base layer stay where they were and the memory is
shared. It adds two trainable tensors of the weight's shape, ``scores`` (float32, decide the mask) and
``delta`` (the additive modification ``v``; float32, or float64 for float64 weights), and a
non-persistent bool buffer ``mask`` that the owning :class:`~sparse_sam.patching.SAMHandle` keeps up to
date for all layers at once.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["SAMLayer", "SAMConv2d", "SAMConvTranspose2d", "SAMLinear", "sam_class_for"]


def _delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # Half/bf16 deltas would swallow updates of size lr·g; keep them in float32 and round W + v once.
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class SAMLayer(nn.Module):
    """Common part of the SAM layers. Not used directly: see :class:`SAMConv2d` and friends."""

    def __init__(self, base: nn.Module, k: int, delta_grad: str = "masked", backend: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        w = base.weight
        object.__setattr__(self, "base", base)  # kept for unpatch; not a submodule (no duplicate state)
        self.weight = w
        self.bias = getattr(base, "bias", None)
        self.k, self.delta_grad, self.backend = int(k), delta_grad, backend
        # Draw on the CPU so a seed gives the same scores on every device.
        scores = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        self.scores = nn.Parameter(scores.to(w.device))
        self.delta = nn.Parameter(torch.zeros(w.shape, dtype=_delta_dtype(w.dtype), device=w.device))
        self.register_buffer("mask", torch.zeros(w.shape, dtype=torch.bool, device=w.device), persistent=False)
        self._mask_version = None  # scores._version the mask was computed from
        self._refresh = None  # set by the handle: recomputes every layer's mask in one call

    def _ensure_mask(self) -> None:
        # Inside a torch.compile'd forward the mask is read as the buffer it is: a tensor's ``_version``
        # cannot be traced, and the handle already refreshes every mask after each optimiser step (see
        # SAMHandle), outside any compiled region.
        if torch.compiler.is_compiling():
            return
        if self._refresh is not None and self.mask_stale():
            self._refresh()

    def mask_stale(self) -> bool:
        """Whether the scores changed since the mask was last computed from them."""
        return self._mask_version != self.scores._version

    def extra_repr(self) -> str:
        return f"{self.base!r}, k={self.k}/{self.weight.numel()}, delta_grad={self.delta_grad!r}"

    def _sam_args(self):
        self._ensure_mask()
        return dict(scores=self.scores, delta_grad=self.delta_grad, backend=self.backend)


class SAMConv2d(SAMLayer):
    """``nn.Conv2d`` with weight ``W + m ⊙ v``. Input ``(N, C_in, H, W)`` → ``(N, C_out, H_out, W_out)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        b = self.base
        padding = b.padding
        if b.padding_mode != "zeros":
            input = F.pad(input, b._reversed_padding_repeated_twice, mode=b.padding_mode)
            padding = 0
        return ops.sam_conv2d(input, self.weight, self.mask, self.delta, self.bias, b.stride, padding,
                              b.dilation, b.groups, **self._sam_args())


class SAMConvTranspose2d(SAMLayer):
    """``nn.ConvTranspose2d`` with weight ``W + m ⊙ v``. Input ``(N, C_in, H, W)`` → ``(N, C_out, H_out, W_out)``."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        b = self.base
        output_padding = b._output_padding(input, output_size, b.stride, b.padding, b.kernel_size, 2, b.dilation)
        return ops.sam_conv_transpose2d(input, self.weight, self.mask, self.delta, self.bias, b.stride,
                                        b.padding, output_padding, b.groups, b.dilation, **self._sam_args())


class SAMLinear(SAMLayer):
    """``nn.Linear`` with weight ``W + m ⊙ v``. Input ``(*, in)`` → ``(*, out)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return ops.sam_linear(input, self.weight, self.mask, self.delta, self.bias, **self._sam_args())


# Exact types only: a subclass may change forward in ways a SAM layer would silently drop.
_SAM_CLASSES = {nn.Conv2d: SAMConv2d, nn.ConvTranspose2d: SAMConvTranspose2d, nn.Linear: SAMLinear}


def sam_class_for(module: nn.Module) -> type[SAMLayer]:
    """The SAM layer class that replaces ``module``; raises ``TypeError`` if there is none."""
    try:
        return _SAM_CLASSES[type(module)]
    except KeyError:
        raise TypeError(f"no SAM layer for {type(module).__name__}; supported: "
                        f"{', '.join(c.__name__ for c in _SAM_CLASSES)}") from None
