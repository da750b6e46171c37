"""In-place, bit-exact, self-inverse swap of a sparse patch into the weights, all layers per launch.

The layers are separate tensors, so the kernel takes tables of their addresses: one program per
block of ``BLOCK`` patch entries looks up its layer, turns the stored addresses into typed pointers
and exchanges ``weight.flat[idx[j]]`` with ``values[j]`` through same-width integer views, so every
float bit pattern (``-0.0``, NaN payloads, denormals) survives. Layers are grouped by element width;
a model with one weight dtype takes one launch.

Arguments are validated by the caller (``reference.check_swap_args``). The kernel still masks every
access by the layer's patch length and by ``0 <= idx < numel`` so it can never write out of bounds.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import device_guard

__all__ = ["swap_"]

BLOCK = 1024
_INT = {2: tl.int16, 4: tl.int32, 8: tl.int64}  # element size -> same-width integer


@triton.jit
def _swap_kernel(w_addr_ptr, v_addr_ptr, numel_ptr, idx_ptr, idx_off_ptr, len_ptr, blk_layer_ptr,
                 blk_start_ptr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    start = tl.load(blk_start_ptr + pid)
    w_ptr = tl.load(w_addr_ptr + layer).to(tl.pointer_type(BITS))
    v_ptr = tl.load(v_addr_ptr + layer).to(tl.pointer_type(BITS))
    j = start + tl.arange(0, BLOCK)
    ok = j < tl.load(len_ptr + layer)
    idx = tl.load(idx_ptr + tl.load(idx_off_ptr + layer) + j, mask=ok, other=0)
    ok = ok & (idx >= 0) & (idx < tl.load(numel_ptr + layer))
    old = tl.load(w_ptr + idx, mask=ok)
    new = tl.load(v_ptr + j, mask=ok)
    tl.store(w_ptr + idx, new, mask=ok)
    tl.store(v_ptr + j, old, mask=ok)


def _launch(weights: list[Tensor], indices: list[Tensor], values: list[Tensor], bits) -> None:
    device = weights[0].device
    lens = [int(i.numel()) for i in indices]
    nblk = [triton.cdiv(n, BLOCK) for n in lens]
    blk_layer = [l for l, b in enumerate(nblk) for _ in range(b)]
    blk_start = [s * BLOCK for b in nblk for s in range(b)]
    idx_off = [sum(lens[:l]) for l in range(len(lens))]
    meta = torch.tensor([[w.data_ptr() for w in weights], [v.data_ptr() for v in values],
                         [w.numel() for w in weights], idx_off, lens], dtype=torch.int64)
    blk = torch.tensor([blk_layer, blk_start], dtype=torch.int64)
    meta, blk = meta.to(device), blk.to(device)
    # Indices may mix int32/int64 across layers; one int64 copy (k entries) keeps a single launch.
    idx = torch.cat([i.reshape(-1).to(torch.int64) for i in indices])
    with device_guard(idx):
        _swap_kernel[(len(blk_layer),)](meta[0], meta[1], meta[2], idx, meta[3], meta[4], blk[0], blk[1],
                                        BITS=bits, BLOCK=BLOCK, num_warps=4)


def swap_(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """In place: ``weights[l].flat[indices[l][j]] <-> values[l][j]`` as raw bits, for every layer.

    Shapes: ``weights[l]`` any contiguous shape; ``indices[l]`` and ``values[l]`` of shape ``(k_l,)``,
    ``values[l]`` in ``weights[l].dtype``. Self-inverse. Arguments must already be validated.

    Equivalent PyTorch, per layer (on integer views)::

        old = w.view(-1)[idx].clone(); w.view(-1)[idx] = val; val.copy_(old)
    """
    groups: dict[int, list[int]] = {}
    for l, (w, i) in enumerate(zip(weights, indices)):
        if i.numel():
            groups.setdefault(w.element_size(), []).append(l)
    for size, layers in groups.items():
        _launch([weights[l] for l in layers], [indices[l] for l in layers], [values[l] for l in layers],
                _INT[size])
