"""``patch(model, ...)``: turn a model's layers into SAM layers in place; ``unpatch(model)``: undo it.

Zero-forget contract: after ``patch → train → export → unpatch`` every tensor of ``model.state_dict()``
is bit-identical to before the patch, buffers included. Base parameters are frozen while patched and
normalisation layers keep their running statistics (see ``norm`` below), so nothing the adaptation
touches lives outside the SAM layers' own ``scores``/``delta``, which leave with the SAM layers.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import ops
from .budget import ALLOCATIONS, DEFAULT_LAYERS, budgets_for, layer_dims, select_layers
from .modules import SAMLayer, sam_class_for
from .reference import DELTA_GRAD_MODES

__all__ = ["SAMHandle", "patch", "unpatch", "patched", "NORM_MODES"]

NORM_MODES = ("frozen", "batch")
_HANDLE_ATTR = "_sparse_sam_handle"


def _check_weight_sharing(model: nn.Module, selected: dict[str, nn.Module]) -> None:
    """A SAM layer owns its weight's modification; a weight used elsewhere too would see two truths."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    for name, m in selected.items():
        places = owners.get(id(m.weight), [])
        if len(places) > 1:
            raise ValueError(f"weight of layer '{name}' is shared ({', '.join(places)}); a sparse patch cannot "
                             "modify one user of a tied weight and not the other. Exclude it with filter_fn, "
                             "e.g. filter_fn=lambda name, m: name != " + repr(name))


