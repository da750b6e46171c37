"""Fused ``W + m ⊙ v`` forward and its one-pass backward (docs/design.md §3, sam_weight).

Both kernels are pure streams: the forward reads W, m, v and writes W_eff; the backward reads g, m,
v and writes grad_delta and grad_scores, so each runs near the memory-bandwidth floor.

Rounding matches the reference exactly: arithmetic happens in float32 (float64 when an operand is
float64) and is rounded once to the output dtype. For 16-bit operands this equals PyTorch's
promoted-dtype result, because a float32 sum or product of two 16-bit floats rounded to 16 bits is
correctly rounded (float32 carries more than twice their precision plus two bits).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_sam import reference

from .common import device_guard

__all__ = ["sam_weight_forward", "sam_weight_backward", "sam_weight_forward_grouped", "compute_dtype", "round_to",
           "weff", "TL_DTYPES"]

BLOCK = 2048
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
       torch.float64: tl.float64}


def compute_dtype(*dtypes: torch.dtype):
    """Triton dtype the kernels compute in for operands of ``dtypes``."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


@triton.jit
def round_to(x, DT: tl.constexpr):
    """Round ``x`` to ``DT`` to nearest even. bfloat16 is rounded with integer ops, as PyTorch does
    (through float32): the interpreter's own float32→bfloat16 cast truncates."""
    if DT == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)  # canonical quiet NaN, as PyTorch rounds NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


@triton.jit
def weff(w, m, v, CD: tl.constexpr):
    """``where(m, round(W + v), W)``; the untouched W keeps its exact bits (no arithmetic on it)."""
    return tl.where(m != 0, round_to(w.to(CD) + v.to(CD), w.dtype), w)


