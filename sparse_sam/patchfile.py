"""Sparse patch files: the learned modification of a model, as indices + deltas, in safetensors.

A :class:`SparsePatch` holds, per patched Parameter, the sorted flat indices where the mask is set and the
deltas ``v`` there. Applying it writes ``W + v`` (computed exactly as the patched forward computes it) into
the weights in place by a raw-bit swap; removing it swaps back, so the base weights return bit for bit.
A tied weight is one entry, written once.

File format (safetensors; never pickle, so loading an untrusted file runs no code)
---------------------------------------------------------------------------------
Metadata key ``sparse_sam`` holds JSON: ``format``, ``version`` (2), ``encoding``, ``sparsity``,
``allocation``, ``config`` (every option of :func:`sparse_sam.patch`), ``fingerprint`` (SHA-256 of the
base weights), and ``layers``: a list of ``{name, names, shape, dtype, k}`` where ``name`` is the
Parameter's qualified name (``names``: all of them, for a tied weight). Tensors, for entry ``i``:

* encoding ``"fp32"`` (lossless): ``{i}.indices`` ``(k,)`` and ``{i}.deltas`` float32 ``(k,)`` (float64 for
  float64 weights). Indices are int32, or int64 for a weight of ≥ 2^31 elements: 8 (12) bytes per
  modified weight.
* encoding ``"compact"``: ``{i}.gaps`` uint16 and ``{i}.deltas`` float16 ``(k,)``: 4 bytes per modified
  weight. ``gaps[j]`` is the distance from the previous index (the first counts from -1); a gap of 0 is
  an escape meaning "advance 65535, no value", so gaps longer than 65535 cost 2 more bytes each.
  Deltas are rounded to float16: lossy.

Version 1 files (names of modules, weight implied; int32 indices) still load.

Switching cost
--------------
The first :meth:`SparsePatch.apply` to a model validates the patch against it, hashes the base weights
(O(N)) and prepares the values to write; on the CPU it also makes one native swap plan
(``torch.classes.sparse_sam.SwapPlan``, csrc/cpu/swap_plan.h) that validates the indices once and holds
both the patched and the base bits. Later apply/remove cycles on the same model are O(k): one native call
per switch for all weights, with no per-weight argument checks. It checks the version counters first
(writing nothing if a weight was written since the last switch); switching on, it compares the bits under
the patch with the verified base bits in the same pass (writing nothing that stays if they differ);
switching off, it only writes. Each switch bumps the weights' version counters, as any in-place write
does, so autograd refuses to backpropagate through a graph that saved the weights before the switch.
Between cycles the base is trusted unchanged only while every weight keeps its identity, storage and
version counter *and* the bits at the patch's positions equal the ones the first apply verified; an edit
through ``.data`` (which bypasses the version counter) at those positions is caught and leads to a full
re-hash. ``apply(model, verify="full")`` re-hashes every time.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import operator
import os
import tempfile
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import backends, ops
from .reference import bits_view, check_swap_args, sam_weight_forward_ref

__all__ = ["SparsePatch", "PatchLayer", "PatchFileError", "PatchMismatchError", "load_patch", "fingerprint",
           "applied_patch", "switch", "ENCODINGS"]

FORMAT, VERSION = "sparse_sam.patch", 2
ENCODINGS = ("fp32", "compact")
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
_ESCAPE = 65535
# Weights with more elements than this get int64 indices (a module attribute so tests can lower it).
INT32_LIMIT = 2**31 - 1


class PatchFileError(ValueError):
    """A patch file or patch object is malformed (truncated, bad indices, wrong dtypes, ...)."""


class PatchMismatchError(ValueError):
    """A patch does not fit the model it is applied to (unknown weight, shape, dtype, fingerprint)."""


def index_dtype(numel: int) -> torch.dtype:
    """int32 for weights addressable by int32 flat indices, int64 beyond (``> INT32_LIMIT`` elements)."""
    return torch.int64 if numel > INT32_LIMIT else torch.int32


@dataclass(slots=True)  # slots: the switching fast path reads these fields with few memory touches
class PatchLayer:
    """One patched Parameter: ``indices`` ``(k,)`` strictly increasing flat indices (int32, or int64 for
    weights of > 2^31 - 1 elements) into a weight of ``shape``/``dtype``, and ``deltas`` ``(k,)`` (float32,
    or float64 for float64 weights). ``name`` is the Parameter's qualified name; ``names`` every name
    under which the model holds it (tied weights)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: Tensor
    deltas: Tensor
    names: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


