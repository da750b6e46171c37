"""Per-layer budgets ``k_l`` (paper eq. 11), with an exact total.

* ``"linear"``: ``k_l ∝ d_in,l + d_out,l`` (eq. 11: ``γ_l = γ · (d_in,l + d_out,l) / Σ (d_in + d_out) · N / p_l``).
* ``"uniform"``: ``k_l ∝ p_l`` (``γ_l = γ``).

In both, ``Σ k_l == round(γ · N)`` exactly, no layer gets more than its size ``p_l`` (the excess is
redistributed to the other layers in proportion to their shares), and the fractional parts are
rounded by largest remainder (ties to the earlier layer).

``d_in`` and ``d_out`` are chosen so that ``d_in · d_out = p`` (the paper's premise that a layer's
size is the product of its input and output dimensions):

========================  ===========================================  ================================
layer                     weight shape                                 d_in, d_out
========================  ===========================================  ================================
``nn.Linear``             ``(out, in)``                                ``in``, ``out``
``nn.Conv2d``             ``(C_out, C_in/groups, kH, kW)``             ``C_in/groups·kH·kW``, ``C_out``
``nn.ConvTranspose2d``    ``(C_in, C_out/groups, kH, kW)``             ``C_in``, ``C_out/groups·kH·kW``
========================  ===========================================  ================================

i.e. the fan-in of one output unit and the number of output units for a conv, and the mirror image for
a transposed conv, whose weight maps each input channel to ``C_out/groups·kH·kW`` outputs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch.nn as nn

__all__ = ["ALLOCATIONS", "DEFAULT_LAYERS", "layer_dims", "allocate", "select_layers", "budgets_for", "layer_budgets"]

ALLOCATIONS = ("linear", "uniform")


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Linear, Conv or ConvTranspose layer (see the module docstring)."""
    w = module.weight
    rest = math.prod(w.shape[1:])
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return w.shape[0], rest
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return rest, w.shape[0]
    raise TypeError(f"no input/output dimensions defined for {type(module).__name__}")


def _check_sparsity(sparsity: float) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"sparsity must be a number in (0, 1], got {sparsity!r}") from None
    if not 0.0 < s <= 1.0 or math.isnan(s):
        raise ValueError(f"sparsity must be in (0, 1] (a fraction of the weights, e.g. 0.01 for 1%), got {sparsity!r}")
    return s


def allocate(sizes: Mapping[str, int], weights: Mapping[str, float], sparsity: float) -> dict[str, int]:
    """Split ``round(sparsity · Σ sizes)`` over layers in proportion to ``weights``, capped at ``sizes``.

    Args:
        sizes: layer name → number of elements ``p_l``.
        weights: layer name → non-negative share (``d_in + d_out`` for "linear", ``p_l`` for "uniform").
        sparsity: ``γ`` in (0, 1].

    Returns:
        layer name → ``k_l`` with ``0 <= k_l <= p_l`` and ``Σ k_l = round(γ · Σ p_l)``.
    """
    sparsity = _check_sparsity(sparsity)
    names = list(sizes)
    total = round(sparsity * sum(sizes.values()))
    # Water-filling: layers whose proportional share exceeds their size are capped, and what they
    # cannot take is shared again among the rest, until no share exceeds its size.
    real = {n: 0.0 for n in names}
    free = [n for n in names if sizes[n] > 0]
    left = float(total)
    while free and left > 0:
        wsum = sum(weights[n] for n in free)
        if wsum <= 0:  # all remaining shares are zero: fall back to sizes
            share = {n: left * sizes[n] / sum(sizes[m] for m in free) for n in free}
        else:
            share = {n: left * weights[n] / wsum for n in free}
        capped = [n for n in free if share[n] >= sizes[n]]
        if not capped:
            real.update(share)
            break
        for n in capped:
            real[n] = float(sizes[n])
            left -= sizes[n]
        free = [n for n in free if n not in capped]
    ks = {n: min(int(math.floor(real[n])), sizes[n]) for n in names}
    # Largest remainder: hand the missing units to the largest fractional parts that still have room.
    missing = total - sum(ks.values())
    order = sorted((n for n in names if ks[n] < sizes[n]), key=lambda n: (-(real[n] - math.floor(real[n])),
                                                                           names.index(n)))
    for n in order[:missing]:
        ks[n] += 1
    return ks


DEFAULT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def select_layers(model: nn.Module, layers=DEFAULT_LAYERS, filter_fn=None) -> dict[str, nn.Module]:
    """Qualified name → module for every submodule of ``model`` that is an instance of ``layers`` and
    passes ``filter_fn(name, module)``, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, tuple(layers)) and (filter_fn is None or filter_fn(name, m))}


def budgets_for(selected: Mapping[str, nn.Module], sparsity: float, allocation: str = "linear") -> dict[str, int]:
    """Budgets for already selected layers (name → module); see :func:`layer_budgets`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    sizes = {n: m.weight.numel() for n, m in selected.items()}
    if allocation == "linear":
        shares = {n: float(sum(layer_dims(m))) for n, m in selected.items()}
    else:
        shares = {n: float(s) for n, s in sizes.items()}
    return allocate(sizes, shares, sparsity)


def layer_budgets(model: nn.Module, sparsity: float, allocation: str = "linear", layers=DEFAULT_LAYERS,
                  filter_fn=None) -> dict[str, int]:
    """Per-layer budgets for the SAM layers of ``model``.

    Args:
        model: any module; its submodules that are instances of ``layers`` (and pass ``filter_fn(name,
            module)``) are counted.
        sparsity: ``γ`` in (0, 1]: the fraction of the selected layers' weights that may change.
        allocation: "linear" (paper eq. 11) or "uniform".

    Returns:
        qualified module name → ``k`` with ``Σ k == round(γ · N)``.
    """
    return budgets_for(select_layers(model, layers, filter_fn), sparsity, allocation)
