"""Loader of the compiled extension and the ``cpp`` / ``cuda`` backends built on it.

The ops live in C++ (``csrc/``) and are registered with the PyTorch dispatcher as
``torch.ops.sparse_sam.{topk_mask, sam_weight_forward, sam_weight_backward, swap_}``; the dispatcher
picks the CPU or CUDA kernel from the tensors' device. Fake kernels registered here give the output
shapes to ``torch.compile``.

Loading order:

1. ``SPARSE_SAM_BUILD_EXT=0`` disables the extension (the library then runs on the ``torch`` backend).
2. The ahead-of-time build ``sparse_sam._C`` (``pip install --no-build-isolation -e .``).
3. Otherwise a JIT build of the ``csrc/`` sources next to the package with ninja, cached in
   ``$SPARSE_SAM_EXT_DIR`` (default ``~/.cache/sparse_sam/``); it is rebuilt only when a source file or
   the compiler flags change. The first build takes a minute or two.

The CUDA ``topk_mask`` and ``swap_`` do not synchronise: they report NaN scores and invalid swap
indices in a per-device error word that :func:`_check_cuda_errors` turns into the protocol's
``ValueError`` (design note 20, docs/design-notes.md).

A load or build failure is logged once; :func:`backend` then raises
:class:`~sparse_sam.backends.BackendUnavailable` with the reason, which ``python -m sparse_sam.info``
shows.
"""
from __future__ import annotations

import glob
import importlib
import logging
import os
import re
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .backends import BackendUnavailable

__all__ = ["backend", "origin", "load"]

log = logging.getLogger("sparse_sam")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CSRC = os.path.join(_ROOT, "csrc")
_lock = threading.Lock()
_state: dict = {}  # "origin": str, or "error": str, once load() has run


def _sources() -> tuple[list[str], list[str]]:
    cpp = sorted(glob.glob(os.path.join(_CSRC, "cpu", "*.cpp"))) + [os.path.join(_CSRC, "bindings.cpp")]
    cu = sorted(glob.glob(os.path.join(_CSRC, "cuda", "*.cu")))
    return cpp, cu


def _jit_build() -> str:
    from torch.utils import cpp_extension

    cpp, cu = _sources()
    if not all(os.path.exists(p) for p in cpp):
        raise RuntimeError(f"no C++ sources to build from next to the package (looked in {_CSRC})")
    with_cuda = bool(cu) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    tag = f"torch{torch.__version__.replace('+', '_')}-{'cuda' if with_cuda else 'cpu'}"
    build_dir = os.path.join(os.environ.get("SPARSE_SAM_EXT_DIR")
                             or os.path.join(os.path.expanduser("~"), ".cache", "sparse_sam"), tag)
    os.makedirs(build_dir, exist_ok=True)
    defines = ["-DSPARSE_SAM_WITH_CUDA"] if with_cuda else []
    # is_python_module=False: the shared library is loaded for its op registrations only.
    cpp_extension.load(
        name="sparse_sam_C", sources=cpp + (cu if with_cuda else []), build_directory=build_dir,
        extra_cflags=["-O3", "-fopenmp", *defines], extra_ldflags=["-fopenmp"],
        extra_cuda_cflags=["-O3", *defines], with_cuda=with_cuda, is_python_module=False, verbose=False)
    return f"JIT-built at {build_dir}" + (" with CUDA" if with_cuda else "")


def _register_fakes() -> None:
    # Output metadata only: what torch.compile needs to trace through the ops without running them.
    @torch.library.register_fake("sparse_sam::topk_mask")
    def _topk_mask_fake(scores, ks):
        return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]

    @torch.library.register_fake("sparse_sam::sam_weight_forward")
    def _sam_weight_forward_fake(weight, mask, delta):
        return weight.new_empty(weight.shape)

    @torch.library.register_fake("sparse_sam::sam_weight_backward")
    def _sam_weight_backward_fake(grad, mask, delta, scores_dtype, dense):
        return delta.new_empty(delta.shape), delta.new_empty(delta.shape, dtype=scores_dtype)

    @torch.library.register_fake("sparse_sam::swap_")
    def _swap_fake(weights, indices, values):
        return None


def load() -> str:
    """Load (or build) the extension once; return its origin or raise ``RuntimeError`` with the reason."""
    with _lock:
        if not _state:
            try:
                if os.environ.get("SPARSE_SAM_BUILD_EXT", "1") == "0":
                    raise RuntimeError("compiled extension disabled by SPARSE_SAM_BUILD_EXT=0")
                try:
                    importlib.import_module("sparse_sam._C")
                    origin = "prebuilt"
                except ImportError:
                    origin = _jit_build()
                _register_fakes()
                _state["origin"] = origin
            except Exception as e:  # a compiler error, a missing toolchain, an ABI mismatch...
                _state["error"] = f"{type(e).__name__}: {e}"
                log.warning("sparse_sam: compiled extension unavailable, using the torch backend (%s)",
                            _state["error"])
        if "error" in _state:
            raise RuntimeError(_state["error"])
        return _state["origin"]