# ----------------------------------------------------------------------------------- fingerprints
# id(weight) -> (weakref, _version, data_ptr, digest): lets later checks skip re-hashing weights that
# provably have not changed since they were hashed.
_FP_CACHE: dict[int, tuple[weakref.ref, int, int, bytes]] = {}
# id(weight) -> (weakref to a _Binding, position): a binding made with the base fingerprint checked knows
# its weights' base digests. While its patch is off and no weight was written since its last swap, the
# weight holds exactly those bits, whatever its version counter says (each switch bumps it), so a later
# fingerprint need not re-hash. Asked lazily: a switch only flips a flag on the binding.
_FP_KEEPER: dict[int, tuple[weakref.ref, int]] = {}
_FP_LOCK = threading.Lock()


def _weight_digest(w: Tensor, fresh: bool = False) -> bytes:
    if not fresh:
        hit = _FP_CACHE.get(id(w))
        if hit is not None and hit[0]() is w and hit[1] == w._version and hit[2] == w.data_ptr():
            return hit[3]
        keeper = _FP_KEEPER.get(id(w))
        b = keeper[0]() if keeper is not None else None
        if b is not None and b.weights[keeper[1]] is w and b.base_in_place():
            return b.digests[keeper[1]]
    raw = w.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(raw).digest()
    with _FP_LOCK:
        _FP_CACHE[id(w)] = (weakref.ref(w), w._version, w.data_ptr(), digest)
    return digest


def _forget_digest(w: Tensor) -> None:
    with _FP_LOCK:
        _FP_CACHE.pop(id(w), None)
        _FP_KEEPER.pop(id(w), None)


def _keep_digests(binding: "_Binding") -> None:
    """Let ``binding`` answer for its weights' digests (see _FP_KEEPER), dropping keepers that died."""
    ref = weakref.ref(binding)
    with _FP_LOCK:
        for key in [k for k, (r, _) in _FP_KEEPER.items() if r() is None]:
            del _FP_KEEPER[key]
        for i, w in enumerate(binding.weights):
            _FP_KEEPER[id(w)] = (ref, i)


def fingerprint(named_weights: list[tuple[str, Tensor]], fresh: bool = False) -> str:
    """SHA-256 over each ``(name, weight)``'s name, shape, dtype and raw bytes, in order (hex).
    ``fresh=True`` re-hashes every weight instead of trusting the cache."""
    h = hashlib.sha256()
    for name, w in named_weights:
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}|".encode())
        h.update(_weight_digest(w, fresh))
    return h.hexdigest()


# -------------------------------------------------------------------------------------- encodings
def _encode_gaps(indices: Tensor) -> Tensor:
    idx = indices.to(torch.int64)
    gaps = torch.diff(idx, prepend=torch.tensor([-1]))
    n_esc = torch.div(gaps - 1, _ESCAPE, rounding_mode="floor")  # escapes needed before each entry
    out = torch.zeros(int(gaps.numel() + n_esc.sum()), dtype=torch.int64)
    pos = torch.arange(gaps.numel()) + torch.cumsum(n_esc, 0)  # where each real gap lands
    out[pos] = gaps - n_esc * _ESCAPE
    return out.to(torch.int32).to(torch.uint16)


def _decode_gaps(gaps: Tensor, numel: int) -> Tensor:
    g = gaps.to(torch.int64)
    steps = torch.where(g == 0, torch.full_like(g, _ESCAPE), g)
    pos = torch.cumsum(steps, 0) - 1
    return pos[g != 0].to(index_dtype(numel))


# ------------------------------------------------------------------------------- model resolution
def _resolve(model: nn.Module, name: str) -> tuple[list[tuple[nn.Module, str]], nn.Parameter]:
    """The chain of ``(module, child name)`` from ``model`` to the owner, then the Parameter at ``name``."""
    *path, attr = name.split(".")
    chain, m = [], model
    for part in path:
        child = m._modules.get(part)
        if child is None:
            raise PatchMismatchError(f"patch weight '{name}' does not exist in the model ({type(model).__name__}):"
                                     f" no submodule '{part}'")
        chain.append((m, part))
        m = child
    p = m._parameters.get(attr)
    if p is None:
        raise PatchMismatchError(f"patch weight '{name}' does not exist in the model: {type(m).__name__} has no "
                                 f"parameter '{attr}'")
    chain.append((m, attr))
    return chain, p


def _equal(a: Tensor, b: Tensor) -> bool:
    # On the CPU, compare on the calling thread: torch.equal opens a parallel region, which waits for a
    # second thread that a busy machine may not schedule for milliseconds (seen: 8 ms for 100 k entries).
    if a.device.type == "cpu":
        return bool(np.array_equal(a.numpy(), b.numpy()))
    return torch.equal(a, b)


