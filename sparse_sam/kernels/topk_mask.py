"""Segmented top-k → mask for every layer of a model in two Triton launches (plus one memset).

The layers are read in place through a device table of their addresses (cached: a model's score
tensors keep their storage from step to step), so no flat copy of the scores is made.

Algorithm (radix select on order-preserving 32-bit keys, exact and deterministic):

1. ``_topk_hist_kernel`` (one program per block of ``BLOCK`` scores; blocks never straddle layers):
   maps each score to an unsigned key whose integer order is the float order (``-0.0`` is first
   canonicalised to ``+0.0`` so they tie), flags NaN per layer, and adds the top 16 key bits to a
   per-layer 65536-bin histogram with global atomics. The last program of a layer to finish (a
   per-layer ticket counter) scans that histogram and stores the bin ``d1`` holding the k-th largest
   key and how many of the layer's ``k`` remain to be taken inside that bin.
2. ``_topk_select_kernel`` (same grid): writes 1 where the top digit is above ``d1`` and 0 where it
   is below; keys whose top digit equals ``d1`` are *candidates*, compacted into a per-layer list.
   The last program of each layer refines its candidates: two 8-bit radix passes over the low 16
   key bits give the exact threshold key; if the threshold key has more copies than slots left,
   four 8-bit passes over the candidates' indices find the index cut, so equal scores go to the
   lower index, exactly like the reference's stable sort. It then writes the candidates' mask bits.

Cost: two reads of the scores, one write of the mask, plus candidate traffic and a memset of the
256 KiB per-layer histograms (52 MB for 200 layers). With 16 top bits a
candidate bin spans 1/128 of an octave, so for smooth score distributions the serial refinement
touches a small fraction of a layer. Worst case (a whole layer of equal scores, e.g. freshly
initialised constant scores) one program refines the whole layer: still exact, just not parallel.

NaN check: the kernels record NaN per layer in a device flag; turning it into the ``ValueError``
the protocol requires needs one device→host read after the launches. ``check_nan=False`` skips that
read (no host synchronisation at all, the mask of a NaN layer is then unspecified).

Scores of dtype float16/bfloat16/float32 are supported (widened to float32 in registers, which is
exact and order-preserving); float64 scores fall back to the reference (they would need 64-bit keys).

Index width: histogram counts, ``k``, candidate counts and the candidates' (layer-local) indices are
int32, addresses and offsets across layers int64. A call with a layer of more than
``common.INT32_LIMIT`` (2^31 - 1) scores therefore runs on the reference's threshold selection
(``torch.topk`` + int64 cumsum) instead, before anything is launched or written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_sam import reference

from . import common
from .common import device_guard
from .sam_weight import TL_DTYPES

__all__ = ["topk_mask"]

BLOCK = 4096          # scores per program in both passes
NBINS = 1 << 16       # the global histogram resolves the top 16 key bits (the kernels split 16 + 8 + 8)
SCAN_CHUNK = 4096     # histogram bins scanned per step by a layer's last program
REFINE_BLOCK = 1024   # candidates per step in the serial refinement
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _keys(x):
    """Order-preserving uint32 key of float32 scores (``-0.0`` canonicalised to ``+0.0``)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.uint32, bitcast=True)
    neg = (b >> 31) != 0
    # Negative floats order backwards in their bit pattern: flip all bits; positive: flip the sign.
    return tl.where(neg, ~b, b | 0x80000000)


