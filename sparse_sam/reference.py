"""Pure-PyTorch specification of every op (docs/design.md §3).

Every backend (Triton, C++, CUDA) is tested against the functions here. They favour clarity over
speed; the ``torch`` backend in :mod:`sparse_sam.backends` runs them directly.

Semantics shared by all backends
--------------------------------
* ``topk_mask``: exactly ``k`` ones per segment. Larger score wins; among equal scores the lower
  flat index wins; ``-0.0`` and ``+0.0`` are equal. NaN raises :class:`ValueError` naming the layer.
* ``sam_weight``: ``W_eff = W + m ⊙ v``, evaluated as ``where(m, W + v, W)`` in the promoted dtype of
  ``W`` and ``v`` and rounded to ``W.dtype``. Where ``m`` is 0 the bits of ``W`` pass through untouched
  (``W + 0·v`` would turn ``-0.0`` into ``+0.0`` and ``NaN·0`` into NaN), so the patched forward is
  bit-identical to the forward of the model with the exported patch applied.
* ``swap_``: exchanges ``weight.flat[idx[j]]`` and ``values[j]`` as raw bits, after validating all
  layers, so a bad patch raises before anything is written.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DELTA_GRAD_MODES",
    "check_one_device",
    "check_topk_args",
    "check_swap_args",
    "topk_mask_ref",
    "topk_mask_threshold",
    "sam_weight_forward_ref",
    "sam_weight_backward_ref",
    "sam_weight_ref",
    "sam_conv_ref",
    "sam_conv2d_ref",
    "sam_conv_transpose2d_ref",
    "sam_linear_ref",
    "swap_ref",
    "swap_bits_unchecked_",
    "bits_view",
]

DELTA_GRAD_MODES = ("masked", "dense")

# Integer dtype of the same width, used to move floats as raw bits (NaN payloads, -0.0, denormals).
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def bits_view(t: Tensor) -> Tensor:
    """Reinterpret a float tensor as a same-width integer tensor (shares storage)."""
    try:
        return t.view(_BITS[t.dtype])
    except KeyError:
        raise TypeError(f"unsupported weight dtype {t.dtype}; expected one of {list(_BITS)}") from None


def _layer_name(names: Sequence[str] | None, i: int) -> str:
    return f"'{names[i]}'" if names is not None else f"#{i}"


def check_one_device(op: str, tensors: Sequence[Tensor], names: Sequence[str] | None = None,
                     per_layer: int = 1) -> None:
    """Raise ``ValueError`` naming the first layer whose tensor is not on ``tensors[0]``'s device.

    ``tensors`` holds ``per_layer`` consecutive tensors per layer (e.g. weight, mask, delta). Grouped
    ops launch one kernel over every layer, so all of them must share a device (index included).
    """
    if not tensors:
        return
    first = tensors[0].device
    for j, t in enumerate(tensors):
        if t.device != first:
            raise ValueError(f"{op}: layer {_layer_name(names, j // per_layer)} is on {t.device} but layer "
                             f"{_layer_name(names, 0)} is on {first}; a grouped op needs every tensor on one device")


# ----------------------------------------------------------------------------------------- top-k
def check_topk_args(scores: Sequence[Tensor], ks: Sequence[int], names: Sequence[str] | None = None) -> None:
    """Host-side checks shared by every backend (no NaN scan: backends fuse that into their pass)."""
    if len(scores) != len(ks):
        raise ValueError(f"topk_mask: got {len(scores)} score tensors but {len(ks)} budgets")
    if names is not None and len(names) != len(scores):
        raise ValueError(f"topk_mask: got {len(names)} names for {len(scores)} score tensors")
    check_one_device("topk_mask", scores, names)
    for i, (s, k) in enumerate(zip(scores, ks)):
        if not s.is_floating_point():
            raise TypeError(f"topk_mask: scores of layer {_layer_name(names, i)} have dtype {s.dtype}, "
                            "expected a floating dtype")
        if isinstance(k, bool) or int(k) != k or not 0 <= int(k) <= s.numel():
            raise ValueError(f"topk_mask: k={k} for layer {_layer_name(names, i)} is outside "
                             f"[0, {s.numel()}]")


def _flat_scores(s: Tensor, names: Sequence[str] | None, i: int) -> Tensor:
    """Layer ``i``'s scores as a detached 1-D tensor; NaN is an error naming the layer."""
    flat = s.detach().reshape(-1)
    if torch.isnan(flat).any():
        raise ValueError(f"topk_mask: scores of layer {_layer_name(names, i)} contain NaN")
    return flat