_SOURCE_FIELDS = operator.attrgetter("name", "indices", "deltas")


def _source(patch: "SparsePatch") -> list:
    """A patch's content as the objects it is made of: a binding is reused only for the very tensors it
    was made from (compare with :func:`_same_source`)."""
    return [*itertools.chain.from_iterable(map(_SOURCE_FIELDS, patch.layers))]


def _same_source(patch: "SparsePatch", source: list) -> bool:
    fields = _source(patch)
    return len(fields) == len(source) and all(map(operator.is_, fields, source))


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_targets(model: nn.Module, patch: "SparsePatch", strict: bool = True,
                  fresh: bool = False) -> tuple[list, list[nn.Parameter]]:
    """Check ``patch`` against ``model`` without writing: every weight exists (a distinct Parameter),
    with the patch's shape and dtype, contiguous, all on one device, and with ``strict`` the base
    fingerprint (``fresh``: re-hash instead of trusting the cache). Returns the module chains and the
    Parameters, in patch order; raises :class:`PatchMismatchError`."""
    chains, weights = [], []
    for layer in patch.layers:
        chain, w = _resolve(model, layer.name)
        if tuple(w.shape) != layer.shape:
            raise PatchMismatchError(f"'{layer.name}': patch is for shape {layer.shape}, the model's weight "
                                     f"has {tuple(w.shape)}")
        if w.dtype != layer.dtype:
            raise PatchMismatchError(f"'{layer.name}': patch is for {layer.dtype}, the model's weight is "
                                     f"{w.dtype}")
        if not w.is_contiguous():
            raise PatchMismatchError(f"'{layer.name}': the model's weight is not contiguous")
        if any(w is other for other in weights):
            raise PatchMismatchError(f"'{layer.name}' is the same Parameter as another entry of the patch")
        chains.append(chain)
        weights.append(w)
    if len({w.device for w in weights}) > 1:
        raise PatchMismatchError("the patched weights are on several devices "
                                 f"({sorted({str(w.device) for w in weights})}); move the model to one")
    if strict:
        fp = patch._fingerprint_of(weights, fresh=fresh)
        if fp != patch.fingerprint:
            for w in weights:  # they may have been edited through .data: hash afresh next time
                _forget_digest(w)
            raise PatchMismatchError("the model's base weights differ from those the patch was trained on "
                                     "(fingerprint mismatch); pass strict=False to apply anyway")
    return chains, weights


def patched_values(weight: Tensor, indices: Tensor, deltas: Tensor) -> Tensor:
    """``W + v`` at ``indices`` (``(k,)``, ``weight``'s dtype), computed exactly as the patched forward
    computes it, so written values equal ``W_eff`` bit for bit."""
    base = weight.detach().reshape(-1)[indices]
    return sam_weight_forward_ref(base, torch.ones_like(base, dtype=torch.bool), deltas.to(weight.device))


_MODULES, _PARAMETERS = operator.attrgetter("_modules"), operator.attrgetter("_parameters")


def _has_swap_plan() -> bool:
    try:
        return hasattr(torch.classes.sparse_sam, "SwapPlan")
    except RuntimeError:  # no such namespace: the extension is not loaded
        return False