@triton.jit
def _topk_hist_kernel(seg_addr_ptr, blk_seg_ptr, blk_start_ptr, seg_len_ptr, seg_k_ptr, seg_nblk_ptr,
                      hist_ptr, ticket_ptr, nan_ptr, sel_ptr, SDT: tl.constexpr,
                      BLOCK: tl.constexpr, NBINS: tl.constexpr, SCAN_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    scores_ptr = tl.load(seg_addr_ptr + seg).to(tl.pointer_type(SDT))
    offs = tl.load(blk_start_ptr + pid) + tl.arange(0, BLOCK)  # layer-local
    inb = offs < tl.load(seg_len_ptr + seg)
    x = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    n_nan = tl.sum(((x != x) & inb).to(tl.int32), axis=0)
    tl.atomic_max(nan_ptr + seg, 1, mask=n_nan > 0, sem="relaxed")
    digit = (_keys(x) >> 16).to(tl.int64)
    hist = hist_ptr + seg.to(tl.int64) * NBINS
    tl.atomic_add(hist + digit, 1, mask=inb, sem="relaxed")
    # All of this program's histogram updates must be visible before its ticket is.
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + seg, 1, sem="acq_rel")
    if ticket == tl.load(seg_nblk_ptr + seg) - 1:
        k = tl.load(seg_k_ptr + seg).to(tl.int32)
        above = k * 0  # keys in bins above the current chunk (int32 tensors: loop-carried)
        d1 = tl.where(k == 0, NBINS, 0)  # k == 0: a threshold above every digit selects nothing
        krem = k * 0
        for c in range(0, NBINS // SCAN_CHUNK):
            base = NBINS - (c + 1) * SCAN_CHUNK
            bins = base + tl.arange(0, SCAN_CHUNK)
            h = tl.load(hist + bins, volatile=True)
            cs = tl.cumsum(h, axis=0)
            tot = tl.sum(h, axis=0)
            gt = above + tot - cs  # keys in bins strictly above each bin
            hit = (gt < k) & (gt + h >= k)  # true for exactly one bin when k > 0
            d1 += tl.sum(tl.where(hit, bins, 0), axis=0)
            krem += tl.sum(tl.where(hit, k - gt, 0), axis=0)
            above += tot
        tl.store(sel_ptr + 2 * seg, d1)
        tl.store(sel_ptr + 2 * seg + 1, krem)


@triton.jit
def _digit_select(h, kr, LARGEST: tl.constexpr):
    """For a 256-bin histogram ``h`` and a rank ``kr`` (1-based), the bin holding the kr-th key
    (largest-first or smallest-first) and the rank left inside that bin."""
    bins = tl.arange(0, 256)
    cs = tl.cumsum(h, axis=0)
    if LARGEST:
        before = tl.sum(h, axis=0) - cs
    else:
        before = cs - h
    hit = (before < kr) & (before + h >= kr)
    d = tl.sum(tl.where(hit, bins, 0), axis=0)
    kr_left = tl.sum(tl.where(hit, kr - before, 0), axis=0)
    cnt = tl.sum(tl.where(hit, h, 0), axis=0)
    return d, kr_left, cnt


@triton.jit
def _topk_select_kernel(seg_addr_ptr, mask_ptr, blk_seg_ptr, blk_start_ptr, seg_off_ptr, seg_len_ptr,
                        seg_nblk_ptr, sel_ptr, cand_ptr, cand_cnt_ptr, ticket_ptr, SDT: tl.constexpr,
                        BLOCK: tl.constexpr, NBINS: tl.constexpr, REFINE_BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    seg = tl.load(blk_seg_ptr + pid)
    scores_ptr = tl.load(seg_addr_ptr + seg).to(tl.pointer_type(SDT))
    seg_off = tl.load(seg_off_ptr + seg)  # where the layer starts in the flat mask / candidate buffers
    d1 = tl.load(sel_ptr + 2 * seg)
    krem = tl.load(sel_ptr + 2 * seg + 1)
    offs = tl.load(blk_start_ptr + pid) + tl.arange(0, BLOCK)  # layer-local
    inb = offs < tl.load(seg_len_ptr + seg)
    x = tl.load(scores_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    digit = (_keys(x) >> 16).to(tl.int32)
    cand = (digit == d1) & inb
    tl.store(mask_ptr + seg_off + offs, (digit > d1).to(tl.int8), mask=inb & (digit != d1))
    # Compact candidate indices (segment-local) into the layer's slice of the candidate buffer.
    c = cand.to(tl.int32)
    n_cand = tl.sum(c, axis=0)
    pos = tl.cumsum(c, axis=0) - c
    base = tl.atomic_add(cand_cnt_ptr + seg, n_cand, sem="relaxed")
    tl.store(cand_ptr + seg_off + base + pos, offs.to(tl.int32), mask=cand)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr + seg, 1, sem="acq_rel")
    if ticket == tl.load(seg_nblk_ptr + seg) - 1:
        n_all = tl.atomic_add(cand_cnt_ptr + seg, 0, sem="acquire")
        cbase = cand_ptr + seg_off
        sbase = scores_ptr
        r = tl.arange(0, REFINE_BLOCK)
        # Low 16 key bits: high byte, then low byte (largest first).
        h = tl.zeros([256], dtype=tl.int32)
        for i in range(0, n_all, REFINE_BLOCK):
            ok = i + r < n_all
            idx = tl.load(cbase + i + r, mask=ok, other=0, volatile=True)
            low = (_keys(tl.load(sbase + idx, mask=ok, other=0.0).to(tl.float32)) & 0xFFFF).to(tl.int32)
            h += tl.histogram(low >> 8, 256, mask=ok)
        hi, kr, _ = _digit_select(h, krem, True)
        h = tl.zeros([256], dtype=tl.int32)
        for i in range(0, n_all, REFINE_BLOCK):
            ok = i + r < n_all
            idx = tl.load(cbase + i + r, mask=ok, other=0, volatile=True)
            low = (_keys(tl.load(sbase + idx, mask=ok, other=0.0).to(tl.float32)) & 0xFFFF).to(tl.int32)
            h += tl.histogram(low & 0xFF, 256, mask=ok & ((low >> 8) == hi))
        lo, kr, n_eq = _digit_select(h, kr, True)
        thr = (hi << 8) | lo
        # More copies of the threshold key than slots left: the lowest indices among them win.
        # Segment-local indices are < 2**31, so four 8-bit digits from bit 24 cover them.
        idx_cut = krem * 0 + 0x7FFFFFFF
        if (kr < n_eq) & (krem > 0):
            prefix = krem * 0
            for p in tl.static_range(4):  # digit p covers index bits [24 - 8p, 32 - 8p)
                h = tl.zeros([256], dtype=tl.int32)
                for i in range(0, n_all, REFINE_BLOCK):
                    ok = i + r < n_all
                    idx = tl.load(cbase + i + r, mask=ok, other=0, volatile=True)
                    low = (_keys(tl.load(sbase + idx, mask=ok, other=0.0).to(tl.float32)) & 0xFFFF).to(tl.int32)
                    tie = ok & (low == thr)
                    if p > 0:  # a 32-bit shift would be undefined; the top digit has no prefix
                        tie = tie & ((idx >> (32 - 8 * p)) == prefix)
                    h += tl.histogram((idx >> (24 - 8 * p)) & 0xFF, 256, mask=tie)
                dg, kr, _ = _digit_select(h, kr, False)
                prefix = (prefix << 8) | dg
            idx_cut = prefix
        for i in range(0, n_all, REFINE_BLOCK):
            ok = i + r < n_all
            idx = tl.load(cbase + i + r, mask=ok, other=0, volatile=True)
            low = (_keys(tl.load(sbase + idx, mask=ok, other=0.0).to(tl.float32)) & 0xFFFF).to(tl.int32)
            take = (krem > 0) & ((low > thr) | ((low == thr) & (idx <= idx_cut)))
            tl.store(mask_ptr + seg_off + idx, take.to(tl.int8), mask=ok)


_plans: dict = {}


def _plan(sizes: tuple[int, ...], ks: tuple[int, ...], device: torch.device):
    """Block and segment tables for a list of layer sizes (cached: the sizes of a model never change)."""
    key = (sizes, ks, device)
    plan = _plans.get(key)
    if plan is None:
        lens = torch.tensor(sizes, dtype=torch.int64)
        offs = torch.cumsum(lens, 0) - lens
        nblk = (lens + BLOCK - 1) // BLOCK
        blk_seg = torch.repeat_interleave(torch.arange(len(sizes)), nblk)
        first = torch.cumsum(nblk, 0) - nblk
        blk_start = (torch.arange(blk_seg.numel()) - first[blk_seg]) * BLOCK  # layer-local
        plan = dict(blk_seg=blk_seg.to(torch.int32), blk_start=blk_start, seg_off=offs, seg_len=lens,
                    seg_k=torch.tensor(ks, dtype=torch.int64), seg_nblk=nblk.to(torch.int32))
        plan = {k: v.to(device) for k, v in plan.items()}
        if len(_plans) > 64:
            _plans.clear()
        _plans[key] = plan
    return plan


_tables: dict = {}


def _score_table(scores: Sequence[Tensor]):
    """Device table of the layers' score addresses (no copy when they share a kernel dtype), the
    Triton element type, and the tensors that must stay alive during the launches."""
    if all(s.dtype == scores[0].dtype for s in scores):
        live = [s.detach().contiguous() for s in scores]  # copies only non-contiguous layers
        addrs = tuple(t.data_ptr() for t in live)
        sdt = TL_DTYPES[scores[0].dtype]
    else:  # mixed dtypes: one float32 buffer (exact for all three kernel dtypes)
        flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
        live = [flat]
        starts = [0]
        for s in scores[:-1]:
            starts.append(starts[-1] + s.numel())
        addrs = tuple(flat.data_ptr() + 4 * o for o in starts)
        sdt = tl.float32
    device = scores[0].device
    table = _tables.get((addrs, device))
    if table is None:  # parameters keep their storage across steps, so this hits while training
        table = torch.tensor(addrs, dtype=torch.int64).to(device)
        if len(_tables) > 64:
            _tables.clear()
        _tables[(addrs, device)] = table
    return table, sdt, live


def topk_mask(scores: Sequence[Tensor], ks: Sequence[int], names: Sequence[str] | None = None,
              check_nan: bool = True) -> list[Tensor]:
    """Per-layer top-k masks for all layers at once (see :func:`sparse_sam.reference.topk_mask_ref`).

    Args:
        scores: L floating tensors of shapes ``S_l`` on one device.
        ks: L budgets, ``0 <= ks[l] <= scores[l].numel()``.
        names: layer names for the NaN error.
        check_nan: read the per-layer NaN flags back (one host synchronisation) and raise
            ``ValueError`` naming the first NaN layer. ``False`` never synchronises; nor does a call
            while the stream is being captured in a CUDA graph.

    Returns:
        L bool tensors of shapes ``S_l`` (views of one flat buffer) with exactly ``ks[l]`` ones:
        larger score first, equal scores by lower flat index, ``-0.0 == +0.0``.

    Equivalent PyTorch, per layer: ``reference.topk_mask_ref(scores, ks, names)``.
    """
    scores, ks = list(scores), [int(k) for k in ks]
    if not scores:
        return []
    if any(s.dtype not in _KERNEL_DTYPES or s.numel() > common.INT32_LIMIT for s in scores):
        return reference.topk_mask_threshold(scores, ks, names)
    device = scores[0].device
    sizes = tuple(s.numel() for s in scores)
    n_seg, total = len(scores), sum(sizes)
    out = torch.empty(total, dtype=torch.bool, device=device)
    if total:
        plan = _plan(sizes, tuple(ks), device)  # empty layers get no blocks
        addr, sdt, _live = _score_table(scores)
        # One memset for all counters: [hist | ticket1 | ticket2 | nan | cand_cnt | sel (2 per layer)].
        scratch = torch.zeros(n_seg * (NBINS + 6), dtype=torch.int32, device=device)
        hist, rest = scratch[: n_seg * NBINS], scratch[n_seg * NBINS:]
        t1, t2, nan, cnt, sel = (rest[:n_seg], rest[n_seg:2 * n_seg], rest[2 * n_seg:3 * n_seg],
                                 rest[3 * n_seg:4 * n_seg], rest[4 * n_seg:])
        cand = torch.empty(total, dtype=torch.int32, device=device)
        grid = (plan["blk_seg"].numel(),)
        with device_guard(out):
            _topk_hist_kernel[grid](addr, plan["blk_seg"], plan["blk_start"], plan["seg_len"], plan["seg_k"],
                                    plan["seg_nblk"], hist, t1, nan, sel, SDT=sdt, BLOCK=BLOCK, NBINS=NBINS,
                                    SCAN_CHUNK=SCAN_CHUNK, num_warps=8)
            _topk_select_kernel[grid](addr, out.view(torch.int8), plan["blk_seg"], plan["blk_start"],
                                      plan["seg_off"], plan["seg_len"], plan["seg_nblk"], sel, cand, cnt, t2,
                                      SDT=sdt, BLOCK=BLOCK, NBINS=NBINS, REFINE_BLOCK=REFINE_BLOCK, num_warps=8)
        if check_nan and not (out.is_cuda and torch.cuda.is_current_stream_capturing()):
            flags = nan.tolist()
            if any(flags):
                i = flags.index(1)
                raise ValueError(f"topk_mask: scores of layer {reference._layer_name(names, i)} contain NaN")
    masks, off = [], 0
    for s, n in zip(scores, sizes):
        masks.append(out[off:off + n].view(s.shape))
        off += n
    return masks
