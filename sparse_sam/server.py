"""Serving many sparse patches on one base model: every sample of a batch with its own patch, or none.

:class:`PatchServer` holds one base model and any number of named :class:`~sparse_sam.SparsePatch`
objects, and runs a mixed batch in which row ``i`` uses the patch ``ids[i]`` (``None``: the base model)::

    server = PatchServer(model.eval(), {"VA": patch_va, "VH": patch_vh})
    y = server(x, ["VA", None, "VH", "VA"])        # x (4, ...) -> y (4, ...)

Semantics
---------
* **Exact.** For every distinct id ``g`` the rows of ``y`` for ``g`` are bit-identical to
  ``with patch_g.applied(model): model(x[rows_g])``: those rows run alone, as one batch (on the CPU a
  convolution's per-sample result can depend on the batch it runs in, so no other rows may join it).
* **Base untouched.** Patches are switched into the shared weights by raw-bit swaps and swapped back in
  ``finally`` blocks, so after every call (also one that raised) the model is bit-identical to before.
* **Refused inputs.** :meth:`PatchServer.add` refuses a patch of another base model (fingerprint) with
  :class:`~sparse_sam.PatchMismatchError`; an unknown id raises ``KeyError`` naming it; a model in train
  mode raises ``ValueError`` (train-mode BatchNorm would normalise each id's rows with their own
  statistics and update the shared running buffers).
* **Thread-safe.** Calls, :meth:`~PatchServer.add` and :meth:`~PatchServer.remove` hold one lock per
  model (shared by every server of that model), so threads may share a server.
* **Memory.** Per patch the server keeps the indices (int32) and the patched values ``W + v`` at them
  (the weights' dtype): for float32 weights 8 bytes per modified weight, the size of an ``fp32`` patch
  file. No dense copy of any weight is made.

How a batch runs
----------------
The rows are grouped by id. Each distinct id's rows run through the model alone, as one batch, with its
patch switched into the shared weights by one native ``swap_`` call over all its layers and switched out
again in a ``finally`` block; the outputs are scattered back to the rows they came from. That is exact
for any deterministic model by construction. (Running the model once over the whole batch and splitting
only inside the patched layers was tried and measured slower on a 2-core CPU: the full-batch activations
it concatenates fall out of cache, while one id's rows stay in it. It is also exact only for models whose
other layers compute every row independently of the batch, which ``sigmoid``, ``silu`` and ``elu`` do
not: their vectorised and scalar code paths round differently.)
"""
from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import backends, patchfile
from .patchfile import PatchMismatchError, SparsePatch
from .reference import check_swap_args

__all__ = ["PatchServer"]