class _Binding:
    """A patch prepared for one model: resolved weights, the values to write, and the state the fast
    path trusts. On the CPU one native plan holds ``W + v`` and the base bits at ``indices[l]`` and
    writes one or the other. Elsewhere ``values[l]`` are exchanged with the weights: while the patch is
    off they hold ``W + v``, while on the base bits; values of one dtype/device are views of one flat
    buffer, checked against ``expect`` in one comparison."""

    def __init__(self, model: nn.Module, patch: "SparsePatch", strict: bool, verify_full: bool):
        chains, self.weights = check_targets(model, patch, strict, verify_full)
        self.strict = strict
        device = self.weights[0].device if self.weights else torch.device("cpu")
        self.indices = [layer.indices.to(device) for layer in patch.layers]
        # One flat buffer per dtype for the values, one for the base bits expected under them.
        self.values, self.flat, self.expect = [None] * len(self.weights), [], []
        base_views: list[Tensor | None] = [None] * len(self.weights)
        groups: dict[torch.dtype, list[int]] = {}
        for i, w in enumerate(self.weights):
            groups.setdefault(w.dtype, []).append(i)
        with torch.no_grad():
            for dtype, members in groups.items():
                sizes = [self.indices[i].numel() for i in members]
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
                base = torch.empty_like(flat)
                for i, view, bview in zip(members, flat.split(sizes), base.split(sizes)):
                    w, idx = self.weights[i], self.indices[i]
                    bview.copy_(w.detach().reshape(-1)[idx])
                    view.copy_(patched_values(w, idx, patch.layers[i].deltas))
                    self.values[i], base_views[i] = view, bview
                self.flat.append(bits_view(flat))
                self.expect.append(bits_view(base))
        check_swap_args(self.weights, self.indices, self.values, [l.name for l in patch.layers])
        _, self.impl = backends.resolve("swap_", self.weights[0]) if self.weights else (None, None)
        # On the cpp backend, one native plan (csrc/cpu/swap_plan.h) validated here: each switch is then
        # one call with no per-weight argument handling, and it checks the base bits in the same pass.
        self.plan = None
        if (self.weights and device.type == "cpu" and getattr(self.impl, "__name__", "") == "sparse_sam._ext.cpp"
                and _has_swap_plan()):
            # Own copies of the indices: the plan validated these, so a later edit of the patch's cannot
            # reach the weights unchecked.
            self.indices = [i.clone() for i in self.indices]
            self.plan = torch.classes.sparse_sam.SwapPlan(list(self.weights), self.indices, self.values,
                                                          base_views, True)
        # The (module, child name, child) edges of all chains, each once (weights share most of their
        # path from the model), and each weight's (owner, attribute): what chains_intact() checks. As
        # columns, so that it runs its lookups in C (map), not in a Python loop. The model itself is held
        # weakly (its own edges and Parameters apart): a prepared patch does not keep a model alive.
        self.root = weakref.ref(model)
        edges: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        for chain in chains:
            for (parent, key), (child, _) in zip(chain, chain[1:]):
                edges[(id(parent), key)] = (parent, key, child)
        leaves = [(c[-1][0], c[-1][1], w) for c, w in zip(chains, self.weights)]

        def columns(rows, n):
            return tuple(list(col) for col in zip(*rows)) if rows else ([],) * n

        self.edges = columns([e for e in edges.values() if e[0] is not model], 3)
        self.root_edges = columns([e[1:] for e in edges.values() if e[0] is model], 2)
        self.params = columns([q for q in leaves if q[0] is not model], 3)
        self.root_params = columns([q[1:] for q in leaves if q[0] is model], 2)
        self.source = _source(patch)  # the patch content it was prepared from
        self.names = [layer.name for layer in patch.layers]
        self.base_views = base_views
        self.versions = self._versions()  # (without a plan) as of the last swap, or of now
        self.storage = [ptr for _, ptr in self.versions]  # each weight's storage, as prepared
        # With the fingerprint checked, the base digests (the keeper of _FP_CACHE's entries while the base
        # is in place); `removed`: the base is in place, as of the last swap or of now.
        self.digests = [_weight_digest(w) for w in self.weights] if strict else None
        self.removed = True
        if strict:
            _keep_digests(self)

    def _versions(self) -> list[tuple[int, int]]:
        return [(w._version, w.data_ptr()) for w in self.weights]

    def reallocated(self) -> list[str]:
        """The weights whose storage moved since the binding was made (``w.data = ...``), by name."""
        return [n for n, w, ptr in zip(self.names, self.weights, self.storage) if w.data_ptr() != ptr]

    def restore_all_but(self, moved: list[str]) -> None:
        """Remove's fallback when the weights named ``moved`` were reallocated while applied: the base bits
        go back into every other weight; a reallocated one keeps its new contents (its old storage held
        the patch)."""
        # While applied, the base bits are in the plan's copy, or (exchanged) in `values`.
        base = self.base_views if self.plan is not None else self.values
        with torch.no_grad():
            for name, w, idx, bits in zip(self.names, self.weights, self.indices, base):
                if name not in moved:
                    bits_view(w.detach()).view(-1).index_copy_(0, idx.long(), bits_view(bits))

    def chains_intact(self, model: nn.Module) -> bool:
        """Every weight is still the model's Parameter at its name (each shared edge checked once)."""
        if self.root() is not model:
            return False
        is_ = operator.is_
        (parents, keys, children), (owners, attrs, weights) = self.edges, self.params
        (root_keys, root_children), (root_attrs, root_weights) = self.root_edges, self.root_params
        return (all(map(is_, map(model._modules.get, root_keys), root_children))
                and all(map(is_, map(dict.get, map(_MODULES, parents), keys), children))
                and all(map(is_, map(model._parameters.get, root_attrs), root_weights))
                and all(map(is_, map(dict.get, map(_PARAMETERS, owners), attrs), weights)))

    def unchanged(self) -> bool:
        """No weight written or reallocated since the last swap (or since the binding was made)."""
        return self.plan.unchanged() if self.plan is not None else self._versions() == self.versions

    def base_in_place(self) -> bool:
        """The weights hold the verified base bits (patch off, nothing written since)."""
        return self.removed and self.unchanged()

    def swap(self, check: bool = False, only_if_unchanged: bool = False) -> int:
        """One switch, on or off (alternately). Returns _SKIPPED, writing nothing, when
        ``only_if_unchanged`` and a weight was written or reallocated since the last swap; otherwise
        _UNCHANGED if nothing was, plus _MATCHED unless switching on found weights that do not hold the
        verified base bits, in which case nothing stays written and the patch stays off. The native plan
        always checks when switching on; the other backends only with ``check``."""
        switching_on = self.removed
        self.removed = False  # while writing: a concurrent fingerprint must not trust the base
        if self.plan is not None:
            status = self.plan.swap(only_if_unchanged)
        elif not self.weights:
            status = _UNCHANGED | _MATCHED
        else:
            status = _UNCHANGED if self._versions() == self.versions else 0
            if only_if_unchanged and not status:
                status = _SKIPPED
            elif not status and (moved := self.reallocated()):  # as the native plan: never into other storage
                raise ValueError(f"swap: the weights {moved} were reallocated since the binding was made")
            else:
                with torch.no_grad():
                    self.impl.swap_(self.weights, self.indices, self.values)
                    if switching_on and check and not self.base_bits_ok():
                        self.impl.swap_(self.weights, self.indices, self.values)  # back off
                    else:
                        status |= _MATCHED
                self.versions = self._versions()
        done = status != _SKIPPED and status & _MATCHED
        self.removed = (not switching_on) if done else switching_on
        return status

    def base_bits_ok(self) -> bool:
        """After an apply: the bits the swap took out of the weights are the verified base bits."""
        return all(_equal(f, e) for f, e in zip(self.flat, self.expect))


