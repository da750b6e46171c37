"""How a patched weight is computed: one :class:`PatchedWeight` per unique Parameter, read through a property.

The mechanism (one for every weight type)
-----------------------------------------
:func:`sparse_sam.patch` never replaces a module. For every selected Parameter it creates one
:class:`PatchedWeight` holding ``scores`` and ``delta`` (trainable, the weight's shape) and the bool
``mask``, registered on the module that owns the Parameter as ``<attr>_sam_scores``,
``<attr>_sam_delta`` (Parameters) and ``<attr>_sam_mask`` (a non-persistent buffer), so
``model.parameters()``, ``.to()``, DDP and optimisers see them like any other tensor of the model.

Every module that uses the Parameter (one, or several for tied weights) then gets its class swapped
for a subclass of its own class that turns the attribute into a property::

    module.weight        # → W + m ⊙ v, computed by sparse_sam.ops.sam_weight (autograd to scores/delta)
    module._parameters["weight"]   # the base Parameter itself: same object, same state_dict key, frozen

Because the property answers wherever the model reads the attribute, this serves ``nn.Linear`` and its
subclasses, every ``nn.Conv*d`` / ``nn.ConvTranspose*d``, ``nn.Embedding``, ``nn.MultiheadAttention``
(which reads ``in_proj_weight`` and ``out_proj.weight`` directly), transformers' ``Conv1D``, and any
parameter named by the user. ``isinstance(module, nn.Linear)`` stays true; ``isinstance(module,
SAMLayer)`` tells a patched module. The module's own ``forward`` runs unchanged, so the patched forward
equals, bit for bit, the forward of the model with the exported patch written into its weights.
:func:`sparse_sam.unpatch` restores the classes and removes the added tensors.

A tied weight (one Parameter used by several modules, e.g. GPT-2's ``lm_head`` and ``wte``) has one
:class:`PatchedWeight`: one set of scores, deltas and mask, one entry in the patch file.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops

__all__ = ["PatchedWeight", "SAMLayer", "SAMConv2d", "SAMConvTranspose2d", "SAMLinear", "sam_class",
           "delta_dtype"]


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """dtype of ``delta`` for a weight dtype: float64 for float64, float32 otherwise.

    Half/bf16 deltas would swallow updates of size ``lr·g``; ``W + v`` is computed in the promoted dtype
    and rounded to the weight's dtype once.
    """
    return torch.float64 if weight_dtype == torch.float64 else torch.float32


class PatchedWeight:
    """One patched Parameter ``W`` (shape ``P``): its ``scores`` (float32, ``P``), ``delta`` (``P``), bool
    ``mask`` (``P``, exactly ``k`` ones) and the effective weight ``W + m ⊙ v``.

    The tensors live on the owning module (see the module docstring) and are looked up there on every
    access, so ``model.to(device)`` and ``load_state_dict`` keep working.

    Attributes:
        name: qualified name of the Parameter in the model (its first name, for a tied weight).
        names: every qualified name under which the model holds it (several for a tied weight).
        kind: how ``d_in``/``d_out`` were read (see :mod:`sparse_sam.budget`).
        k: budget (number of ones in the mask).
    """

    def __init__(self, name: str, names: list[str], owner: nn.Module, attr: str, kind: str, d_in: int,
                 d_out: int, k: int, delta_grad: str, backend: str | None):
        self.name, self.names, self.kind = name, list(names), kind
        self.d_in, self.d_out, self.k = int(d_in), int(d_out), int(k)
        self.delta_grad, self.backend = delta_grad, backend
        self.owner, self.attr = owner, attr
        self.keys = (f"{attr}_sam_scores", f"{attr}_sam_delta", f"{attr}_sam_mask")
        self.users: list[tuple[nn.Module, str]] = []
        self._mask_version = None  # scores._version the mask was computed from
        self._refresh = None  # set by the handle: recomputes every mask in one call
        self._off = None  # set by the handle: a callable telling whether the patch is switched off
        self.requires_grad0 = bool(owner._parameters[attr].requires_grad)  # the base's flag before patch()

    # -- the tensors --------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base Parameter (frozen while patched, never written)."""
        return self.owner._parameters[self.attr]

    @property
    def scores(self) -> nn.Parameter:
        return self.owner._parameters[self.keys[0]]

    @property
    def delta(self) -> nn.Parameter:
        return self.owner._parameters[self.keys[1]]

    @property
    def mask(self) -> torch.Tensor:
        return self.owner._buffers[self.keys[2]]

    def register(self, scores: torch.Tensor, delta: torch.Tensor) -> None:
        """Register ``scores``/``delta`` as Parameters and an empty mask buffer on the owner."""
        w = self.weight
        self.owner.register_parameter(self.keys[0], nn.Parameter(scores))
        self.owner.register_parameter(self.keys[1], nn.Parameter(delta))
        self.owner.register_buffer(self.keys[2], torch.zeros(w.shape, dtype=torch.bool, device=w.device),
                                   persistent=False)

    def unregister(self) -> None:
        """Remove what :meth:`register` added (whatever of it is there)."""
        for key in self.keys[:2]:
            self.owner._parameters.pop(key, None)
        self.owner._buffers.pop(self.keys[2], None)

    # -- the mask -----------------------------------------------------------------------------------
    def mask_stale(self) -> bool:
        """Whether the scores changed since the mask was last computed from them."""
        return self._mask_version != self.scores._version

    def _ensure_mask(self) -> None:
        # Inside a torch.compile'd forward the mask is read as the buffer it is: a tensor's ``_version``
        # cannot be traced, and the handle already refreshes every mask after each optimiser step.
        if torch.compiler.is_compiling():
            return
        if self._refresh is not None and self.mask_stale():
            self._refresh()

    # -- the effective weight -----------------------------------------------------------------------
    def effective(self) -> torch.Tensor:
        """``W + m ⊙ v`` (shape ``P``, ``W``'s dtype), differentiable in ``delta`` and ``scores``; the bits
        of ``W`` while the handle is switched off (:meth:`SAMHandle.disabled`).

        Outside autograd (``torch.no_grad``, or switched off) the returned tensor carries the base
        Parameter's original ``requires_grad`` flag: some PyTorch kernels pick their algorithm by that
        flag (``matmul`` folds 3-D inputs differently), so the model must see the flag it would see
        unpatched to compute the same bits (docs/design-notes.md).
        """
        if self._off is not None and self._off():
            return self.weight.detach().requires_grad_(self.requires_grad0)
        self._ensure_mask()
        w = ops.sam_weight(self.weight, self.mask, self.delta, self.scores, self.delta_grad, self.backend)
        if self.requires_grad0 and not w.requires_grad and not torch.compiler.is_compiling():
            w.requires_grad_(True)  # a leaf here: nothing is recorded, only the flag is mirrored
        return w

    def __repr__(self) -> str:
        return (f"PatchedWeight({self.name!r}, shape={tuple(self.weight.shape)}, k={self.k}, "
                f"kind={self.kind!r}, users={len(self.users)})")