_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _model_lock(model: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class _Table:
    """One patch, ready to switch: per modified tensor its indices and the patched values
    ``W + v`` there (``(k,)`` each, on the weight's device). Swapping them with the weights is
    self-inverse: one swap switches the patch in, the next switches it out, bit for bit."""

    def __init__(self, model: nn.Module, patch: SparsePatch):
        # Weights exist as distinct Parameters, shapes, dtypes, one device, base fingerprint.
        _, self.weights = patchfile.check_targets(model, patch, strict=True)
        self.names = [layer.name for layer in patch.layers]
        # Own copies (indices int32, or int64 for tensors past the int32 limit), so the patch can go.
        self.indices = [layer.indices.to(w.device).clone() for layer, w in zip(patch.layers, self.weights)]
        self.values = [patchfile.patched_values(w, idx, layer.deltas).contiguous()
                       for layer, w, idx in zip(patch.layers, self.weights, self.indices)]
        check_swap_args(self.weights, self.indices, self.values, self.names)  # once, not at every switch
        self.versions = [w._version for w in self.weights]
        # The base bits' digests (cached by the fingerprint check above): a version bump that leaves
        # them intact, e.g. a SparsePatch applied and removed, is not a change of the base.
        self.digests = [patchfile._weight_digest(w) for w in self.weights]
        self.nbytes = sum(t.numel() * t.element_size() for t in self.indices + self.values)
        self.impl = backends.resolve("swap_", self.weights[0])[1] if self.weights else None

    def swap(self) -> None:
        """Switch the patch in or out (one native call over all its tensors)."""
        if self.weights:
            with torch.no_grad():
                self.impl.swap_(self.weights, self.indices, self.values)


def _gather(out, index: Tensor, n: int):
    """Scatter per-group outputs back: returns ``out`` with rows reordered so that row ``index[j]`` of the
    result is row ``j`` of ``out``."""
    if isinstance(out, Tensor):
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(f"PatchServer: the model returned a tensor of shape {tuple(out.shape)}; "
                             f"expected {n} rows on dim 0, one per sample")
        return torch.empty_like(out).index_copy_(0, index, out)
    if isinstance(out, (tuple, list)):
        return type(out)(_gather(o, index, n) for o in out)
    if isinstance(out, Mapping):
        return {k: _gather(v, index, n) for k, v in out.items()}
    raise TypeError(f"PatchServer: cannot split a model output of type {type(out).__name__} by rows")


def _cat(outs: list):
    first = outs[0]
    if isinstance(first, Tensor):
        return torch.cat(outs)
    if isinstance(first, (tuple, list)):
        return type(first)(_cat([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, Mapping):
        return {k: _cat([o[k] for o in outs]) for k in first}
    raise TypeError(f"PatchServer: cannot join model outputs of type {type(first).__name__} by rows")


class PatchServer:
    """One base model, many named sparse patches, one mixed batch.

    Args:
        model: the pre-trained model the patches were exported from, in eval mode. The server writes its
            weights only while a call runs (swapping patched values in and out, under a lock); do not use
            the model outside the server while a call runs.
        patches: ``{name: SparsePatch}`` to :meth:`add` now.

    ``server(x, ids, **kwargs)``: ``x`` ``(B, ...)``; ``ids`` a sequence of ``B`` patch names or ``None``
    (one per row of ``x``), or one name / ``None`` for the whole batch; ``kwargs`` go to the model
    unchanged. Returns the model's output, ``(B, ...)`` (a tensor, or a tuple / list / dict of tensors,
    with the rows on dim 0).
    """

    def __init__(self, model: nn.Module, patches: Mapping[Hashable, SparsePatch] | None = None):
        self.model = model
        self._lock = _model_lock(model)
        self._tables: dict[Hashable, _Table] = {}
        for name, p in (patches or {}).items():
            self.add(name, p)

    # -- patches ------------------------------------------------------------------------------------
    def add(self, name: Hashable, patch: SparsePatch) -> None:
        """Serve ``patch`` under ``name`` (also while other threads serve). Raises
        :class:`~sparse_sam.PatchMismatchError` if it does not fit the model (layers, shapes, dtypes,
        base fingerprint), ``ValueError`` if ``name`` is taken or ``None``; nothing changes then."""
        if name is None or not isinstance(name, Hashable):
            raise ValueError(f"a patch name must be hashable and not None, got {name!r}")
        if not isinstance(patch, SparsePatch):
            raise TypeError(f"patch {name!r} must be a SparsePatch, got {type(patch).__name__}")
        with self._lock:
            if name in self._tables:
                raise ValueError(f"a patch named {name!r} is already served; remove it first")
            self._check_nothing_applied()
            try:
                table = _Table(self.model, patch)
            except PatchMismatchError as e:
                raise PatchMismatchError(f"patch {name!r} does not fit the model: {e}") from None
            self._tables[name] = table

    def remove(self, name: Hashable) -> None:
        """Stop serving ``name`` (``KeyError`` naming it if unknown). A call already running finishes
        with the patches it started with."""
        with self._lock:
            if name not in self._tables:
                raise KeyError(f"no patch named {name!r} is served; served: {self._served()}")
            del self._tables[name]

    @property
    def names(self) -> list:
        """The served patch names, in the order they were added."""
        return list(self._tables)

    def __contains__(self, name) -> bool:
        return name in self._tables

    def __len__(self) -> int:
        return len(self._tables)

    def nbytes(self, name: Hashable | None = None) -> int:
        """Bytes the server holds for patch ``name`` (indices + patched values), or for all patches."""
        tables = self._tables.values() if name is None else [self._tables[name]]
        return sum(t.nbytes for t in tables)

    def __repr__(self) -> str:
        return f"PatchServer({len(self)} patches {self.names}, {self.nbytes()} bytes)"

    def _served(self) -> str:
        return ", ".join(sorted(map(repr, self._tables))) or "none"

    # -- serving ------------------------------------------------------------------------------------
    def __call__(self, x: Tensor, ids, **kwargs):
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError(f"x must be a tensor with the samples on dim 0, got {type(x).__name__}")
        n = x.shape[0]
        with self._lock:
            groups = self._group(ids, n)
            self._check_ready(groups)
            with torch.no_grad():
                if len(groups) == 1:  # no split: exactly `with patch.applied(model): model(x)`
                    return self._run(x, next(iter(groups)), kwargs)
                perm = torch.cat(list(groups.values())).to(x.device)
                outs = [self._run(x.index_select(0, rows.to(x.device)), g, kwargs) for g, rows in groups.items()]
                return _gather(_cat(outs), perm, n)

    def _run(self, x: Tensor, g, kwargs):
        """``model(x)`` with patch ``g`` switched in (``None``: the base model), switched out after."""
        if g is None:
            return self.model(x, **kwargs)
        table = self._tables[g]
        table.swap()
        try:
            return self.model(x, **kwargs)
        finally:
            table.swap()

    def _group(self, ids, n: int) -> dict:
        """``{id: int64 row indices}`` in order of first appearance; validates every id first."""
        if ids is None or isinstance(ids, str):
            ids = [ids] * n
        elif not isinstance(ids, Sequence):
            ids = list(ids)
        if len(ids) != n:
            raise ValueError(f"got {len(ids)} ids for {n} samples; give one id (a patch name or None) per row")
        rows: dict = {}
        for i, g in enumerate(ids):
            try:
                rows.setdefault(g, []).append(i)
            except TypeError:
                raise KeyError(f"id {g!r} of row {i} is not a patch name") from None
        for g in rows:
            if g is not None and g not in self._tables:
                raise KeyError(f"unknown patch id {g!r} (first at row {rows[g][0]}); served: {self._served()}")
        return {g: torch.tensor(r, dtype=torch.int64) for g, r in rows.items()}

    def _check_nothing_applied(self) -> None:
        if getattr(self.model, "_sparse_sam_handle", None) is not None:
            raise PatchMismatchError("the served model is patched for training (sparse_sam.patch); unpatch it first")
        if patchfile.applied_patch(self.model) is not None:
            raise PatchMismatchError("a patch is applied to the served model (SparsePatch.apply); remove it first")

    def _check_ready(self, groups: dict) -> None:
        if any(m.training for m in self.model.modules()):
            raise ValueError("PatchServer needs the model in eval mode (call model.eval()): in train mode "
                             "BatchNorm would normalise each id's rows with their own statistics and update "
                             "the shared running buffers")
        self._check_nothing_applied()
        for g in groups:
            if g is not None:
                t = self._tables[g]
                for i, (name, w, v) in enumerate(zip(t.names, t.weights, t.versions)):
                    if w._version == v:
                        continue
                    if patchfile._weight_digest(w) == t.digests[i]:  # O(1) after a patch's remove()
                        t.versions[i] = w._version
                    else:
                        raise PatchMismatchError(f"patch {g!r}: the base weight of '{name}' changed since "
                                                 "it was added; the patch no longer fits them")
