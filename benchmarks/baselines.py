"""The strongest plain-PyTorch way of doing what each op does, shared by ``cpp_targets.py`` and the
pytest-benchmark suites. Every speed-up in this folder is measured against these, in the same run.

Each builder allocates what PyTorch lets a caller preallocate (``out=`` tensors, masks, buffers) once,
outside the timed call, and returns the function to time.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from sparse_sam.reference import bits_view


def topk_loop(scores: Sequence[Tensor], ks: Sequence[int]) -> Callable[[], list[Tensor]]:
    """Per layer: ``torch.topk(k, sorted=False)`` into preallocated values/indices, then zero a
    preallocated bool mask and ``index_fill_`` the indices (the fastest of scatter_, index_put_ and
    index_fill_ here). Returns the masks, shaped like the scores (reused from call to call)."""
    flat = [s.reshape(-1) for s in scores]
    vals = [torch.empty(k, dtype=s.dtype, device=s.device) for s, k in zip(flat, ks)]
    idx = [torch.empty(k, dtype=torch.long, device=s.device) for s, k in zip(flat, ks)]
    masks = [torch.empty(s.numel(), dtype=torch.bool, device=s.device) for s in flat]
    views = [m.view(s.shape) for m, s in zip(masks, scores)]

    def run() -> list[Tensor]:
        for s, k, v, i, m in zip(flat, ks, vals, idx, masks):
            torch.topk(s, k, sorted=False, out=(v, i))
            m.zero_()
            m.index_fill_(0, i, True)
        return views

    return run


def swap_loop(weights: Sequence[Tensor], indices: Sequence[Tensor],
              values: Sequence[Tensor]) -> Callable[[], None]:
    """Per layer, on raw bits: ``index_select`` the old weights into a preallocated buffer,
    ``index_copy_`` the values in, copy the old weights into the values. Indices are converted to
    int64 once, outside the timed call."""
    w_bits = [bits_view(w).view(-1) for w in weights]
    v_bits = [bits_view(v) for v in values]
    idx = [i.long() for i in indices]
    bufs = [torch.empty_like(v) for v in v_bits]

    def run() -> None:
        with torch.no_grad():
            for w, i, v, b in zip(w_bits, idx, v_bits, bufs):
                torch.index_select(w, 0, i, out=b)
                w.index_copy_(0, i, v)
                v.copy_(b)

    return run
