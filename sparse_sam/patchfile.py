"""Sparse patch files: the learned modification of a model, as indices + deltas, in safetensors.

A :class:`SparsePatch` holds, per layer, the sorted flat indices where the mask is set and the deltas
``v`` there. Applying it writes ``W + v`` (computed exactly as the patched forward computes it) into the
weights in place by a raw-bit swap; removing it swaps back, so the base weights return bit for bit.

File format (safetensors; never pickle, so loading an untrusted file runs no code)
---------------------------------------------------------------------------------
Metadata key ``sparse_sam`` holds JSON: ``format``, ``version``, ``encoding``, ``sparsity``,
``allocation``, ``fingerprint`` (SHA-256 of the base weights), and ``layers``: a list of
``{name, shape, dtype, k}``. Tensors, for layer ``i``:

* encoding ``"fp32"`` (lossless): ``{i}.indices`` int32 ``(k,)`` and ``{i}.deltas`` float32 ``(k,)``
  (float64 for float64 weights): 8 bytes per modified weight.
* encoding ``"compact"``: ``{i}.gaps`` uint16 and ``{i}.deltas`` float16 ``(k,)``: 4 bytes per modified
  weight. ``gaps[j]`` is the distance from the previous index (the first counts from -1); a gap of 0 is
  an escape meaning "advance 65535, no value", so gaps longer than 65535 cost 2 more bytes each.
  Deltas are rounded to float16: lossy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .reference import sam_weight_forward_ref

__all__ = ["SparsePatch", "PatchLayer", "PatchFileError", "PatchMismatchError", "load_patch", "fingerprint",
           "ENCODINGS"]

FORMAT, VERSION = "sparse_sam.patch", 1
ENCODINGS = ("fp32", "compact")
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
_ESCAPE = 65535


class PatchFileError(ValueError):
    """A patch file or patch object is malformed (truncated, bad indices, wrong dtypes, ...)."""


class PatchMismatchError(ValueError):
    """A patch does not fit the model it is applied to (unknown layer, shape, dtype, fingerprint)."""


@dataclass
class PatchLayer:
    """One layer of a patch: ``indices`` int32 ``(k,)`` strictly increasing flat indices into a weight of
    ``shape``/``dtype``, and ``deltas`` ``(k,)`` (float32, or float64 for float64 weights)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: Tensor
    deltas: Tensor

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


# ----------------------------------------------------------------------------------- fingerprints
# id(weight) -> (weakref, _version, digest): lets repeated apply/remove cycles skip re-hashing weights
# that provably have not changed since they were hashed (remove() re-registers the restored bits).
_FP_CACHE: dict[int, tuple[weakref.ref, int, bytes]] = {}


def _weight_digest(w: Tensor) -> bytes:
    hit = _FP_CACHE.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    raw = w.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.sha256(raw).digest()
    _FP_CACHE[id(w)] = (weakref.ref(w), w._version, digest)
    return digest


def fingerprint(named_weights: list[tuple[str, Tensor]]) -> str:
    """SHA-256 over each ``(name, weight)``'s name, shape, dtype and raw bytes, in order (hex)."""
    h = hashlib.sha256()
    for name, w in named_weights:
        h.update(f"{name}|{tuple(w.shape)}|{w.dtype}|".encode())
        h.update(_weight_digest(w))
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


def _decode_gaps(gaps: Tensor) -> Tensor:
    g = gaps.to(torch.int64)
    steps = torch.where(g == 0, torch.full_like(g, _ESCAPE), g)
    pos = torch.cumsum(steps, 0) - 1
    return pos[g != 0].to(torch.int32)


def _model_weight(model: nn.Module, name: str) -> Tensor:
    try:
        w = model.get_submodule(name).weight
    except AttributeError:
        raise PatchMismatchError(f"patch layer '{name}' does not exist in the model "
                                 f"({type(model).__name__})") from None
    if not isinstance(w, Tensor):
        raise PatchMismatchError(f"patch layer '{name}' has no weight tensor in the model")
    return w


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# Patches currently applied, per model: at most one, so remove() always restores the base.
_APPLIED: "weakref.WeakKeyDictionary[nn.Module, tuple[SparsePatch, list[Tensor]]]" = weakref.WeakKeyDictionary()