# Status bits of one switch (_Binding.swap; the values of the native SwapPlan.swap).
_SKIPPED, _UNCHANGED, _MATCHED = -1, 1, 2

# Patches currently applied, per model, in application order (stacked only with stack=True). Every
# apply/remove holds one lock, so threads switching patches on one model cannot interleave.
_SWITCH_LOCK = threading.RLock()
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, list[tuple[SparsePatch, _Binding]]]" = weakref.WeakKeyDictionary()


def applied_patch(model: nn.Module) -> "SparsePatch | None":
    """The patch applied last to ``model`` (None if none is)."""
    stack = _APPLIED.get(model)
    return stack[-1][0] if stack else None


class SparsePatch:
    """A sparse additive modification of a model's weights, switchable in place and bit-exactly.

    Create with :meth:`SAMHandle.export <sparse_sam.patching.SAMHandle.export>` or :func:`load_patch`.

    Example::

        patch = handle.export(); sparse_sam.unpatch(model); patch.save("domain.sam")
        with sparse_sam.load_patch("domain.sam").applied(model):
            y = model(x)           # adapted
        y0 = model(x)              # pre-trained, bit for bit

    Attributes:
        layers: list of :class:`PatchLayer`; fingerprint: SHA-256 (hex) of the base weights;
        sparsity, allocation: as patched; config: every :func:`~sparse_sam.patch` option (a dict);
        encoding: "fp32" or "compact".
    """

    def __init__(self, layers: list[PatchLayer], fingerprint: str, sparsity: float | None = None,
                 allocation: str | None = None, encoding: str = "fp32", config: dict | None = None,
                 legacy_names: bool = False):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.layers, self.fingerprint = layers, fingerprint
        self.sparsity, self.allocation, self.encoding = sparsity, allocation, encoding
        self.config = dict(config) if config else {}
        self._legacy_names = legacy_names  # version-1 file: fingerprinted under module names
        self._bindings: "weakref.WeakKeyDictionary[nn.Module, _Binding]" = weakref.WeakKeyDictionary()
        if encoding == "compact":
            self._to_compact()
        for layer in layers:
            _validate_layer(layer)

    @classmethod
    def from_handle(cls, handle, encoding: str = "fp32") -> "SparsePatch":
        layers, named = [], []
        handle.refresh_stale_masks()
        for name, pw in handle.layers.items():
            w = pw.weight
            idx = torch.nonzero(pw.mask.reshape(-1)).reshape(-1)
            deltas = pw.delta.detach().reshape(-1)[idx]
            layers.append(PatchLayer(name, tuple(w.shape), w.dtype, idx.to(index_dtype(w.numel())).cpu(),
                                     deltas.cpu().clone(), list(pw.names)))
            named.append((name, w))
        return cls(layers, fingerprint(named), handle.config.sparsity, handle.config.allocation, encoding,
                   handle.config.to_dict())

    def _copy(self, memo: dict | None) -> "SparsePatch":
        """A copy without the prepared state, which belongs to one object and its models: shallow (but
        with its own list of layers), or deep with ``memo``."""
        import copy

        new = object.__new__(type(self))
        if memo is not None:
            memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key != "_bindings":
                new.__dict__[key] = copy.deepcopy(value, memo) if memo is not None else value
        if memo is None:
            new.layers = list(self.layers)
        new._bindings = weakref.WeakKeyDictionary()
        return new

    def __copy__(self) -> "SparsePatch":
        return self._copy(None)

    def __deepcopy__(self, memo) -> "SparsePatch":
        return self._copy(memo)

    def _fingerprint_of(self, weights: list[Tensor], fresh: bool = False) -> str:
        names = [l.name.rpartition(".")[0] if self._legacy_names else l.name for l in self.layers]
        return fingerprint(list(zip(names, weights)), fresh=fresh)

    def _to_compact(self) -> None:
        for layer in self.layers:
            d = layer.deltas
            if d.numel() and not bool(d.abs().max() <= torch.finfo(torch.float16).max):
                raise ValueError(f"layer '{layer.name}': deltas exceed the float16 range; use encoding='fp32'")
            layer.deltas = d.to(torch.float16).to(d.dtype)

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def num_modified(self) -> int:
        """Number of modified weights (Σ k)."""
        return sum(layer.indices.numel() for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes of the patch's tensor payload in its encoding (the file adds a small JSON header)."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def ratio(self, model: nn.Module) -> float:
        """Patch payload bytes over the bytes of all of ``model``'s parameters."""
        return self.nbytes / _model_bytes(model)

    def __repr__(self) -> str:
        return (f"SparsePatch({len(self.layers)} weights, {self.num_modified} modified, "
                f"{self.nbytes} bytes, encoding={self.encoding!r}, sparsity={self.sparsity})")

    # -- files --------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            if self.encoding == "compact":
                out[f"{i}.gaps"] = _encode_gaps(layer.indices)
                out[f"{i}.deltas"] = layer.deltas.to(torch.float16)
            else:
                out[f"{i}.indices"] = layer.indices.to(index_dtype(layer.numel))
                out[f"{i}.deltas"] = layer.deltas
        return out

    def _metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": VERSION, "encoding": self.encoding, "sparsity": self.sparsity,
                "allocation": self.allocation, "fingerprint": self.fingerprint, "config": self.config,
                "layers": [{"name": l.name, "names": list(l.names or [l.name]), "shape": list(l.shape),
                            "dtype": str(l.dtype), "k": int(l.indices.numel())} for l in self.layers]}
        if self._legacy_names:
            meta["fingerprint_names"] = "modules"
        return {"sparse_sam": json.dumps(meta)}

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.contiguous() for k, v in self._tensors().items()}, metadata=self._metadata())

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file atomically: a temporary file in the same folder, fsynced, then renamed."""
        path = os.fspath(path)
        data = self.to_bytes()
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".sam-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # -- switching ----------------------------------------------------------------------------------
    def verify(self, model: nn.Module, strict: bool = True) -> None:
        """Check the whole patch against ``model`` (weights exist, shapes, dtypes, and with ``strict`` the
        base fingerprint); raises :class:`PatchMismatchError`, writes nothing."""
        check_targets(model, self, strict)

    def _binding(self, model: nn.Module, strict: bool, verify: str) -> _Binding:
        """A fresh binding of this patch to ``model`` (the weights of a previous one are hashed afresh)."""
        b = self._bindings.pop(model, None)
        if b is not None:
            for w in b.weights:
                _forget_digest(w)
        b = _Binding(model, self, strict, verify_full=(verify == "full"))
        self._bindings[model] = b
        return b

    def apply(self, model: nn.Module, strict: bool = True, verify: str = "cached", stack: bool = False) -> nn.Module:
        """Write the patch into ``model``'s weights in place.

        The first apply to a model checks and prepares everything (O(N) hash of the base weights); later
        cycles are O(k) (see the module docstring).

        Args:
            strict: check the base fingerprint (default). ``strict=False`` applies to any base of the same
                shapes and dtypes.
            verify: "cached" (default; re-hash only what may have changed) or "full" (re-hash the base).
            stack: allow applying on top of another applied patch (remove in reverse order).

        Raises :class:`PatchMismatchError` if a weight is missing or differs in shape/dtype, if the base
        fingerprint differs (unless ``strict=False``), if a patch is already applied (unless ``stack``), or
        if the model is patched for training (:func:`sparse_sam.patch`). Nothing is written when it raises.
        """
        from .patching import _HANDLE_ATTR

        if verify not in ("cached", "full"):
            raise ValueError(f"verify must be 'cached' or 'full', got {verify!r}")
        if model.__dict__.get(_HANDLE_ATTR) is not None:  # where patch() keeps it (no Module lookup)
            raise PatchMismatchError("the model is patched for training (sparse_sam.patch); export and "
                                     "unpatch it before applying a patch file")
        with _SWITCH_LOCK:
            applied = _APPLIED.get(model)
            if applied:
                if any(p is self for p, _ in applied):
                    raise PatchMismatchError("this patch is already applied to this model; remove it first")
                if not stack:
                    raise PatchMismatchError("another patch is already applied to this model; remove it first "
                                             "(or use sparse_sam.switch(model, patch), or stack=True)")
            # The prepared binding, if everything it trusts still holds: same patch content, same
            # Parameters at the same places, and (checked by the swap itself) no weight written since.
            b, status = self._bindings.get(model), _SKIPPED
            if (b is not None and verify == "cached" and (b.strict or not strict) and _same_source(self, b.source)
                    and b.chains_intact(model)):
                status = b.swap(check=strict, only_if_unchanged=True)
            if status == _SKIPPED:
                b = self._binding(model, strict, verify)
                status = b.swap(check=strict)
            if not status & _MATCHED:
                # The bits under the patch changed without a version bump (an edit through .data), so
                # the swap wrote nothing: check the whole base afresh.
                b = self._binding(model, strict, "full")  # forgets the old digests and re-hashes
                b.swap()
            _APPLIED.setdefault(model, []).append((self, b))
        return model

    def remove(self, model: nn.Module) -> nn.Module:
        """Swap the original weights back in: ``model`` is bit-identical to before :meth:`apply`. The base
        bits return to the tensors :meth:`apply` wrote, also to one the model no longer holds."""
        with _SWITCH_LOCK:
            stack = _APPLIED.get(model)
            if not stack or stack[-1][0] is not self:
                if stack and any(p is self for p, _ in stack):
                    raise PatchMismatchError("patches stacked on this model must be removed in reverse order")
                raise PatchMismatchError("this patch is not applied to this model")
            # The base bits go back into the very tensors apply wrote, even where the model no longer
            # holds one of them (a module or Parameter replaced meanwhile): whoever holds it gets its
            # base back, and the next apply, finding the chains changed, prepares afresh.
            b = stack[-1][1]
            try:
                untouched = b.swap() & _UNCHANGED
            except ValueError:  # raised before any write; only a reallocated weight does that
                moved = b.reallocated()
                if not moved:
                    raise
                b.restore_all_but(moved)
                untouched = False
                warnings.warn(f"remove: {moved} were given new storage while the patch was applied (w.data = "
                              "...); their old storage held the patch, so they keep their new contents. Every "
                              "other weight has its base bits back.", stacklevel=2)
            stack.pop()
            if not stack:
                del _APPLIED[model]
            if not untouched:  # the weights were edited while applied: next apply re-hashes them
                for w in b.weights:
                    _forget_digest(w)
                self._bindings.pop(model, None)
        return model

    @contextlib.contextmanager
    def applied(self, model: nn.Module, strict: bool = True):
        """``with patch.applied(model):`` the adapted model inside, the pre-trained one after."""
        self.apply(model, strict)
        try:
            yield model
        finally:
            self.remove(model)

    def merge(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Write the patch into ``model`` permanently. This gives up the exact switch-off: the base
        bits under the patch are not kept anywhere, so only a copy of the base can restore them."""
        self.apply(model, strict)
        with _SWITCH_LOCK:
            stack = _APPLIED[model]
            stack.pop()
            if not stack:
                del _APPLIED[model]
            b = self._bindings.pop(model)
        for w in b.weights:
            _forget_digest(w)
        return model


