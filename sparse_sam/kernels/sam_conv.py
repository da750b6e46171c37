"""Implicit-GEMM conv2d / conv_transpose2d forwards whose weight tiles are ``W + m ⊙ v`` formed in the
load, so ``W_eff`` is never written to memory.

GEMM view (NCHW input, contiguous): rows ``M = N·H_out·W_out`` (one output pixel each), columns the
output channels, reduction ``K = C_in·kH·kW``. The input tile is gathered on the fly (padding and
dilation become masked loads). For the transposed conv the same gather runs backwards:
``ih = (oh + pad - kh·dil) / stride`` must be an integer inside the input, which masks out
``1 - 1/stride²`` of the reduction (the simple form, no sub-pixel decomposition). Accumulation is in
float32; the result is rounded once to the input dtype.

The ops call these forwards only when the fused conv is asked for (``fused=True`` on the op, or
``SPARSE_SAM_FUSED_CONV=1``; see :mod:`sparse_sam.ops`): by default they materialise ``W_eff`` and call
PyTorch, which keeps the patched forward bit-identical to the model with the patch applied. The fused
result agrees with it within :func:`sparse_sam.selftest.conv_tolerance`.

Dispatch (``fused=None``): the fused kernel only pays when the layer is small enough that launching
and streaming the separate ``W_eff`` materialisation is a visible share of the conv, because cuDNN's
convolutions are faster than this kernel on large problems. The heuristic (a priori; the GPU
benchmark in ``benchmarks/test_triton_gpu.py`` is what should tune it):

* declined (``None``, the op materialises ``W_eff`` and calls PyTorch) for ``groups != 1``, for
  input/weight dtypes that differ (PyTorch raises the proper error), on CPU tensors (the
  interpreter is only for testing) and when the conv does more than ``FUSED_MAX_FLOP`` flops;
* always declined, even when forced, when an in-kernel int32 offset could wrap: one image of the
  input or of the output, the weight, or ``N·H_out·W_out`` above ``common.INT32_LIMIT`` elements;
* ``SPARSE_SAM_TRITON_CONV=always|never`` overrides it (benchmarks), as does ``fused=True/False``.

``sam_linear`` is deliberately not fused: a linear layer is one GEMM whose weight is its whole
B operand, cuBLAS beats a Triton GEMM at the sizes that matter, and the materialisation it would save
is a single elementwise pass over the weight.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import common
from .common import device_guard
from .sam_weight import compute_dtype, round_to, weff

__all__ = ["sam_conv2d_forward", "sam_conv_transpose2d_forward", "FUSED_MAX_FLOP"]

FUSED_MAX_FLOP = 2 ** 28  # ~0.27 GFLOP: below this a conv is launch/latency bound on current GPUs


@triton.jit
def _sam_conv_kernel(x_ptr, w_ptr, m_ptr, v_ptr, b_ptr, out_ptr,
                     N, C, H, W, CO, OH, OW, KH, KW, sh, sw, ph, pw, dh, dw,
                     TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, CD: tl.constexpr, PREC: tl.constexpr,
                     DOT_F32: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * OH * OW
    KTOT = C * KH * KW
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < CO
    img = (rm // (OH * OW)).to(tl.int64)
    pix = rm % (OH * OW)
    oh = pix // OW
    ow = pix % OW
    x_img = x_ptr + img * C * H * W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, KTOT, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < KTOT
        ci = rk // (KH * KW)
        tap = rk % (KH * KW)
        kh = tap // KW
        kw = tap % KW
        if TRANSPOSED:
            th = oh[:, None] + ph - kh[None, :] * dh
            tw = ow[:, None] + pw - kw[None, :] * dw
            ih = th // sh
            iw = tw // sw
            valid = (th >= 0) & (tw >= 0) & (ih * sh == th) & (iw * sw == tw) & (ih < H) & (iw < W)
            # weight (C_in, C_out, kH, kW): element (ci, co, kh, kw)
            w_off = ci[:, None] * (CO * KH * KW) + rn[None, :] * (KH * KW) + tap[:, None]
        else:
            ih = oh[:, None] * sh - ph + kh[None, :] * dh
            iw = ow[:, None] * sw - pw + kw[None, :] * dw
            valid = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            # weight (C_out, C_in, kH, kW): element (co, ci, kh, kw)
            w_off = rn[None, :] * KTOT + rk[:, None]
        a_mask = valid & m_ok[:, None] & k_ok[None, :]
        a = tl.load(x_img[:, None] + ci[None, :] * (H * W) + ih * W + iw, mask=a_mask, other=0.0)
        b_mask = k_ok[:, None] & n_ok[None, :]
        wt = tl.load(w_ptr + w_off, mask=b_mask, other=0.0)
        mt = tl.load(m_ptr + w_off, mask=b_mask, other=0)
        vt = tl.load(v_ptr + w_off, mask=b_mask, other=0.0)
        b = weff(wt, mt, vt, CD)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_off = img[:, None] * CO * OH * OW + rn[None, :] * (OH * OW) + pix[:, None]
    tl.store(out_ptr + out_off, round_to(acc, out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _pair(v, name: str) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {v!r}")
    return int(t[0]), int(t[1])


def _use_fused(x: Tensor, weight: Tensor, groups: int, flop: int, fused: bool | None, out_shape) -> bool:
    if groups != 1 or x.dtype != weight.dtype or x.dim() != 4:
        return False
    n, co, oh, ow = out_shape
    if max(x[0].numel(), weight.numel(), n * oh * ow, co * oh * ow) > common.INT32_LIMIT:
        return False  # the kernel's row and per-image offsets are int32
    if fused is not None:
        return fused
    mode = os.environ.get("SPARSE_SAM_TRITON_CONV", "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"SPARSE_SAM_TRITON_CONV must be auto, always or never, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return x.is_cuda and flop <= FUSED_MAX_FLOP


def _precision(dtype: torch.dtype) -> str:
    # Follow PyTorch's own choice for float32 convs, so fused and materialised paths agree.
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and torch.cuda.is_available() \
        else "ieee"


def _launch(x, weight, mask, delta, bias, out, C, CO, kh, kw, stride, padding, dilation, transposed):
    n, _, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    m_rows = n * oh * ow
    if x.is_cuda:
        bm, bn, bk, warps, stages = 128, (32 if CO <= 32 else 64), 32, 4, 3
    else:  # interpreter: tl.dot needs 16-wide tiles, smaller is faster; its bfloat16 dot is wrong,
        # so bfloat16 tiles are widened (exactly) to float32 there
        bm, bn, bk, warps, stages = 16, 16, 16, 1, 1
    grid = (triton.cdiv(m_rows, bm), triton.cdiv(CO, bn))
    with device_guard(x):
        _sam_conv_kernel[grid](
            x, weight, mask.view(torch.uint8), delta, bias if bias is not None else x, out,
            n, C, h, w, CO, oh, ow, kh, kw, *stride, *padding, *dilation,
            TRANSPOSED=transposed, HAS_BIAS=bias is not None, CD=compute_dtype(weight.dtype, delta.dtype),
            PREC=_precision(x.dtype), DOT_F32=not x.is_cuda and x.dtype == torch.bfloat16,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def _run_fused(input, weight, mask, delta, bias, out_shape, stride, padding, dilation, *, transposed: bool):
    """Allocate the ``(N, C_out, H_out, W_out)`` output and launch the fused kernel (both conv kinds)."""
    out = torch.empty(out_shape, dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out
    c_in, c_out = (weight.shape[0], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[0])
    return _launch(input.contiguous(), weight.detach().contiguous(), mask.contiguous(), delta.detach().contiguous(),
                   None if bias is None else bias.detach().contiguous(), out, c_in, c_out, weight.shape[2],
                   weight.shape[3], stride, padding, dilation, transposed=transposed)


def sam_conv2d_forward(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
                       stride=1, padding=0, dilation=1, groups: int = 1, *, fused: bool | None = None):
    """``F.conv2d(input, where(m, W + v, W), bias, stride, padding, dilation, groups)`` without
    writing ``W_eff``, or ``None`` when declined (see module docstring).

    Shapes: input ``(N, C_in, H, W)``; weight/mask/delta ``(C_out, C_in, kH, kW)``; bias ``(C_out,)``;
    result ``(N, C_out, H_out, W_out)`` in ``input.dtype``. ``padding`` must be numeric (ints).
    """
    if isinstance(padding, str):
        return None
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    co, c, kh, kw = weight.shape
    if input.dim() != 4 or input.shape[1] != c:
        return None  # let PyTorch raise its own shape error on the materialised path
    n, _, h, w = input.shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0 or not _use_fused(input, weight, groups, 2 * n * oh * ow * co * c * kh * kw, fused,
                                            (n, co, oh, ow)):
        return None
    return _run_fused(input, weight, mask, delta, bias, (n, co, oh, ow), stride, padding, dilation, transposed=False)


def sam_conv_transpose2d_forward(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor,
                                 bias: Tensor | None = None, stride=1, padding=0, output_padding=0,
                                 groups: int = 1, dilation=1, *, fused: bool | None = None):
    """``F.conv_transpose2d(input, where(m, W + v, W), bias, stride, padding, output_padding, groups,
    dilation)`` without writing ``W_eff``, or ``None`` when declined (see module docstring).

    Shapes: input ``(N, C_in, H, W)``; weight/mask/delta ``(C_in, C_out, kH, kW)``; bias ``(C_out,)``;
    result ``(N, C_out, H_out, W_out)`` with ``H_out = (H-1)·stride - 2·padding + dilation·(kH-1) +
    output_padding + 1``.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    output_padding = _pair(output_padding, "output_padding")
    c, co, kh, kw = weight.shape
    if input.dim() != 4 or input.shape[1] != c:
        return None
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        return None  # invalid output_padding: PyTorch raises the error on the materialised path
    n, _, h, w = input.shape
    oh = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (kh - 1) + output_padding[0] + 1
    ow = (w - 1) * stride[1] - 2 * padding[1] + dilation[1] * (kw - 1) + output_padding[1] + 1
    if oh <= 0 or ow <= 0 or not _use_fused(input, weight, groups, 2 * n * h * w * co * c * kh * kw, fused,
                                            (n, co, oh, ow)):
        return None
    return _run_fused(input, weight, mask, delta, bias, (n, co, oh, ow), stride, padding, dilation, transposed=True)