def topk_mask_ref(scores: Sequence[Tensor], ks: Sequence[int],
                  names: Sequence[str] | None = None) -> list[Tensor]:
    """Per-layer top-k mask.

    Args:
        scores: L tensors of any shape ``S_l`` (floating).
        ks: L budgets, ``0 <= ks[l] <= scores[l].numel()``.
        names: optional layer names used in error messages.

    Returns:
        L bool tensors of shape ``S_l`` with exactly ``ks[l]`` True entries each.

    Equivalent PyTorch, for one layer without ties::

        m = torch.zeros(s.numel(), dtype=torch.bool); m[s.flatten().topk(k).indices] = True
    """
    check_topk_args(scores, ks, names)
    masks = []
    for i, (s, k) in enumerate(zip(scores, ks)):
        flat = _flat_scores(s, names, i)
        # Adding +0.0 maps -0.0 to +0.0; a stable ascending sort of the negated keys then puts larger
        # scores first and, among equal scores, the lower index first.
        key = -(flat + 0.0)
        order = torch.sort(key, stable=True).indices[: int(k)]
        m = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        m[order] = True
        masks.append(m.view(s.shape))
    return masks


def topk_mask_threshold(scores: Sequence[Tensor], ks: Sequence[int],
                        names: Sequence[str] | None = None) -> list[Tensor]:
    """:func:`topk_mask_ref`'s result by threshold instead of a full sort: the ``torch`` backend's
    implementation (a stable sort of every layer made it 10x slower than a plain ``torch.topk`` loop).

    Per layer: ``t`` = the k-th largest score (``torch.topk``); every score ``> t`` is in, and the
    first ``k - #{s > t}`` scores equal to ``t`` in index order fill the budget. No host sync.
    Shapes as in :func:`topk_mask_ref`.
    """
    check_topk_args(scores, ks, names)
    masks = []
    for i, (s, k) in enumerate(zip(scores, ks)):
        flat, k = _flat_scores(s, names, i), int(k)
        if k == 0:
            masks.append(torch.zeros(s.shape, dtype=torch.bool, device=s.device))
            continue
        t = flat.topk(k, sorted=False).values.min()
        above, tie = flat > t, flat == t  # -0.0 == +0.0, as in the reference's ordering
        room = k - above.sum(dtype=torch.int64)
        m = above | (tie & (tie.cumsum(0, dtype=torch.int64) <= room))
        masks.append(m.view(s.shape))
    return masks


