"""What every Triton launch of this package shares: the device guard and the 32-bit index limit.

Triton launches a kernel on the *current* CUDA device, not on the device of its tensors, so every
launch runs under :func:`device_guard` of its tensors (on a machine with several GPUs a tensor on
``cuda:1`` would otherwise be addressed from ``cuda:0``). Under ``TRITON_INTERPRET=1`` (CPU tensors)
the guard does nothing.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["device_guard", "INT32_LIMIT"]

# Kernels that count or index in int32 handle up to this many elements per layer (a kernel's docstring
# says which). Module-level so tests can lower it to exercise the guards on small tensors.
INT32_LIMIT = 2**31 - 1


def device_guard(t: Tensor):
    """A context that makes ``t``'s CUDA device current (a no-op for CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
