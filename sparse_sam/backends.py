"""Backend registry: which implementation runs an op for a given tensor, and why.

Resolution order (docs/design.md §5):

* CUDA tensors: ``triton`` → ``cuda`` → ``torch``.
* CPU tensors: ``cpp`` → ``torch``. ``triton`` runs CPU tensors only when forced and only under
  ``TRITON_INTERPRET=1`` (that is how CI exercises the Triton code without a GPU).

``backend=`` or the ``SPARSE_SAM_BACKEND`` environment variable forces a backend; a forced backend that
cannot run raises :class:`BackendUnavailable` with the reason. An automatic choice falls back silently
and logs the reason once.

Self-verification on first use: the first time a backend listed in :data:`SELFTEST_ON` (``triton`` and
``cuda`` on CUDA devices) serves an op for a given device and dtype, a tiny fresh random case is checked
against the reference (:mod:`sparse_sam.selftest`). If it fails or raises, that op falls back to the
next backend for that device and dtype, with one :class:`SelfTestWarning` naming the op, the backend,
the device and the error; a forced backend that fails raises :class:`BackendUnavailable` instead.
``SPARSE_SAM_SELFTEST=0`` turns verification off.

The backend protocol
--------------------
A backend is an object (usually a module) with some of these functions; an op is supported when its
functions are present. Arguments are already validated by :mod:`sparse_sam.ops`.

* ``topk_mask(scores: list[Tensor], ks: list[int], names: list[str] | None) -> list[BoolTensor]``
  (must raise ``ValueError`` naming the layer on NaN scores)
* ``sam_weight_forward(weight, mask, delta) -> Tensor`` and
  ``sam_weight_backward(grad, mask, delta, scores_dtype, delta_grad) -> (grad_delta, grad_scores)``
* ``swap_(weights: list[Tensor], indices: list[Tensor], values: list[Tensor]) -> None``
* optional fused forwards, used by the conv/linear ops only when asked for (``fused=True`` or
  ``SPARSE_SAM_FUSED_CONV=1``, see :mod:`sparse_sam.ops`; else they materialise ``W_eff`` with
  ``sam_weight_forward`` and call PyTorch):
  ``sam_conv2d_forward(input, weight, mask, delta, bias, stride, padding, dilation, groups, *, fused)``,
  ``sam_conv_transpose2d_forward(input, weight, mask, delta, bias, stride, padding, output_padding,
  groups, dilation, *, fused)``, ``sam_linear_forward(input, weight, mask, delta, bias)``; ``fused`` is
  ``True`` (run whenever the kernel supports the shape) or ``None`` (the backend's own heuristic). A
  fused forward may return ``None`` to decline a shape; the op then materialises.
"""
from __future__ import annotations

import importlib
import logging
import os
import types
import warnings
from dataclasses import dataclass

import torch

from . import reference

__all__ = ["OPS", "BACKENDS", "SELFTEST_ON", "BackendUnavailable", "SelfTestWarning", "resolve", "verified",
           "get", "explain", "available"]

log = logging.getLogger("sparse_sam")

# op name -> the protocol functions it needs
OPS = {
    "topk_mask": ("topk_mask",),
    "sam_weight": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv1d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv2d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv3d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv_transpose1d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv_transpose2d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_conv_transpose3d": ("sam_weight_forward", "sam_weight_backward"),
    "sam_linear": ("sam_weight_forward", "sam_weight_backward"),
    "swap_": ("swap_",),
}
BACKENDS = ("triton", "cuda", "cpp", "torch")
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
# (backend, device type) pairs whose ops are verified on first use. Tests add CPU pairs to exercise it.
SELFTEST_ON = {("triton", "cuda"), ("cuda", "cuda")}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run here; the message says why and what to do."""


class SelfTestWarning(RuntimeWarning):
    """A backend failed its first-use self-test for an op; the op runs on the next backend."""


@dataclass
class _Probe:
    impl: object | None
    reason: str  # why it is unavailable, or what it is when available


_torch_impl = types.SimpleNamespace(
    __name__="sparse_sam.backends.torch",
    topk_mask=reference.topk_mask_threshold,
    sam_weight_forward=reference.sam_weight_forward_ref,
    sam_weight_backward=reference.sam_weight_backward_ref,
    swap_=reference.swap_bits_unchecked_,
)

_probes: dict[str, _Probe] = {}
_logged: set[tuple] = set()


def _load(name: str) -> _Probe:
    """Import a backend once; remember why it failed."""
    if name in _probes:
        return _probes[name]
    if name == "torch":
        probe = _Probe(_torch_impl, "pure PyTorch reference, always available")
    elif name == "triton":
        try:
            impl = importlib.import_module("sparse_sam.kernels")
            probe = _Probe(impl, f"Triton {impl.triton_version()} kernels")
        except Exception as e:  # ImportError, or a Triton too old for the kernels
            probe = _Probe(None, f"Triton kernels unavailable: {type(e).__name__}: {e}")
    else:  # cpp / cuda: the compiled extension
        if os.environ.get("SPARSE_SAM_BUILD_EXT", "1") == "0":
            probe = _Probe(None, "compiled extension disabled by SPARSE_SAM_BUILD_EXT=0")
        else:
            try:
                ext = importlib.import_module("sparse_sam._ext")
                impl = ext.backend(name)  # raises BackendUnavailable with the reason
                probe = _Probe(impl, f"compiled extension ({ext.origin()})")
            except Exception as e:
                probe = _Probe(None, f"compiled extension unavailable: {type(e).__name__}: {e}")
    _probes[name] = probe
    return probe


def _device_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot serve tensors on ``device_type`` (None when it can)."""
    if name == "torch":
        return None
    if name == "triton":
        if device_type == "cuda":
            return None
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return f"Triton runs {device_type} tensors only on CUDA, or on CPU under TRITON_INTERPRET=1"
    if name == "cuda":
        return None if device_type == "cuda" else f"the cuda backend runs CUDA tensors, not {device_type}"
    if name == "cpp":
        return None if device_type == "cpu" else f"the cpp backend runs CPU tensors, not {device_type}"
    raise AssertionError(name)