def origin() -> str:
    """``"prebuilt"`` or ``"JIT-built at <dir>"``; raises ``RuntimeError`` if the extension cannot load."""
    return load()


_NAN_LAYER = re.compile(r"layer #(\d+)")
_ERR_NAN, _ERR_SWAP = 1, 2  # bits of the CUDA error word (csrc/cuda/common.cuh)


def _check_cuda_errors(device: torch.device, names: Sequence[str] | None, wait: bool) -> None:
    """Raise ``ValueError`` for what the CUDA kernels reported in ``device``'s error word, and clear it.

    The CUDA ``topk_mask`` and ``swap_`` never synchronise: NaN scores and invalid swap indices are set
    in a per-device word in host-mapped memory. ``wait=True`` first waits for the current stream (one
    synchronisation, as the Triton top-k's NaN check); ``wait=False`` reads what has landed so far, so a
    report may surface at a later call. Nothing is read while the stream is being captured.
    """
    if torch.cuda.is_current_stream_capturing():
        return
    if wait:
        torch.cuda.current_stream(device).synchronize()
    code, layer, flags = torch.ops.sparse_sam.cuda_take_error(device.index if device.index is not None else 0)
    if not code:
        return
    name = (f"'{names[layer]}'" if names is not None and 0 <= layer < len(names) else f"#{layer}")
    problems = []
    if code & _ERR_NAN:
        problems.append(f"topk_mask: scores of layer {name} contain NaN")
    if code & _ERR_SWAP:
        what = " and ".join(w for bit, w in ((1, "fall outside the weight"), (2, "are not strictly increasing "
                                              "(unsorted or duplicate)")) if flags & bit)
        problems.append(f"swap_: indices of layer {name} {what}; nothing was written")
    raise ValueError(f"{'; '.join(problems)} (reported by the CUDA kernels on {device})")


class _ExtBackend:
    """The backend protocol of :mod:`sparse_sam.backends` on top of ``torch.ops.sparse_sam``."""

    def __init__(self, name: str):
        self.__name__ = f"sparse_sam._ext.{name}"

    def __repr__(self) -> str:
        return f"<backend {self.__name__}>"

    @staticmethod
    def topk_mask(scores: Sequence[Tensor], ks: Sequence[int], names: Sequence[str] | None = None,
                  check_nan: bool = True) -> list[Tensor]:
        try:
            masks = list(torch.ops.sparse_sam.topk_mask([s.detach() for s in scores], [int(k) for k in ks]))
            if check_nan and scores and scores[0].is_cuda:  # the CUDA kernels report NaN on the device
                _check_cuda_errors(scores[0].device, names, wait=True)
            return masks
        except ValueError as e:
            match = _NAN_LAYER.search(str(e))
            if names is None or match is None:
                raise
            i = int(match.group(1))
            raise ValueError(str(e).replace(match.group(0), f"layer '{names[i]}'", 1)) from None

    @staticmethod
    def sam_weight_forward(weight: Tensor, mask: Tensor, delta: Tensor) -> Tensor:
        return torch.ops.sparse_sam.sam_weight_forward(weight, mask, delta)

    @staticmethod
    def sam_weight_backward(grad: Tensor, mask: Tensor, delta: Tensor, scores_dtype: torch.dtype,
                            delta_grad: str = "masked") -> tuple[Tensor, Tensor]:
        if delta_grad not in ("masked", "dense"):
            raise ValueError(f"delta_grad must be 'masked' or 'dense', got {delta_grad!r}")
        return tuple(torch.ops.sparse_sam.sam_weight_backward(grad, mask, delta, scores_dtype,
                                                              delta_grad == "dense"))

    @staticmethod
    def swap_(weights: Sequence[Tensor], indices: Sequence[Tensor], values: Sequence[Tensor]) -> None:
        with torch.no_grad():  # weights may be leaves that require grad
            torch.ops.sparse_sam.swap_([w.detach() for w in weights], list(indices), [v.detach() for v in values])
        if weights and weights[0].is_cuda:  # without waiting: see _check_cuda_errors
            _check_cuda_errors(weights[0].device, None, wait=False)


def backend(name: str) -> _ExtBackend:
    """The ``cpp`` (CPU) or ``cuda`` backend; raises :class:`BackendUnavailable` with the reason."""
    if name not in ("cpp", "cuda"):
        raise ValueError(f"the compiled extension provides the 'cpp' and 'cuda' backends, not {name!r}")
    try:
        load()
    except RuntimeError as e:
        raise BackendUnavailable(str(e)) from None
    if name == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("sparse_sam::topk_mask", "CUDA"):
        raise BackendUnavailable("the compiled extension was built without CUDA kernels (no CUDA toolkit or "
                                 "no GPU at build time)")
    return _ExtBackend(name)