class SAMLayer(nn.Module):
    """Marker base of every patched module's class: ``isinstance(m, SAMLayer)`` tells a module whose
    attributes in ``m._sam_attrs`` are computed as ``W + m ⊙ v`` (see the module docstring). Never
    instantiated directly; :func:`sam_class` builds the subclasses."""

    _sam_attrs: tuple[str, ...] = ()

    def extra_repr(self) -> str:
        base = super().extra_repr()
        patched = ", ".join(f"{a}: k={self._sam_params[a].k}" for a in self._sam_attrs)
        return f"{base}, sparse_sam[{patched}]" if base else f"sparse_sam[{patched}]"


def _property(attr: str) -> property:
    def get(self):
        return self._sam_params[attr].effective()

    get.__name__ = attr
    return property(get, doc=f"``{attr}`` with the sparse additive modification: ``W + m ⊙ v``.")


def _conv2d_forward(self, input: torch.Tensor) -> torch.Tensor:
    # The op materialises W + m ⊙ v and calls F.conv2d (bit-identical to nn.Conv2d.forward with the
    # patched weight); a backend's fused convolution runs here only where it is enabled.
    pw = self._sam_params["weight"]
    if pw._off is not None and pw._off():
        return self._sam_base.forward(self, input)
    pw._ensure_mask()
    padding = self.padding
    if self.padding_mode != "zeros":
        input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = 0
    return ops.sam_conv2d(input, pw.weight, pw.mask, pw.delta, self.bias, self.stride, padding, self.dilation,
                          self.groups, scores=pw.scores, delta_grad=pw.delta_grad, backend=pw.backend)


def _conv_transpose2d_forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
    pw = self._sam_params["weight"]
    if pw._off is not None and pw._off():
        return self._sam_base.forward(self, input, output_size)
    pw._ensure_mask()
    output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                          self.dilation)
    return ops.sam_conv_transpose2d(input, pw.weight, pw.mask, pw.delta, self.bias, self.stride, self.padding,
                                    output_padding, self.groups, self.dilation, scores=pw.scores,
                                    delta_grad=pw.delta_grad, backend=pw.backend)


# Exact types whose forward goes through the library's conv op (where a backend may fuse W + m ⊙ v
# into the convolution); every other module keeps its own forward and reads the property.
_FORWARDS = {nn.Conv2d: _conv2d_forward, nn.ConvTranspose2d: _conv_transpose2d_forward}
_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}
_CLASSES_LOCK = threading.Lock()


def sam_class(cls: type, attrs: tuple[str, ...]) -> type:
    """The patched subclass of module class ``cls`` in which ``attrs`` are properties (cached, so
    ``isinstance`` against it works across models)."""
    key = (cls, tuple(attrs))
    with _CLASSES_LOCK:
        sub = _CLASSES.get(key)
        if sub is None:
            ns = {a: _property(a) for a in attrs}
            ns.update(__module__=__name__, _sam_attrs=tuple(attrs), _sam_base=cls, __qualname__=f"SAM{cls.__name__}")
            if cls in _FORWARDS and tuple(attrs) == ("weight",):
                ns["forward"] = _FORWARDS[cls]
            sub = _CLASSES[key] = type(f"SAM{cls.__name__}", (SAMLayer, cls), ns)
    return sub


SAMConv2d = sam_class(nn.Conv2d, ("weight",))
SAMConvTranspose2d = sam_class(nn.ConvTranspose2d, ("weight",))
SAMLinear = sam_class(nn.Linear, ("weight",))