class SAMHandle:
    """What :func:`patch` returns: the SAM layers of one model and the operations on them.

    Attributes:
        layers: qualified name → SAM layer, in model order.
        sparsity, allocation, learn_mask, delta_grad: the settings the model was patched with.
    """

    def __init__(self, model, layers: dict[str, SAMLayer], sparsity, allocation, learn_mask, delta_grad,
                 backend, restore: list[Callable[[], None]]):
        self.model = model
        self.layers = layers
        self.sparsity, self.allocation = sparsity, allocation
        self.learn_mask, self.delta_grad, self.backend = learn_mask, delta_grad, backend
        self._restore = restore
        for m in layers.values():
            m._refresh = self.refresh_masks
        self.refresh_masks()
        self._initial_masks = [m.mask.clone() for m in layers.values()]
        # Masks follow the scores eagerly after every optimiser step, so a torch.compile'd forward
        # (which cannot check the scores' versions) always reads current masks. Eager forwards check
        # again, which also catches scores edited by hand.
        self._step_hook = register_optimizer_step_post_hook(_refresh_after_step(self))
        weakref.finalize(self, self._step_hook.remove)  # a handle dropped without unpatch leaves no hook

    # -- masks ------------------------------------------------------------------------------------
    def refresh_masks(self) -> None:
        """Recompute every layer's top-k mask from its scores, in one ``topk_mask`` call."""
        mods = list(self.layers.values())
        masks = ops.topk_mask([m.scores for m in mods], [m.k for m in mods], backend=self.backend,
                              names=list(self.layers))
        for m, mask in zip(mods, masks):
            m.mask.copy_(mask)
            m._mask_version = m.scores._version

    def refresh_stale_masks(self) -> None:
        """Recompute the masks if any layer's scores changed since they were last computed."""
        if any(m.mask_stale() for m in self.layers.values()):
            self.refresh_masks()

    def flipped_fraction(self) -> float:
        """Fraction of mask entries (over all layers) that differ from the mask at patch time."""
        for m in self.layers.values():
            m._ensure_mask()
        changed = sum(int((m.mask != m0).sum()) for m, m0 in zip(self.layers.values(), self._initial_masks))
        total = sum(m0.numel() for m0 in self._initial_masks)
        return changed / total

    # -- training -----------------------------------------------------------------------------------
    def param_groups(self, lr_scores: float = 1.0, lr_delta: float = 1e-4) -> list[dict]:
        """Parameter groups for any ``torch.optim`` optimiser: scores (when learned) and deltas."""
        groups = [{"params": [m.delta for m in self.layers.values()], "lr": lr_delta, "name": "delta"}]
        if self.learn_mask:
            groups.insert(0, {"params": [m.scores for m in self.layers.values()], "lr": lr_scores,
                              "name": "scores"})
        return groups

    def parameters(self):
        """The trainable SAM tensors (scores when learned, then deltas)."""
        return [p for g in self.param_groups() for p in g["params"]]

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Per layer: name, type, d_in, d_out, k, p, γ_k = k/p, and the patch bytes (lossless encoding)."""
        rows = []
        for name, m in self.layers.items():
            d_in, d_out = layer_dims(m.base)
            p = m.weight.numel()
            rows.append({"name": name, "type": type(m.base).__name__, "d_in": d_in, "d_out": d_out,
                         "k": m.k, "p": p, "gamma_k": m.k / p,
                         "bytes": m.k * (4 + m.delta.element_size())})
        return rows

    def __repr__(self) -> str:
        rows = self.summary()
        w = max([len(r["name"]) for r in rows] + [5])
        lines = [f"SAMHandle(sparsity={self.sparsity}, allocation={self.allocation!r}, "
                 f"learn_mask={self.learn_mask}, delta_grad={self.delta_grad!r})",
                 f"{'layer':<{w}}  {'type':<16} {'k':>9} {'p':>11} {'gamma_k':>9} {'bytes':>9}"]
        for r in rows:
            lines.append(f"{r['name']:<{w}}  {r['type']:<16} {r['k']:>9} {r['p']:>11} "
                         f"{r['gamma_k']:>9.4%} {r['bytes']:>9}")
        k, p = sum(r["k"] for r in rows), sum(r["p"] for r in rows)
        lines.append(f"{'total':<{w}}  {'':<16} {k:>9} {p:>11} {k / p:>9.4%} {sum(r['bytes'] for r in rows):>9}")
        return "\n".join(lines)

    # -- export / undo ------------------------------------------------------------------------------
    def export(self, encoding: str = "fp32"):
        """The learned modification as a :class:`~sparse_sam.SparsePatch` (indices where the mask is set,
        the deltas there, and a fingerprint of the base weights)."""
        from .patchfile import SparsePatch

        return SparsePatch.from_handle(self, encoding=encoding)

    def unpatch(self) -> nn.Module:
        """Put the original modules back (same as :func:`unpatch`)."""
        return unpatch(self.model)


def _refresh_after_step(handle: SAMHandle):
    """An optimiser step post-hook that refreshes ``handle``'s masks; holds the handle weakly."""
    ref = weakref.ref(handle)

    def hook(optimizer, args, kwargs) -> None:
        h = ref()
        if h is not None:
            h.refresh_stale_masks()

    return hook


def _freeze_norms(model: nn.Module, norm: str) -> list[Callable[[], None]]:
    """Keep normalisation buffers bit-identical while patched; returns the undo steps."""
    undo = []
    for m in model.modules():
        if not (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats):
            continue
        if norm == "batch":  # batch statistics in training, running statistics never updated
            m.track_running_stats = False
            undo.append(lambda m=m: setattr(m, "track_running_stats", True))
        else:  # "frozen": normalise with the running statistics even in train mode, as at deployment
            def pre(mod, args):
                mod._sparse_sam_training = mod.training
                mod.training = False

            def post(mod, args, out):
                mod.training = mod.__dict__.pop("_sparse_sam_training")

            hooks = (m.register_forward_pre_hook(pre), m.register_forward_hook(post))
            undo.append(lambda hooks=hooks: [h.remove() for h in hooks])
    return undo