@triton.jit
def _sam_weight_fwd_kernel(w_ptr, m_ptr, v_ptr, out_ptr, n, CD: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    w = tl.load(w_ptr + offs, mask=ok)
    m = tl.load(m_ptr + offs, mask=ok, other=0)
    v = tl.load(v_ptr + offs, mask=ok)
    tl.store(out_ptr + offs, weff(w, m, v, CD), mask=ok)


@triton.jit
def _sam_weight_bwd_kernel(g_ptr, m_ptr, v_ptr, gd_ptr, gs_ptr, n, MASKED: tl.constexpr, CD: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    g = tl.load(g_ptr + offs, mask=ok)
    v = tl.load(v_ptr + offs, mask=ok)
    gd = round_to(g, v.dtype)
    if MASKED:
        m = tl.load(m_ptr + offs, mask=ok, other=0)
        gd = tl.where(m != 0, gd, 0.0)
    tl.store(gd_ptr + offs, gd, mask=ok)
    gs = g.to(CD) * v.to(CD)
    tl.store(gs_ptr + offs, round_to(gs, gs_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sam_weight_fwd_grouped_kernel(w_addr_ptr, m_addr_ptr, v_addr_ptr, len_ptr, out_off_ptr, blk_layer_ptr,
                                   blk_start_ptr, out_ptr, WD: tl.constexpr, VD: tl.constexpr, CD: tl.constexpr,
                                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    layer = tl.load(blk_layer_ptr + pid)
    offs = tl.load(blk_start_ptr + pid) + tl.arange(0, BLOCK)
    ok = offs < tl.load(len_ptr + layer)
    w = tl.load(tl.load(w_addr_ptr + layer).to(tl.pointer_type(WD)) + offs, mask=ok)
    m = tl.load(tl.load(m_addr_ptr + layer).to(tl.pointer_type(tl.uint8)) + offs, mask=ok, other=0)
    v = tl.load(tl.load(v_addr_ptr + layer).to(tl.pointer_type(VD)) + offs, mask=ok)
    tl.store(out_ptr + tl.load(out_off_ptr + layer) + offs, weff(w, m, v, CD), mask=ok)


def _check_dtype(*ts: Tensor) -> None:
    for t in ts:
        if t.dtype not in TL_DTYPES:
            raise TypeError(f"sam_weight (triton): unsupported dtype {t.dtype}; expected one of {list(TL_DTYPES)}")


def sam_weight_forward(weight: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
    """``W_eff = where(m, W + v, W)`` in one pass; all of shape ``P``, result in ``weight.dtype``.

    Equivalent PyTorch: ``reference.sam_weight_forward_ref(weight, mask, delta)``.
    """
    _check_dtype(weight, delta)
    w, m, v = weight.detach().contiguous(), mask.contiguous().view(torch.uint8), delta.detach().contiguous()
    out = torch.empty_like(w)
    n = w.numel()
    if n:
        with device_guard(w):
            _sam_weight_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                w, m, v, out, n, CD=compute_dtype(w.dtype, v.dtype), BLOCK=BLOCK, num_warps=8)
    return out


def sam_weight_backward(grad: Tensor, mask: Tensor, delta: Tensor, scores_dtype: torch.dtype,
                        delta_grad: str = "masked") -> tuple[Tensor, Tensor]:
    """``(grad_delta, grad_scores)`` from ``grad = ∂L/∂W_eff`` in one pass over g, m, v (shape ``P``).

    ``grad_delta = where(m, g, 0)`` ("masked") or ``g`` ("dense") in ``delta.dtype``;
    ``grad_scores = g ⊙ v`` in ``scores_dtype``.

    Equivalent PyTorch: ``reference.sam_weight_backward_ref(grad, mask, delta, scores_dtype, delta_grad)``.
    """
    if delta_grad not in reference.DELTA_GRAD_MODES:
        raise ValueError(f"delta_grad must be one of {reference.DELTA_GRAD_MODES}, got {delta_grad!r}")
    _check_dtype(grad, delta)
    if scores_dtype not in TL_DTYPES:
        raise TypeError(f"sam_weight (triton): unsupported scores dtype {scores_dtype}")
    g, m, v = grad.contiguous(), mask.contiguous().view(torch.uint8), delta.detach().contiguous()
    gd = torch.empty_like(v)
    gs = torch.empty(v.shape, dtype=scores_dtype, device=v.device)
    n = v.numel()
    if n:
        with device_guard(v):
            _sam_weight_bwd_kernel[(triton.cdiv(n, BLOCK),)](
                g, m, v, gd, gs, n, MASKED=delta_grad == "masked",
                CD=compute_dtype(g.dtype, v.dtype, scores_dtype), BLOCK=BLOCK, num_warps=8)
    return gd, gs


def sam_weight_forward_grouped(weights: Sequence[Tensor], masks: Sequence[Tensor],
                               deltas: Sequence[Tensor]) -> list[Tensor]:
    """:func:`sam_weight_forward` for many layers in one launch per (weight, delta) dtype pair.

    Layers are addressed through a device table of their addresses, so no input is copied; the
    results are views of one flat buffer per dtype pair. Shapes: ``weights[l]``, ``masks[l]``,
    ``deltas[l]`` all ``P_l``; result ``l`` has shape ``P_l`` and ``weights[l].dtype``.

    Equivalent PyTorch: ``[sam_weight_forward_ref(w, m, v) for w, m, v in zip(weights, masks, deltas)]``.
    """
    reference.check_one_device("sam_weight_forward_grouped", [t for l in zip(weights, masks, deltas) for t in l],
                               per_layer=3)
    ws = [w.detach().contiguous() for w in weights]
    ms = [m.contiguous().view(torch.uint8) for m in masks]
    vs = [v.detach().contiguous() for v in deltas]
    _check_dtype(*ws, *vs)
    out: list[Tensor | None] = [None] * len(ws)
    groups: dict[tuple, list[int]] = {}
    for l, (w, v) in enumerate(zip(ws, vs)):
        groups.setdefault((w.dtype, v.dtype), []).append(l)
    for (wd, vd), layers in groups.items():
        lens = [ws[l].numel() for l in layers]
        offs = [sum(lens[:i]) for i in range(len(lens))]
        flat = torch.empty(sum(lens), dtype=wd, device=ws[layers[0]].device)
        nblk = [triton.cdiv(n, BLOCK) for n in lens]
        blk = torch.tensor([[i for i, b in enumerate(nblk) for _ in range(b)],
                            [j * BLOCK for b in nblk for j in range(b)]], dtype=torch.int64)
        meta = torch.tensor([[ws[l].data_ptr() for l in layers], [ms[l].data_ptr() for l in layers],
                             [vs[l].data_ptr() for l in layers], lens, offs], dtype=torch.int64)
        meta, blk = meta.to(flat.device), blk.to(flat.device)
        if blk.shape[1]:
            with device_guard(flat):
                _sam_weight_fwd_grouped_kernel[(blk.shape[1],)](
                    meta[0], meta[1], meta[2], meta[3], meta[4], blk[0], blk[1], flat,
                    WD=TL_DTYPES[wd], VD=TL_DTYPES[vd], CD=compute_dtype(wd, vd), BLOCK=BLOCK, num_warps=8)
        for l, o, n in zip(layers, offs, lens):
            out[l] = flat[o:o + n].view(ws[l].shape)
    return out