class SparsePatch:
    """A sparse additive modification of a model's weights, switchable in place and bit-exactly.

    Create with :meth:`SAMHandle.export <sparse_sam.patching.SAMHandle.export>` or :func:`load_patch`.

    Example::

        patch = handle.export(); sparse_sam.unpatch(model); patch.save("domain.sam")
        with sparse_sam.load_patch("domain.sam").applied(model):
            y = model(x)           # adapted
        y0 = model(x)              # pre-trained, bit for bit
    """

    def __init__(self, layers: list[PatchLayer], fingerprint: str, sparsity: float | None = None,
                 allocation: str | None = None, encoding: str = "fp32"):
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.layers, self.fingerprint = layers, fingerprint
        self.sparsity, self.allocation, self.encoding = sparsity, allocation, encoding
        if encoding == "compact":
            self._to_compact()
        for layer in layers:
            _validate_layer(layer)

    @classmethod
    def from_handle(cls, handle, encoding: str = "fp32") -> "SparsePatch":
        layers, named = [], []
        for name, m in handle.layers.items():
            m._ensure_mask()
            idx = torch.nonzero(m.mask.reshape(-1)).reshape(-1)
            deltas = m.delta.detach().reshape(-1)[idx]
            layers.append(PatchLayer(name, tuple(m.weight.shape), m.weight.dtype, idx.to(torch.int32).cpu(),
                                     deltas.cpu().clone()))
            named.append((name, m.weight))
        return cls(layers, fingerprint(named), handle.sparsity, handle.allocation, encoding)

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
        return (f"SparsePatch({len(self.layers)} layers, {self.num_modified} modified weights, "
                f"{self.nbytes} bytes, encoding={self.encoding!r}, sparsity={self.sparsity})")

    # -- files --------------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, Tensor]:
        out = {}
        for i, layer in enumerate(self.layers):
            if self.encoding == "compact":
                out[f"{i}.gaps"] = _encode_gaps(layer.indices)
                out[f"{i}.deltas"] = layer.deltas.to(torch.float16)
            else:
                out[f"{i}.indices"] = layer.indices.to(torch.int32)
                out[f"{i}.deltas"] = layer.deltas
        return out

    def _metadata(self) -> dict[str, str]:
        meta = {"format": FORMAT, "version": VERSION, "encoding": self.encoding, "sparsity": self.sparsity,
                "allocation": self.allocation, "fingerprint": self.fingerprint,
                "layers": [{"name": l.name, "shape": list(l.shape), "dtype": str(l.dtype),
                            "k": int(l.indices.numel())} for l in self.layers]}
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
    def _targets(self, model: nn.Module, strict: bool) -> list[Tensor]:
        """Check the whole patch against ``model`` (raises before anything is written)."""
        weights = []
        for layer in self.layers:
            w = _model_weight(model, layer.name)
            if tuple(w.shape) != layer.shape:
                raise PatchMismatchError(f"layer '{layer.name}': patch is for shape {layer.shape}, the model's "
                                         f"weight has {tuple(w.shape)}")
            if w.dtype != layer.dtype:
                raise PatchMismatchError(f"layer '{layer.name}': patch is for {layer.dtype}, the model's weight "
                                         f"is {w.dtype}")
            if not w.is_contiguous():
                raise PatchMismatchError(f"layer '{layer.name}': the model's weight is not contiguous")
            weights.append(w)
        if strict:
            fp = fingerprint([(layer.name, w) for layer, w in zip(self.layers, weights)])
            if fp != self.fingerprint:
                raise PatchMismatchError("the model's base weights differ from those the patch was trained on "
                                         "(fingerprint mismatch); pass strict=False to apply anyway")
        return weights

    def apply(self, model: nn.Module, strict: bool = True) -> nn.Module:
        """Write the patch into ``model``'s weights in place (O(k) after the first fingerprint check).

        Raises :class:`PatchMismatchError` if a layer is missing or differs in shape/dtype, if the base
        fingerprint differs (unless ``strict=False``), or if a patch is already applied to ``model``.
        Nothing is written when it raises.
        """
        if model in _APPLIED:
            other = _APPLIED[model][0]
            what = "this patch is" if other is self else "another patch is"
            raise PatchMismatchError(f"{what} already applied to this model; remove it first")
        weights = self._targets(model, strict)
        values = []
        for layer, w in zip(self.layers, weights):
            idx = layer.indices.to(device=w.device, dtype=torch.int64)
            base = w.detach().reshape(-1)[idx]
            d = layer.deltas.to(w.device)
            # The same arithmetic as the patched forward, so applied weights equal W_eff bit for bit.
            values.append(sam_weight_forward_ref(base, torch.ones_like(base, dtype=torch.bool), d).contiguous())
        indices = [layer.indices.to(w.device) for layer, w in zip(self.layers, weights)]
        ops.swap_(weights, indices, values, names=[l.name for l in self.layers])
        _APPLIED[model] = (self, values)  # values now hold the original bits
        return model

    def remove(self, model: nn.Module) -> nn.Module:
        """Swap the original weights back in: ``model`` is bit-identical to before :meth:`apply`."""
        entry = _APPLIED.get(model)
        if entry is None or entry[0] is not self:
            raise PatchMismatchError("this patch is not applied to this model")
        weights = [_model_weight(model, layer.name) for layer in self.layers]
        indices = [layer.indices.to(w.device) for layer, w in zip(self.layers, weights)]
        ops.swap_(weights, indices, entry[1], names=[l.name for l in self.layers])
        del _APPLIED[model]
        for w in weights:  # these bits were hashed before apply: skip re-hashing them next time
            if id(w) in _FP_CACHE:
                ref, _, digest = _FP_CACHE[id(w)]
                if ref() is w:
                    _FP_CACHE[id(w)] = (ref, w._version, digest)
        return model

    @contextlib.contextmanager
    def applied(self, model: nn.Module, strict: bool = True):
        """``with patch.applied(model):`` the adapted model inside, the pre-trained one after."""
        self.apply(model, strict)
        try:
            yield model
        finally:
            self.remove(model)