def switch(model: nn.Module, patch: "SparsePatch | None", strict: bool = True) -> nn.Module:
    """Replace the patch applied to ``model`` (if any) by ``patch`` (None: back to the base), in
    O(k_old + k_new). If applying ``patch`` fails, the old patch is applied again before the error."""
    old = applied_patch(model)
    if old is patch:
        return model
    if old is not None:
        old.remove(model)
    if patch is not None:
        try:
            patch.apply(model, strict)
        except BaseException:
            if old is not None:
                old.apply(model)
            raise
    return model


def _validate_layer(layer: PatchLayer) -> None:
    idx = layer.indices
    if idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1:
        raise PatchFileError(f"layer '{layer.name}': indices must be 1-D int32/int64, got {idx.dtype} "
                             f"{tuple(idx.shape)}")
    if idx.dtype == torch.int32 and layer.numel > INT32_LIMIT + 1:
        raise PatchFileError(f"layer '{layer.name}': a weight of {layer.numel} elements needs int64 indices")
    if layer.deltas.dim() != 1 or layer.deltas.numel() != idx.numel():
        raise PatchFileError(f"layer '{layer.name}': {layer.deltas.numel()} deltas for {idx.numel()} indices")
    if not layer.deltas.is_floating_point():
        raise PatchFileError(f"layer '{layer.name}': deltas must be floating, got {layer.deltas.dtype}")
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= layer.numel:
            raise PatchFileError(f"layer '{layer.name}': indices outside [0, {layer.numel}) for shape {layer.shape}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PatchFileError(f"layer '{layer.name}': indices are not strictly increasing (unsorted or duplicate)")


def _tensor(tensors: dict, key: str, dtypes: tuple[torch.dtype, ...], path: str) -> Tensor:
    t = tensors.get(key)
    if t is None:
        raise PatchFileError(f"{path}: tensor '{key}' is missing")
    if t.dtype not in dtypes or t.dim() != 1:
        want = " or ".join(str(d) for d in dtypes)
        raise PatchFileError(f"{path}: tensor '{key}' must be 1-D {want}, got {t.dtype} {tuple(t.shape)}")
    return t


def load_patch(path: str | os.PathLike) -> SparsePatch:
    """Read and validate a patch file written by :meth:`SparsePatch.save` (format version 1 or 2).

    Raises :class:`PatchFileError` naming the problem: not safetensors / truncated, wrong format or
    version, missing or extra tensors, wrong dtypes or shapes, out-of-range, unsorted or duplicate
    indices.
    """
    from safetensors import safe_open
    from safetensors.torch import load

    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise PatchFileError(f"{path} is not a readable safetensors patch file (truncated or corrupt?): {e}") from None
    try:
        meta = json.loads(raw_meta["sparse_sam"])
        if meta["format"] != FORMAT:
            raise PatchFileError(f"{path}: format {meta['format']!r} is not {FORMAT!r}")
        version = int(meta["version"])
        if version > VERSION:
            raise PatchFileError(f"{path}: format version {version} is newer than this library's {VERSION}")
        encoding = meta["encoding"]
        if encoding not in ENCODINGS:
            raise PatchFileError(f"{path}: unknown encoding {encoding!r}")
        specs = meta["layers"]
        fp = str(meta["fingerprint"])
        config = meta.get("config") or {}
        if not isinstance(config, dict):
            raise PatchFileError(f"{path}: config must be an object")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, PatchFileError):
            raise
        raise PatchFileError(f"{path}: missing or malformed sparse_sam metadata ({type(e).__name__}: {e})") from None
    legacy = version == 1 or meta.get("fingerprint_names") == "modules"
    layers, expected = [], set()
    for i, spec in enumerate(specs):
        try:
            name, shape, dtype, k = spec["name"], tuple(int(s) for s in spec["shape"]), _DTYPES[spec["dtype"]], int(spec["k"])
            names = [str(n) for n in spec.get("names", [name])]
        except (KeyError, TypeError, ValueError):
            raise PatchFileError(f"{path}: malformed description of layer #{i}: {spec!r}") from None
        if version == 1:  # version 1 named modules; the weight was implied
            name, names = f"{name}.weight", [f"{name}.weight"]
        numel = int(np.prod(shape, dtype=np.int64))
        delta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if encoding == "compact":
            gaps = _tensor(tensors, f"{i}.gaps", (torch.uint16,), path)
            deltas = _tensor(tensors, f"{i}.deltas", (torch.float16,), path).to(delta_dtype)
            indices = _decode_gaps(gaps, numel)
            expected |= {f"{i}.gaps", f"{i}.deltas"}
        else:
            indices = _tensor(tensors, f"{i}.indices", (index_dtype(numel),), path)
            deltas = _tensor(tensors, f"{i}.deltas", (delta_dtype,), path)
            expected |= {f"{i}.indices", f"{i}.deltas"}
        if indices.numel() != k or deltas.numel() != k:
            raise PatchFileError(f"{path}: layer '{name}' declares k={k} but holds {indices.numel()} indices "
                                 f"and {deltas.numel()} deltas")
        layers.append(PatchLayer(name, shape, dtype, indices, deltas, names))
    extra = set(tensors) - expected
    if extra:
        raise PatchFileError(f"{path}: unexpected tensors {sorted(extra)}")
    # The constructor validates indices (bounds, order, uniqueness) of every layer.
    return SparsePatch(layers, fp, meta.get("sparsity"), meta.get("allocation"), encoding, config, legacy)
