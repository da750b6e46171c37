"""Public functional ops and their autograd Functions, dispatching through :mod:`sparse_sam.backends`.

Each op here has a pure-PyTorch twin ``<op>_ref`` in :mod:`sparse_sam.reference` with the same
signature; every backend is tested against it.

Convolutions and ``torch.autocast``: by default every SAM layer op materialises ``W_eff`` (one pass of
the backend's ``sam_weight`` kernel) and calls PyTorch's own ``F.conv*d`` / ``F.linear``, so

* the patched forward is bit-identical to the forward of the model with the patch applied (same
  convolution implementation, e.g. cuDNN, on both sides), and
* autocast applies exactly as it does to the plain layer (``W_eff`` keeps the weight's dtype; PyTorch
  casts it for the convolution or matmul).

The fused Triton conv forward (``W_eff`` formed inside the implicit GEMM, never written) is an opt-in:
``fused=True`` on :func:`sam_conv2d` / :func:`sam_conv_transpose2d`, or ``SPARSE_SAM_FUSED_CONV=1`` for
every conv (the kernel's size heuristic then decides per layer). It agrees with the materialised conv
only within :func:`sparse_sam.selftest.conv_tolerance` (it accumulates in its own order, in tf32 for
float32 where PyTorch allows tf32), and it is never used under autocast.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from . import backends, reference

__all__ = ["topk_mask", "sam_weight", "sam_conv", "sam_conv2d", "sam_conv_transpose2d", "sam_linear", "swap_",
           "SAMWeightFunction", "SAMConvFunction"]


def topk_mask(scores: Sequence[Tensor], ks: Sequence[int], backend: str | None = None,
              names: Sequence[str] | None = None) -> list[Tensor]:
    """Top-k mask of every layer at once.

    Args:
        scores: L floating tensors of shapes ``S_l`` on one device.
        ks: L budgets with ``0 <= ks[l] <= scores[l].numel()``.
        backend: force a backend (see :mod:`sparse_sam.backends`).
        names: layer names for error messages.

    Returns:
        L bool tensors of shapes ``S_l`` with exactly ``ks[l]`` ones; ties go to the lower flat index.

    Raises:
        ValueError: a layer's scores contain NaN (the message names the layer), or a ``k`` is out of range.
    """
    scores = list(scores)
    ks = [int(k) for k in ks]
    reference.check_topk_args(scores, ks, names)
    if not scores:
        return []
    _, impl = backends.resolve("topk_mask", scores[0], backend)
    with torch.no_grad():
        return impl.topk_mask([s.detach() for s in scores], ks, None if names is None else list(names))


class SAMWeightFunction(torch.autograd.Function):
    """``W_eff = where(m, W + v, W)`` with ``grad_v`` per ``delta_grad`` and ``grad_s = g ⊙ v``."""

    @staticmethod
    def forward(ctx, weight, mask, delta, scores, delta_grad, impl):
        ctx.save_for_backward(mask, delta)
        ctx.scores_dtype = scores.dtype if scores is not None else delta.dtype
        ctx.delta_grad, ctx.impl = delta_grad, impl
        return impl.sam_weight_forward(weight, mask, delta)

    @staticmethod
    def backward(ctx, grad):
        mask, delta = ctx.saved_tensors
        grad_delta, grad_scores = ctx.impl.sam_weight_backward(grad.contiguous(), mask, delta,
                                                               ctx.scores_dtype, ctx.delta_grad)
        return (None, None, grad_delta if ctx.needs_input_grad[2] else None,
                grad_scores if ctx.needs_input_grad[3] else None, None, None)


def _check_sam_args(weight: Tensor, mask: Tensor, delta: Tensor, scores: Tensor | None, delta_grad: str) -> None:
    if delta_grad not in reference.DELTA_GRAD_MODES:
        raise ValueError(f"delta_grad must be one of {reference.DELTA_GRAD_MODES}, got {delta_grad!r}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    for name, t in (("mask", mask), ("delta", delta), ("scores", scores)):
        if t is not None and t.shape != weight.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the weight has {tuple(weight.shape)}")
        if t is not None and t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but the weight is on {weight.device}")


def sam_weight(weight: Tensor, mask: Tensor, delta: Tensor, scores: Tensor | None = None,
               delta_grad: str = "masked", backend: str | None = None) -> Tensor:
    """Differentiable ``W + m ⊙ v`` (shape ``P``, dtype of ``weight``).

    ``weight`` never receives a gradient. ``delta`` gets ``m ⊙ g`` ("masked", paper eq. 8) or ``g``
    ("dense"); ``scores`` gets the straight-through ``g ⊙ v`` (eq. 9-10).

    Equivalent PyTorch (forward)::

        torch.where(mask, weight + delta, weight)
    """
    _check_sam_args(weight, mask, delta, scores, delta_grad)
    _, impl = backends.resolve("sam_weight", weight, backend)
    return SAMWeightFunction.apply(weight.detach(), mask, delta, scores, delta_grad, impl)


class SAMConvFunction(torch.autograd.Function):
    """Convolution whose forward is a backend's fused kernel (``W_eff`` formed in the load).

    The backward materialises ``W_eff`` once and uses PyTorch's convolution backward for the input and
    weight gradients, then the backend's fused ``sam_weight_backward`` for ``delta`` and ``scores``.
    """

    @staticmethod
    def forward(ctx, input, weight, mask, delta, scores, bias, conv_args, delta_grad, impl, out):
        ctx.save_for_backward(input, weight, mask, delta)
        ctx.has_bias = bias is not None
        ctx.conv_args, ctx.delta_grad, ctx.impl = conv_args, delta_grad, impl
        ctx.scores_dtype = scores.dtype if scores is not None else delta.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        input, weight, mask, delta = ctx.saved_tensors
        stride, padding, dilation, transposed, output_padding, groups = ctx.conv_args
        w_eff = ctx.impl.sam_weight_forward(weight, mask, delta)
        need_in, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[3:5])
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, input, w_eff, [w_eff.shape[1] * groups if transposed else w_eff.shape[0]]
            if ctx.has_bias else None, stride, padding, dilation, transposed, output_padding, groups,
            [need_in, need_w, ctx.has_bias and ctx.needs_input_grad[5]])
        grad_delta = grad_scores = None
        if need_w:
            grad_delta, grad_scores = ctx.impl.sam_weight_backward(grad_w, mask, delta, ctx.scores_dtype,
                                                                   ctx.delta_grad)
        return (grad_in, None, None, grad_delta if ctx.needs_input_grad[3] else None,
                grad_scores if ctx.needs_input_grad[4] else None, grad_b, None, None, None, None)


def _fused_conv_mode(fused: bool | None) -> bool | None:
    """``False``: materialise; ``True``: the fused forward wherever it supports the shape; ``None``:
    the fused forward where its own heuristic picks it (``SPARSE_SAM_FUSED_CONV=1``)."""
    if fused is not None:
        return bool(fused)
    value = os.environ.get("SPARSE_SAM_FUSED_CONV", "0")
    if value not in ("0", "1"):
        raise ValueError(f"SPARSE_SAM_FUSED_CONV must be 0 (materialise W_eff, the default) or 1, got {value!r}")
    return None if value == "1" else False


_CONV_FNS = {(nd, t): getattr(F, f"conv_transpose{nd}d" if t else f"conv{nd}d") for nd in (1, 2, 3) for t in (0, 1)}


def _sam_conv(input, weight, mask, delta, bias, stride, padding, dilation, groups, output_padding,
              transposed: bool, scores, delta_grad, backend, fused: bool | None = False):
    _check_sam_args(weight, mask, delta, scores, delta_grad)
    nd = weight.dim() - 2
    if nd not in (1, 2, 3):
        raise ValueError(f"a convolution weight has 3 to 5 dimensions (1-D to 3-D conv), got shape "
                         f"{tuple(weight.shape)}")
    op = f"sam_conv_transpose{nd}d" if transposed else f"sam_conv{nd}d"
    name, impl = backends.resolve(op, weight, backend)
    mode = _fused_conv_mode(fused)
    # String padding ("same"/"valid") is resolved by PyTorch only: the fused kernels take numbers.
    kernel = None if (mode is False or isinstance(padding, str) or torch.is_autocast_enabled(input.device.type)) \
        else getattr(impl, op + "_forward", None)
    if kernel is not None and backends.verified(name, "fused_" + op, impl, weight):
        with torch.no_grad():
            fused_arg = True if mode else None
            out = (kernel(input, weight, mask, delta, bias, stride, padding, output_padding, groups, dilation,
                          fused=fused_arg) if transposed
                   else kernel(input, weight, mask, delta, bias, stride, padding, dilation, groups, fused=fused_arg))
        if out is not None:  # None: the backend declined this shape (dispatch heuristic)
            conv_args = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), transposed,
                         list(_pair(output_padding)), groups)
            return SAMConvFunction.apply(input, weight.detach(), mask, delta, scores, bias, conv_args,
                                         delta_grad, impl, out)
    w = SAMWeightFunction.apply(weight.detach(), mask, delta, scores, delta_grad, impl)
    if transposed:
        return _CONV_FNS[nd, 1](input, w, bias, stride, padding, output_padding, groups, dilation)
    return _CONV_FNS[nd, 0](input, w, bias, stride, padding, dilation, groups)


def sam_conv(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
             stride=1, padding=0, dilation=1, groups: int = 1, *, transposed: bool = False, output_padding=0,
             scores: Tensor | None = None, delta_grad: str = "masked", backend: str | None = None) -> Tensor:
    """N-d convolution (N = 1, 2, 3 from ``weight.dim() - 2``) with weight ``W + m ⊙ v``, always through
    the materialised ``W_eff`` and PyTorch's convolution.

    ``transposed=False``: ``F.conv{N}d(input, W_eff, bias, stride, padding, dilation, groups)``; input
    ``(N, C_in, *spatial)``, weight ``(C_out, C_in/groups, *kernel)``.
    ``transposed=True``: ``F.conv_transpose{N}d(input, W_eff, bias, stride, padding, output_padding,
    groups, dilation)``; weight ``(C_in, C_out/groups, *kernel)``. mask, delta, scores: weight's shape.
    """
    return _sam_conv(input, weight, mask, delta, bias, stride, padding, dilation, groups, output_padding,
                     transposed, scores, delta_grad, backend, fused=False)


def sam_conv2d(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
               stride=1, padding=0, dilation=1, groups: int = 1, scores: Tensor | None = None,
               delta_grad: str = "masked", backend: str | None = None, fused: bool | None = None) -> Tensor:
    """``F.conv2d(input, W + m ⊙ v, bias, stride, padding, dilation, groups)``.

    Shapes: input ``(N, C_in, H, W)``; weight, mask, delta, scores ``(C_out, C_in/groups, kH, kW)``;
    output ``(N, C_out, H_out, W_out)``. Padding modes other than zeros are handled by the module.
    ``fused``: ``None`` follows ``SPARSE_SAM_FUSED_CONV`` (default: materialise, bit-identical to the
    applied model), ``True`` asks for the backend's fused forward (see the module docstring), ``False``
    never uses it.
    """
    return _sam_conv(input, weight, mask, delta, bias, stride, padding, dilation, groups, 0, False,
                     scores, delta_grad, backend, fused)


def sam_conv_transpose2d(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
                         stride=1, padding=0, output_padding=0, groups: int = 1, dilation=1,
                         scores: Tensor | None = None, delta_grad: str = "masked",
                         backend: str | None = None, fused: bool | None = None) -> Tensor:
    """``F.conv_transpose2d(input, W + m ⊙ v, bias, stride, padding, output_padding, groups, dilation)``.

    Shapes: input ``(N, C_in, H, W)``; weight, mask, delta, scores ``(C_in, C_out/groups, kH, kW)``;
    output ``(N, C_out, H_out, W_out)``. ``fused``: as in :func:`sam_conv2d`.
    """
    return _sam_conv(input, weight, mask, delta, bias, stride, padding, dilation, groups, output_padding,
                     True, scores, delta_grad, backend, fused)


def sam_linear(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
               scores: Tensor | None = None, delta_grad: str = "masked", backend: str | None = None) -> Tensor:
    """``F.linear(input, W + m ⊙ v, bias)``; input ``(*, in)``, weight ``(out, in)``, output ``(*, out)``."""
    _check_sam_args(weight, mask, delta, scores, delta_grad)
    _, impl = backends.resolve("sam_linear", weight, backend)
    fused = None if torch.is_autocast_enabled(input.device.type) else getattr(impl, "sam_linear_forward", None)
    if fused is not None and not (torch.is_grad_enabled() and (delta.requires_grad or
                                                                 (scores is not None and scores.requires_grad))):
        out = fused(input, weight, mask, delta, bias)
        if out is not None:
            return out
    return F.linear(input, SAMWeightFunction.apply(weight.detach(), mask, delta, scores, delta_grad, impl), bias)


def swap_(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor],
          backend: str | None = None, names: Sequence[str] | None = None) -> None:
    """In place, for every layer ``l``: ``weights[l].flat[indices[l][j]] <-> values[l][j]`` as raw bits.

    Self-inverse. Validates every layer before the first write: on a bad argument it raises
    ``ValueError`` naming the layer and nothing has changed.

    Shapes: ``weights[l]`` any contiguous shape ``P_l``; ``indices[l]`` ``(k_l,)`` int32/int64, strictly
    increasing; ``values[l]`` ``(k_l,)`` of ``weights[l].dtype``.
    """
    weights, indices, values = list(weights), list(indices), list(values)
    reference.check_swap_args(weights, indices, values, names)
    if not weights:
        return
    _, impl = backends.resolve("swap_", weights[0], backend)
    with torch.no_grad():
        impl.swap_(weights, indices, values)