def patch(model: nn.Module, sparsity: float, allocation: str = "linear", learn_mask: bool = True,
          delta_grad: str = "masked", layers=DEFAULT_LAYERS, filter_fn=None, seed: int | None = None,
          backend: str | None = None, norm: str = "frozen") -> SAMHandle:
    """Replace the selected layers of ``model`` in place by SAM layers; returns a :class:`SAMHandle`.

    Args:
        model: the pre-trained model (a container; its layers are swapped, the model object stays).
        sparsity: ``γ`` in (0, 1]: the fraction of the selected weights the patch may modify.
        allocation: per-layer budgets, "linear" (paper eq. 11) or "uniform".
        learn_mask: learn the mask through the scores (True) or keep the initial random mask (False).
        delta_grad: "masked" (``grad_v = m ⊙ g``, paper eq. 8) or "dense" (``grad_v = g``: every delta
            learns, so scores of unmasked weights get a gradient too).
        layers: layer types to patch (Conv2d, ConvTranspose2d, Linear).
        filter_fn: ``filter_fn(name, module) -> bool`` to restrict the selection.
        seed: seed for the initial scores ~ N(0, 1) (drawn on the CPU; same on every device).
        backend: force a backend for every op (see :mod:`sparse_sam.backends`).
        norm: "frozen" (normalisation layers use their running statistics, also in train mode) or
            "batch" (batch statistics in train mode). Either way their buffers never change.

    Every base parameter is frozen (``requires_grad=False``) while patched; :func:`unpatch` restores it.

    Raises:
        ValueError: already patched, empty selection, tied weights, bad sparsity/allocation/mode, or a
            budget that rounds to zero. Nothing is changed when it raises.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None or any(isinstance(m, SAMLayer) for m in model.modules()):
        raise ValueError("model is already patched; call sparse_sam.unpatch(model) first")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if delta_grad not in DELTA_GRAD_MODES:
        raise ValueError(f"delta_grad must be one of {DELTA_GRAD_MODES}, got {delta_grad!r}")
    if norm not in NORM_MODES:
        raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
    selected = select_layers(model, layers, filter_fn)
    if "" in selected:
        raise ValueError(f"model is itself a {type(model).__name__}; patch a container holding it "
                         "(e.g. nn.Sequential(layer)) so the layer can be swapped in place")
    if not selected:
        raise ValueError(f"no layer selected: model has no {', '.join(t.__name__ for t in layers)} "
                         "layers passing filter_fn")
    for name, m in selected.items():
        sam_class_for(m)  # unsupported subclasses raise here, before anything changes
        if not m.weight.is_floating_point():
            raise ValueError(f"layer '{name}' has a {m.weight.dtype} weight; SAM needs a floating weight")
    _check_weight_sharing(model, selected)
    ks = budgets_for(selected, sparsity, allocation)
    if sum(ks.values()) == 0:
        raise ValueError(f"sparsity {sparsity} of {sum(m.weight.numel() for m in selected.values())} weights "
                         "rounds to a budget of 0")

    # Nothing has been changed so far; from here on every change has an undo step.
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    sam_layers = {n: sam_class_for(m)(m, ks[n], delta_grad, backend, generator) for n, m in selected.items()}
    if not learn_mask:
        for m in sam_layers.values():
            m.scores.requires_grad_(False)
    restore = []
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    restore.append(lambda: [p.requires_grad_(rg) for p, rg in flags])
    restore += _freeze_norms(model, norm)
    for name, sam in sam_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, sam)
        restore.append(lambda parent=parent, child=child, base=sam.base: setattr(parent, child, base))
    handle = SAMHandle(model, sam_layers, sparsity, allocation, learn_mask, delta_grad, backend, restore)
    object.__setattr__(model, _HANDLE_ATTR, handle)
    return handle


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: original modules back, ``requires_grad`` flags and norm layers restored.

    Every tensor of ``model.state_dict()`` is then bit-identical to before the patch.
    """
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("model is not patched (no sparse_sam.patch handle on it)")
    for undo in reversed(handle._restore):
        undo()
    object.__delattr__(model, _HANDLE_ATTR)
    handle._step_hook.remove()
    for m in handle.layers.values():
        m._refresh = None
    return model


@contextlib.contextmanager
def patched(model: nn.Module, sparsity: float, **kwargs):
    """``with patched(model, γ) as handle:`` patch for the duration of the block, unpatch after."""
    handle = patch(model, sparsity, **kwargs)
    try:
        yield handle
    finally:
        unpatch(model)