def _supports(impl, op: str) -> bool:
    return all(hasattr(impl, f) for f in OPS[op])


def _why_not(name: str, op: str, device_type: str) -> str | None:
    reason = _device_reason(name, device_type)
    if reason:
        return reason
    probe = _load(name)
    if probe.impl is None:
        return probe.reason
    if not _supports(probe.impl, op):
        return f"the {name} backend does not implement {op}"
    return None


def _forced(backend: str | None) -> str | None:
    forced = backend if backend is not None else os.environ.get("SPARSE_SAM_BACKEND") or None
    if forced is not None and forced not in BACKENDS:
        raise ValueError(f"unknown backend {forced!r}; choose one of {BACKENDS}")
    return forced


def _selftest_failure(name: str, op: str, impl, tensor: torch.Tensor) -> str | None:
    """The self-test error of backend ``name`` for ``op`` on ``tensor``'s device and dtype (None: passed,
    or not verified). Warns once per failing (backend, op, device, dtype)."""
    if (name, tensor.device.type) not in SELFTEST_ON:
        return None
    from . import selftest  # imported here: it uses this module's registry

    if not selftest.enabled():
        return None
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    known = selftest.known(name, op, tensor.device, dtype)
    error = selftest.verify(name, op, impl, tensor.device, dtype)
    if error is not None and not known:
        warnings.warn(f"sparse_sam: the {name} backend failed its self-test for {op} on {tensor.device} "
                      f"({dtype}): {error}. {op} on {tensor.device} ({dtype}) falls back to the next backend; "
                      "please report this.", SelfTestWarning, stacklevel=4)
    return error


def verified(name: str, op: str, impl, tensor: torch.Tensor) -> bool:
    """Whether backend ``name``'s ``op`` (e.g. ``"fused_sam_conv2d"``) passed its first-use self-test on
    ``tensor``'s device and dtype (always true where it is not verified). Warns once on a failure."""
    return _selftest_failure(name, op, impl, tensor) is None


def resolve(op: str, tensor: torch.Tensor, backend: str | None = None) -> tuple[str, object]:
    """Pick the backend that runs ``op`` on tensors like ``tensor`` (its device and dtype).

    Returns ``(name, impl)``. Raises :class:`BackendUnavailable` if ``backend`` (or
    ``SPARSE_SAM_BACKEND``) forces one that cannot run it, or that failed its self-test.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; ops are {tuple(OPS)}")
    device_type = tensor.device.type
    forced = _forced(backend)
    if forced is not None:
        why = _why_not(forced, op, device_type)
        if why is None:
            error = _selftest_failure(forced, op, _load(forced).impl, tensor)
            why = None if error is None else f"it failed its self-test on {tensor.device} ({tensor.dtype}): {error}"
        if why:
            raise BackendUnavailable(f"backend {forced!r} was forced for {op} but cannot run: {why}. "
                                     "Pass backend=None (or unset SPARSE_SAM_BACKEND) to choose automatically.")
        return forced, _load(forced).impl
    skipped = []
    for name in _AUTO_ORDER.get(device_type, ("torch",)):
        why = _why_not(name, op, device_type)
        if why is None:
            error = _selftest_failure(name, op, _load(name).impl, tensor)
            if error is not None:
                skipped.append(f"{name}: failed its self-test: {error}")
                continue
            if skipped and (op, device_type) not in _logged and not torch.compiler.is_compiling():
                _logged.add((op, device_type))
                log.info("sparse_sam: %s on %s uses %s (%s)", op, device_type, name, "; ".join(skipped))
            return name, _load(name).impl
        skipped.append(f"{name}: {why}")
    raise AssertionError("the torch backend always resolves")


def get(name: str):
    """The implementation object of backend ``name``, or raise :class:`BackendUnavailable`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    probe = _load(name)
    if probe.impl is None:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {probe.reason}")
    return probe.impl


def available(name: str, device_type: str = "cpu", op: str = "topk_mask") -> tuple[bool, str]:
    """``(ok, reason)`` for running ``op`` with backend ``name`` on ``device_type`` tensors."""
    why = _why_not(name, op, device_type)
    return why is None, why or _load(name).reason


def explain(device_types=("cpu", "cuda")) -> list[dict]:
    """For each device type and op: the backend chosen automatically and why each one ahead was skipped."""
    rows = []
    forced = os.environ.get("SPARSE_SAM_BACKEND") or None
    for dt in device_types:
        for op in OPS:
            skipped, chosen = [], None
            for name in ((forced,) if forced else _AUTO_ORDER[dt]):
                why = _why_not(name, op, dt)
                if why is None:
                    chosen = name
                    break
                skipped.append(f"{name}: {why}")
            rows.append({"device": dt, "op": op, "backend": chosen or "(none)",
                         "why": "; ".join(skipped) or ("forced" if forced else "first choice")})
    return rows