def _validate_layer(layer: PatchLayer) -> None:
    idx = layer.indices
    if idx.dtype != torch.int32 or idx.dim() != 1:
        raise PatchFileError(f"layer '{layer.name}': indices must be 1-D int32, got {idx.dtype} {tuple(idx.shape)}")
    if layer.deltas.dim() != 1 or layer.deltas.numel() != idx.numel():
        raise PatchFileError(f"layer '{layer.name}': {layer.deltas.numel()} deltas for {idx.numel()} indices")
    if not layer.deltas.is_floating_point():
        raise PatchFileError(f"layer '{layer.name}': deltas must be floating, got {layer.deltas.dtype}")
    if idx.numel():
        if int(idx.min()) < 0 or int(idx.max()) >= layer.numel:
            raise PatchFileError(f"layer '{layer.name}': indices outside [0, {layer.numel}) for shape {layer.shape}")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PatchFileError(f"layer '{layer.name}': indices are not strictly increasing (unsorted or duplicate)")


def _tensor(tensors: dict, key: str, dtype: torch.dtype, path: str) -> Tensor:
    t = tensors.get(key)
    if t is None:
        raise PatchFileError(f"{path}: tensor '{key}' is missing")
    if t.dtype != dtype or t.dim() != 1:
        raise PatchFileError(f"{path}: tensor '{key}' must be 1-D {dtype}, got {t.dtype} {tuple(t.shape)}")
    return t


def load_patch(path: str | os.PathLike) -> SparsePatch:
    """Read and validate a patch file written by :meth:`SparsePatch.save`.

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
        if int(meta["version"]) > VERSION:
            raise PatchFileError(f"{path}: format version {meta['version']} is newer than this library's {VERSION}")
        encoding = meta["encoding"]
        if encoding not in ENCODINGS:
            raise PatchFileError(f"{path}: unknown encoding {encoding!r}")
        specs = meta["layers"]
        fp = str(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, PatchFileError):
            raise
        raise PatchFileError(f"{path}: missing or malformed sparse_sam metadata ({type(e).__name__}: {e})") from None
    layers, expected = [], set()
    for i, spec in enumerate(specs):
        try:
            name, shape, dtype, k = spec["name"], tuple(int(s) for s in spec["shape"]), _DTYPES[spec["dtype"]], int(spec["k"])
        except (KeyError, TypeError, ValueError):
            raise PatchFileError(f"{path}: malformed description of layer #{i}: {spec!r}") from None
        delta_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if encoding == "compact":
            gaps = _tensor(tensors, f"{i}.gaps", torch.uint16, path)
            deltas = _tensor(tensors, f"{i}.deltas", torch.float16, path).to(delta_dtype)
            indices = _decode_gaps(gaps)
            expected |= {f"{i}.gaps", f"{i}.deltas"}
        else:
            indices = _tensor(tensors, f"{i}.indices", torch.int32, path)
            deltas = _tensor(tensors, f"{i}.deltas", delta_dtype, path)
            expected |= {f"{i}.indices", f"{i}.deltas"}
        if indices.numel() != k or deltas.numel() != k:
            raise PatchFileError(f"{path}: layer '{name}' declares k={k} but holds {indices.numel()} indices "
                                 f"and {deltas.numel()} deltas")
        layers.append(PatchLayer(name, shape, dtype, indices, deltas))
    extra = set(tensors) - expected
    if extra:
        raise PatchFileError(f"{path}: unexpected tensors {sorted(extra)}")
    # The constructor validates indices (bounds, order, uniqueness) of every layer.
    return SparsePatch(layers, fp, meta.get("sparsity"), meta.get("allocation"), encoding)
