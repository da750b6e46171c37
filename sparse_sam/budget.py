"""Which weights a patch reaches, and their budgets ``k`` (paper eq. 11) with an exact total.

Selection
---------
A *target* is one unique floating Parameter of the model. By default every weight of a supported kind
is a target; a tied weight (one Parameter held by several modules) is one target, named by its first
qualified name in ``model.named_parameters()`` order. Other floating parameters of two or more
dimensions are skipped with one warning that lists them (biases and norm scales, 1-D, are not adapted
by default). ``target_parameters=["*.weight", "encoder.*"]`` instead selects every floating parameter
whose qualified name (any of its names, for a tied one) matches a glob pattern.

``d_in`` / ``d_out`` per kind
-----------------------------
Chosen so that ``d_in · d_out = p`` (the paper's premise that a layer's size is the product of its input
and output dimensions); eq. 11 gives layer ``l`` a share ``∝ d_in,l + d_out,l``.

=============================================  ==================================  ===============================  =====================
kind (module, attribute)                       weight shape                        d_in                             d_out
=============================================  ==================================  ===============================  =====================
``nn.Linear`` and subclasses, ``.weight``      ``(out, in)``                       ``in``                           ``out``
``nn.Conv1d/2d/3d``, ``.weight``               ``(C_out, C_in/g, *k)``             ``C_in/g · Πk``                  ``C_out``
``nn.ConvTranspose1d/2d/3d``, ``.weight``      ``(C_in, C_out/g, *k)``             ``C_in``                         ``C_out/g · Πk``
``nn.Embedding``, ``.weight``                  ``(num_embeddings, dim)``           ``num_embeddings`` (one-hot in)  ``dim``
``nn.MultiheadAttention.in_proj_weight``       ``(3E, E)``                         ``E``                            ``3E``
``nn.MultiheadAttention.{q,k,v}_proj_weight``  ``(E, kdim)`` / ``(E, vdim)``       ``kdim`` / ``vdim``              ``E``
transformers ``Conv1D``, ``.weight``           ``(in, out)`` (stored transposed)   ``in``                           ``out``
any other parameter (``target_parameters``)    ``S`` (leading 1s dropped)          ``Π S[1:]`` (1 for 1-D)          ``S[0]``
=============================================  ==================================  ===============================  =====================

``MultiheadAttention.out_proj`` is an ``nn.Linear`` subclass and counts as one. ``g`` is ``groups``.

Budgets
-------
* ``"linear"``: ``k_l ∝ d_in,l + d_out,l`` (eq. 11: ``γ_l = γ · (d_in,l + d_out,l) / Σ (d_in + d_out) · N / p_l``).
* ``"uniform"``: ``k_l ∝ p_l`` (``γ_l = γ``).

In both, ``Σ k_l == round(γ · N)`` exactly, no layer gets more than its size ``p_l`` (the excess is
redistributed to the other layers in proportion to their shares), and the fractional parts are
rounded by largest remainder (ties to the earlier layer).
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch.nn as nn

__all__ = ["ALLOCATIONS", "DEFAULT_LAYERS", "Target", "find_targets", "layer_dims", "param_dims", "allocate",
           "budgets_for", "layer_budgets"]

ALLOCATIONS = ("linear", "uniform")
_MHA_ATTRS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
# Module types whose weights are patched by default (transformers' Conv1D is recognised by duck typing,
# so that transformers need not be installed).
DEFAULT_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def weight_kind(module: nn.Module, attr: str) -> str | None:
    """The kind of ``module.<attr>`` if it is a supported weight (see the table above), else None."""
    if attr == "weight":
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            return "conv_transpose"
        if isinstance(module, nn.modules.conv._ConvNd):
            return "conv"
        if isinstance(module, nn.Linear):
            return "linear"
        if isinstance(module, nn.Embedding):
            return "embedding"
        if _is_hf_conv1d(module):
            return "conv1d_transposed"
    if isinstance(module, nn.MultiheadAttention) and attr in _MHA_ATTRS:
        return "linear"
    return None


def param_dims(shape: Sequence[int], kind: str | None = None) -> tuple[int, int]:
    """``(d_in, d_out)`` of a weight of ``shape`` and ``kind`` (see the module docstring)."""
    shape = tuple(int(s) for s in shape)
    rest = math.prod(shape[1:])
    if kind in ("linear", "conv"):
        return rest, shape[0]
    if kind in ("conv_transpose", "embedding"):
        return shape[0], rest
    if kind == "conv1d_transposed":
        return shape[0], shape[1]
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) <= 1:
        return 1, (shape[0] if shape else 1)
    return math.prod(shape[1:]), shape[0]


def layer_dims(module: nn.Module, attr: str = "weight") -> tuple[int, int]:
    """``(d_in, d_out)`` of ``module.<attr>`` for a supported layer (see the module docstring)."""
    kind = weight_kind(module, attr)
    if kind is None:
        raise TypeError(f"no input/output dimensions defined for {type(module).__name__}.{attr}")
    return param_dims(module._parameters[attr].shape, kind)


@dataclass
class Target:
    """One unique Parameter to patch.

    Attributes:
        name: its first qualified name; ``names``: all of them (several for a tied weight).
        param: the Parameter; ``kind``: its kind (None for a parameter outside the table).
        users: every ``(module_name, module, attribute)`` that holds it; the first is its owner.
        d_in, d_out: see the module docstring.
    """

    name: str
    param: nn.Parameter
    kind: str | None
    users: list[tuple[str, nn.Module, str]] = field(default_factory=list)
    d_in: int = 0
    d_out: int = 0

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def names(self) -> list[str]:
        return [f"{m}.{a}" if m else a for m, _, a in self.users]


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(Parameter) → every (module name, module, attribute) holding it, in module order."""
    out: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is not None:
                places = out.setdefault(id(p), [])
                if not any(mod is m and a == attr for _, mod, a in places):
                    places.append((mname, m, attr))
    return out