# ------------------------------------------------------------------------------------ sam_weight
def sam_weight_forward_ref(weight: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
    """``W_eff = where(m, W + v, W)``; all of shape ``P``; result has ``weight.dtype``."""
    cd = torch.promote_types(weight.dtype, delta.dtype)
    added = (weight.to(cd) + delta.to(cd)).to(weight.dtype)
    return torch.where(mask, added, weight)


def sam_weight_backward_ref(grad: Tensor, mask: Tensor, delta: Tensor, scores_dtype: torch.dtype,
                            delta_grad: str = "masked") -> tuple[Tensor, Tensor]:
    """Gradients of ``sam_weight`` given ``grad = ∂L/∂W_eff`` (shape ``P``).

    Returns ``(grad_delta, grad_scores)``: ``grad_delta = m ⊙ g`` ("masked", paper eq. 8) or ``g``
    ("dense"), in ``delta.dtype``; ``grad_scores = g ⊙ v`` (straight-through, eq. 9-10), in
    ``scores_dtype``.
    """
    if delta_grad not in DELTA_GRAD_MODES:
        raise ValueError(f"delta_grad must be one of {DELTA_GRAD_MODES}, got {delta_grad!r}")
    g = grad.to(delta.dtype)
    grad_delta = torch.where(mask, g, torch.zeros_like(g)) if delta_grad == "masked" else g
    sd = torch.promote_types(scores_dtype, torch.promote_types(grad.dtype, delta.dtype))
    grad_scores = (grad.to(sd) * delta.to(sd)).to(scores_dtype)
    return grad_delta, grad_scores


class _SAMWeightRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, mask, delta, scores, delta_grad):
        ctx.save_for_backward(mask, delta)
        ctx.scores_dtype = scores.dtype if scores is not None else delta.dtype
        ctx.delta_grad = delta_grad
        return sam_weight_forward_ref(weight, mask, delta)

    @staticmethod
    def backward(ctx, grad):
        mask, delta = ctx.saved_tensors
        grad_delta, grad_scores = sam_weight_backward_ref(grad, mask, delta, ctx.scores_dtype, ctx.delta_grad)
        if not ctx.needs_input_grad[3]:
            grad_scores = None
        return None, None, grad_delta if ctx.needs_input_grad[2] else None, grad_scores, None


def sam_weight_ref(weight: Tensor, mask: Tensor, delta: Tensor, scores: Tensor | None = None,
                   delta_grad: str = "masked") -> Tensor:
    """Differentiable ``W + m ⊙ v`` with the straight-through gradient to ``scores``.

    Args:
        weight: base weight ``W*`` of shape ``P``; never receives a gradient, never written.
        mask: bool mask of shape ``P``.
        delta: additive modification ``v`` of shape ``P``.
        scores: mask scores ``s`` of shape ``P``; only their gradient ``g ⊙ v`` is defined here.
        delta_grad: "masked" (``grad_v = m ⊙ g``) or "dense" (``grad_v = g``).

    Equivalent PyTorch (forward only)::

        torch.where(mask, weight + delta, weight)
    """
    if delta_grad not in DELTA_GRAD_MODES:
        raise ValueError(f"delta_grad must be one of {DELTA_GRAD_MODES}, got {delta_grad!r}")
    return _SAMWeightRef.apply(weight, mask, delta, scores, delta_grad)


# ------------------------------------------------------------------------------- layers using it
def sam_conv_ref(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
                 stride=1, padding=0, dilation=1, groups: int = 1, *, transposed: bool = False, output_padding=0,
                 scores: Tensor | None = None, delta_grad: str = "masked") -> Tensor:
    """``F.conv{N}d`` (or ``F.conv_transpose{N}d`` when ``transposed``) with ``W + m ⊙ v``, N =
    ``weight.dim() - 2`` in 1..3; input ``(N, C_in, *spatial)``, weight ``(C_out, C_in/groups, *kernel)``
    (transposed: ``(C_in, C_out/groups, *kernel)``)."""
    nd = weight.dim() - 2
    w = sam_weight_ref(weight, mask, delta, scores, delta_grad)
    if transposed:
        return getattr(F, f"conv_transpose{nd}d")(input, w, bias, stride, padding, output_padding, groups, dilation)
    return getattr(F, f"conv{nd}d")(input, w, bias, stride, padding, dilation, groups)


def sam_conv2d_ref(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
                   stride=1, padding=0, dilation=1, groups: int = 1, scores: Tensor | None = None,
                   delta_grad: str = "masked") -> Tensor:
    """``F.conv2d(input, W + m ⊙ v, bias, ...)``; input ``(N, C_in, H, W)``, weight
    ``(C_out, C_in/groups, kH, kW)``."""
    w = sam_weight_ref(weight, mask, delta, scores, delta_grad)
    return F.conv2d(input, w, bias, stride, padding, dilation, groups)


def sam_conv_transpose2d_ref(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor,
                             bias: Tensor | None = None, stride=1, padding=0, output_padding=0,
                             groups: int = 1, dilation=1, scores: Tensor | None = None,
                             delta_grad: str = "masked") -> Tensor:
    """``F.conv_transpose2d(input, W + m ⊙ v, bias, ...)``; input ``(N, C_in, H, W)``, weight
    ``(C_in, C_out/groups, kH, kW)``."""
    w = sam_weight_ref(weight, mask, delta, scores, delta_grad)
    return F.conv_transpose2d(input, w, bias, stride, padding, output_padding, groups, dilation)


def sam_linear_ref(input: Tensor, weight: Tensor, mask: Tensor, delta: Tensor, bias: Tensor | None = None,
                   scores: Tensor | None = None, delta_grad: str = "masked") -> Tensor:
    """``F.linear(input, W + m ⊙ v, bias)``; input ``(*, in)``, weight ``(out, in)``."""
    return F.linear(input, sam_weight_ref(weight, mask, delta, scores, delta_grad), bias)


# ------------------------------------------------------------------------------------------ swap
def check_swap_args(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor],
                    names: Sequence[str] | None = None) -> None:
    """Validate a whole swap before any backend writes: raises on the first bad layer.

    Each ``indices[l]`` must be a 1-D integer tensor, strictly increasing (sorted and unique), inside
    ``[0, weights[l].numel())``, on the weight's device; ``values[l]`` must have the weight's dtype and
    device and the same length. Weights must be contiguous (the flat index addresses storage).
    """
    if not len(weights) == len(indices) == len(values):
        raise ValueError(f"swap_: got {len(weights)} weights, {len(indices)} index and {len(values)} "
                         "value tensors; they must match")
    check_one_device("swap_", weights, names)
    for i, (w, idx, val) in enumerate(zip(weights, indices, values)):
        name = _layer_name(names, i)
        if not w.is_contiguous():
            raise ValueError(f"swap_: weight of layer {name} is not contiguous")
        bits_view(w)  # raises on unsupported dtypes
        if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
            raise ValueError(f"swap_: indices of layer {name} must be a 1-D int32/int64 tensor, "
                             f"got {idx.dtype} of shape {tuple(idx.shape)}")
        if val.dtype != w.dtype or val.shape != idx.shape:
            raise ValueError(f"swap_: values of layer {name} must be {w.dtype} of shape {tuple(idx.shape)}, "
                             f"got {val.dtype} of shape {tuple(val.shape)}")
        if idx.device != w.device or val.device != w.device:
            raise ValueError(f"swap_: layer {name}: weight, indices and values must share a device")
        if not val.is_contiguous():
            raise ValueError(f"swap_: values of layer {name} are not contiguous")
        if idx.numel() == 0:
            continue
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= w.numel():
            raise ValueError(f"swap_: indices of layer {name} fall outside [0, {w.numel()}): "
                             f"min {lo}, max {hi}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"swap_: indices of layer {name} are not strictly increasing "
                             "(unsorted or duplicate)")


def swap_ref(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor],
             names: Sequence[str] | None = None) -> None:
    """In place: ``weights[l].flat[indices[l][j]] <-> values[l][j]`` for every layer, as raw bits.

    Self-inverse: calling it twice with the same arguments restores both sides bit for bit.
    Validates every layer (see :func:`check_swap_args`) before the first write.

    Equivalent PyTorch, per layer::

        old = w.view(-1)[idx].clone(); w.view(-1)[idx] = val; val.copy_(old)
    """
    check_swap_args(weights, indices, values, names)
    swap_bits_unchecked_(weights, indices, values)


def swap_bits_unchecked_(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor]) -> None:
    """The write half of :func:`swap_ref`, for arguments already validated by :func:`check_swap_args`."""
    with torch.no_grad():  # weights may be leaves that require grad
        for w, idx, val in zip(weights, indices, values):
            wb, vb = bits_view(w).view(-1), bits_view(val)
            old = wb[idx].clone()
            wb[idx] = vb
            vb.copy_(old)