def find_targets(model: nn.Module, layers: Sequence[type] | None = None,
                 filter_fn: Callable[[str, nn.Module], bool] | None = None,
                 target_parameters: Sequence[str] | None = None) -> tuple[dict[str, Target], list[str]]:
    """The Parameters of ``model`` a patch would reach, and the ones skipped as unsupported.

    Args:
        layers: module types; only weights of supported kinds whose module is an instance of one of them
            are selected (default: all supported kinds).
        filter_fn: ``filter_fn(module_name, module) -> bool``, asked for the owner of each candidate.
        target_parameters: glob patterns over qualified parameter names; when given, every floating
            parameter matching one of them is selected, of any kind or shape.

    Returns:
        ``(targets, skipped)``: qualified name → :class:`Target` in ``named_parameters`` order, and the
        names of floating parameters with ≥ 2 dimensions of no supported kind (default selection only).
    """
    holders = _holders(model)
    targets: dict[str, Target] = {}
    skipped: list[str] = []
    for name, p in model.named_parameters():
        users = holders[id(p)]
        kind = next((k for k in (weight_kind(m, a) for _, m, a in users) if k is not None), None)
        t = Target(name, p, kind, users)
        owner_name, owner, _ = users[0]
        if target_parameters is not None:
            chosen = p.is_floating_point() and any(fnmatch.fnmatchcase(n, pat) for n in t.names
                                                   for pat in target_parameters)
        elif kind is None:
            chosen = False
            if p.is_floating_point() and p.dim() >= 2:
                skipped.append(name)
        else:
            chosen = layers is None or any(isinstance(m, tuple(layers)) for _, m, a in users
                                           if weight_kind(m, a) is not None)
        if chosen and filter_fn is not None:
            chosen = bool(filter_fn(owner_name, owner))
        if chosen:
            t.d_in, t.d_out = param_dims(p.shape, kind)
            targets[name] = t
    return targets, skipped


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


def budgets_for(targets: Mapping[str, Target], sparsity: float, allocation: str = "linear") -> dict[str, int]:
    """Budgets for already selected targets (name → :class:`Target`); see :func:`layer_budgets`."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    sizes = {n: t.numel for n, t in targets.items()}
    if allocation == "linear":
        shares = {n: float(t.d_in + t.d_out) for n, t in targets.items()}
    else:
        shares = {n: float(s) for n, s in sizes.items()}
    return allocate(sizes, shares, sparsity)


def layer_budgets(model: nn.Module, sparsity: float, allocation: str = "linear", layers=None, filter_fn=None,
                  target_parameters=None) -> dict[str, int]:
    """Per-weight budgets of the targets :func:`sparse_sam.patch` would select (same arguments).

    Returns:
        qualified parameter name (e.g. ``"encoder.0.weight"``) → ``k`` with ``Σ k == round(γ · N)``.
    """
    targets, _ = find_targets(model, layers, filter_fn, target_parameters)
    return budgets_for(targets, sparsity, allocation)
