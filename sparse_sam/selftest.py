"""Self-verification of backends: a tiny fresh random case of an op, checked against the reference.

Used in two places:

* **On first use** (:func:`sparse_sam.backends.resolve`): the first time a backend listed in
  ``backends.SELFTEST_ON`` (by default ``triton`` and ``cuda`` on CUDA devices) serves an op for a
  given device and dtype, :func:`verify` runs that op's check once; on a mismatch or an exception the
  op falls back to the next backend for that device and dtype, with one warning naming the op, the
  backend, the device and the error. ``SPARSE_SAM_SELFTEST=0`` turns this off.
* **On demand**: ``python -m sparse_sam.info --selftest`` runs :func:`run_all`, every available
  backend's checks on every present device, and prints one PASS/FAIL row per backend, op and device.

What is compared:

* ``topk_mask``, ``sam_weight`` (forward, backward in both ``delta_grad`` modes) and ``swap_``:
  raw bits (integer views), with ties, ``-0.0``, NaN and infinity in the inputs where the op admits them.
* convolutions: ``|out - ref| <= tol[dtype] · (|x| ⋆ |W_eff| + |b|)`` elementwise, where ``ref`` is the
  float64 convolution of the same inputs with the reference ``W_eff`` and ``⋆`` the same convolution
  (see :func:`conv_tolerance`; the bound scales with the magnitudes that are summed, so it holds for
  any reduction order).

Each case is drawn from a fresh seed (reported in the error message, so a failure can be replayed with
:func:`check`), on the CPU and then moved to the device; shapes are odd and small, a few thousand
elements at most, so a check costs a handful of kernel launches.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

__all__ = ["SelfTestMismatch", "CHECKS", "check", "verify", "known", "enabled", "conv_tolerance", "conv_error",
           "run_all", "clear", "Result"]


class SelfTestMismatch(AssertionError):
    """A backend's result differs from the reference on a self-test case."""


def enabled() -> bool:
    """Whether verification on first use is on (``SPARSE_SAM_SELFTEST``, default ``1``)."""
    value = os.environ.get("SPARSE_SAM_SELFTEST", "1")
    if value not in ("0", "1"):
        raise ValueError(f"SPARSE_SAM_SELFTEST must be 0 or 1, got {value!r}")
    return value == "1"


# --------------------------------------------------------------------------------------- helpers
def _delta_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(shape, dtype: torch.dtype, device: torch.device, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)


def _same_bits(what: str, got: Tensor, want: Tensor) -> None:
    if got.shape != want.shape or got.dtype != want.dtype:
        raise SelfTestMismatch(f"{what}: got {got.dtype} {tuple(got.shape)}, "
                               f"expected {want.dtype} {tuple(want.shape)}")
    a, b = got.detach().contiguous(), want.detach().contiguous().to(got.device)
    if a.dtype != torch.bool:
        a, b = reference.bits_view(a), reference.bits_view(b)
    bad = int((a != b).sum())
    if bad:
        raise SelfTestMismatch(f"{what}: {bad} of {a.numel()} elements differ from the reference (raw bits)")


def _with_specials(w: Tensor, where: Tensor) -> Tensor:
    """``w`` with -0.0, +inf, -inf and NaN written at the first positions where ``where`` is true."""
    flat, pos = w.clone().reshape(-1), where.reshape(-1).nonzero().reshape(-1)[:4]
    for p, value in zip(pos.tolist(), (-0.0, float("inf"), float("-inf"), float("nan"))):
        flat[p] = value
    return flat.view(w.shape)


# ------------------------------------------------------------------------------------------ checks
def check_topk_mask(impl, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> None:
    """Three layers: one spanning two 4096-score blocks with many ties and signed zeros, two odd ones."""
    many_ties = torch.randint(-6, 7, (5003,), generator=g).float() / 4
    many_ties[torch.rand(5003, generator=g) < 0.1] = -0.0
    scores = [many_ties.to(dtype), torch.randn(7, 5, generator=g).to(dtype), torch.randn(3, generator=g).to(dtype)]
    n_pos = int((scores[0] > 0).sum())
    ks = [n_pos + 1 + int(torch.randint(0, 40, (1,), generator=g)),  # cut inside a run of equal scores
          int(torch.randint(1, 35, (1,), generator=g)), 3]
    want = reference.topk_mask_ref(scores, ks)
    got = impl.topk_mask([s.to(device) for s in scores], ks, None)
    for i, (a, b) in enumerate(zip(got, want)):
        _same_bits(f"topk_mask layer #{i}", a, b)


def check_sam_weight(impl, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> None:
    """Forward bits, with specials where the mask is off; backward bits in both modes."""
    shape, dd = (37, 11), _delta_dtype(dtype)
    mask = torch.rand(shape, generator=g) < 0.3
    w = _with_specials(_randn(shape, dtype, torch.device("cpu"), g), ~mask)
    v, grad = _randn(shape, dd, torch.device("cpu"), g), _randn(shape, dtype, torch.device("cpu"), g)
    on = lambda t: t.to(device)  # noqa: E731
    _same_bits("sam_weight forward", impl.sam_weight_forward(on(w), on(mask), on(v)),
               reference.sam_weight_forward_ref(w, mask, v))
    for mode in reference.DELTA_GRAD_MODES:
        got = impl.sam_weight_backward(on(grad), on(mask), on(v), dd, mode)
        want = reference.sam_weight_backward_ref(grad, mask, v, dd, mode)
        _same_bits(f"sam_weight backward grad_delta ({mode})", got[0], want[0])
        _same_bits(f"sam_weight backward grad_scores ({mode})", got[1], want[1])


def check_swap(impl, device: torch.device, dtype: torch.dtype, g: torch.Generator) -> None:
    """Two layers (int64 and int32 indices), specials in both weights and values; both sides compared."""
    shapes, ks = [(37, 11), (53,)], [29, 7]
    ws, idx, vals = [], [], []
    for shape, k, idt in zip(shapes, ks, (torch.int64, torch.int32)):
        n = torch.Size(shape).numel()
        ws.append(_with_specials(_randn(shape, dtype, torch.device("cpu"), g), torch.rand(shape, generator=g) < 0.2))
        idx.append(torch.randperm(n, generator=g)[:k].sort().values.to(idt))
        vals.append(_with_specials(_randn((k,), dtype, torch.device("cpu"), g), torch.ones(k, dtype=torch.bool)))
    got_w, got_v = [w.to(device, copy=True) for w in ws], [v.to(device, copy=True) for v in vals]
    impl.swap_(got_w, [i.to(device) for i in idx], got_v)
    reference.swap_bits_unchecked_(ws, idx, vals)
    for l in range(len(ws)):
        _same_bits(f"swap_ layer #{l} weight", got_w[l], ws[l])
        _same_bits(f"swap_ layer #{l} values", got_v[l], vals[l])


# Per dtype of the convolution's operands; see conv_tolerance.
_CONV_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
_TF32_TOL = 2e-3


def conv_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Relative tolerance of a convolution against the float64 result, per unit of ``|x| ⋆ |W| + |b|``.

    float64 ``1e-12``; float32 ``1e-5`` (float32 accumulation over a small reduction); float32 where
    the device may use tf32 (CUDA with ``torch.backends.cudnn.allow_tf32``), float16 and bfloat16: two
    units in the last place of that format (``2e-3``, ``2e-3``, ``1.6e-2``). PyTorch's own CPU
    convolution stays within half of that on the self-test shapes (bfloat16: 7e-3, float16: 9e-4 of the
    bound); the fused Triton conv is held to the same bound.
    """
    return _TF32_TOL if tf32 and dtype == torch.float32 else _CONV_TOL[dtype]


def _conv_fn(nd: int, transposed: bool) -> Callable:
    return getattr(F, f"conv_transpose{nd}d" if transposed else f"conv{nd}d")


def _check_conv(impl, device, dtype, g, nd: int, transposed: bool, fused: bool) -> None:
    """One convolution with odd sizes, stride 2, padding 1, dilation 1 and a bias."""
    cin, cout = 3, 5
    spatial = (9, 7, 6)[:nd]
    wshape = (cin, cout) + (3, 2, 3)[:nd] if transposed else (cout, cin) + (3, 2, 3)[:nd]
    cpu = torch.device("cpu")
    x, b = _randn((2, cin) + spatial, dtype, cpu, g), _randn((cout,), dtype, cpu, g)
    w, v = _randn(wshape, dtype, cpu, g), _randn(wshape, _delta_dtype(dtype), cpu, g)
    mask = torch.rand(wshape, generator=g) < 0.4
    args = (2, 1, 1, 1, 1) if transposed else (2, 1, 1, 1)  # stride, padding, (output_padding,) dilation / groups
    on = lambda t: t.to(device)  # noqa: E731
    if fused:
        fn = getattr(impl, f"sam_conv_transpose{nd}d_forward" if transposed else f"sam_conv{nd}d_forward")
        out = fn(on(x), on(w), on(mask), on(v), on(b), *args, fused=True)
        if out is None:
            raise SelfTestMismatch("the fused forward declined the self-test shape")
    else:
        w_eff = impl.sam_weight_forward(on(w), on(mask), on(v))
        _same_bits("W_eff", w_eff, reference.sam_weight_forward_ref(w, mask, v))
        out = _conv_fn(nd, transposed)(on(x), w_eff, on(b), *args)
    error = conv_error(out, x, reference.sam_weight_forward_ref(w, mask, v), b, _conv_fn(nd, transposed), args,
                       tf32=device.type == "cuda" and torch.backends.cudnn.allow_tf32)
    if error:
        raise SelfTestMismatch(error)


def conv_error(out: Tensor, x: Tensor, w_eff: Tensor, bias: Tensor | None, conv: Callable, args,
               tf32: bool = False) -> str | None:
    """Whether ``out`` is ``conv(x, w_eff, bias, *args)`` within :func:`conv_tolerance` of ``x.dtype``:
    ``None`` if so, else a message naming the worst element. The reference and the bound
    ``conv(|x|, |w_eff|, |bias|)`` are computed in float64 on the CPU."""
    x64, w64 = x.detach().cpu().double(), w_eff.detach().cpu().double()
    b64 = None if bias is None else bias.detach().cpu().double()
    ref = conv(x64, w64, b64, *args)
    bound = conv(x64.abs(), w64.abs(), None if b64 is None else b64.abs(), *args)
    if out.shape != ref.shape or out.dtype != x.dtype:
        return f"conv output is {out.dtype} {tuple(out.shape)}, expected {x.dtype} {tuple(ref.shape)}"
    tol = conv_tolerance(x.dtype, tf32)
    err = (out.detach().cpu().double() - ref).abs()
    excess = torch.nan_to_num(err - tol * bound, nan=float("inf"))
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        return (f"conv output element {i}: error {err.reshape(-1)[i]:.3g} exceeds {tol:g} x "
                f"{bound.reshape(-1)[i]:.3g} (tolerance x (|x| conv |W_eff| + |b|))")
    return None


def _conv_check(nd: int, transposed: bool, fused: bool):
    def run(impl, device, dtype, g):
        _check_conv(impl, device, dtype, g, nd, transposed, fused)
    return run


# op -> check(impl, device, dtype, generator). Ops that materialise W_eff run the conv on PyTorch's
# convolution, so their first-use check is the sam_weight one; the fused forwards have their own keys.
CHECKS: dict[str, Callable] = {
    "topk_mask": check_topk_mask,
    "sam_weight": check_sam_weight,
    "swap_": check_swap,
    **{f"sam_conv{nd}d": _conv_check(nd, False, False) for nd in (1, 2, 3)},
    **{f"sam_conv_transpose{nd}d": _conv_check(nd, True, False) for nd in (1, 2, 3)},
    "fused_sam_conv2d": _conv_check(2, False, True),
    "fused_sam_conv_transpose2d": _conv_check(2, True, True),
}
# The op whose verdict stands for another op's at first use (same kernels underneath).
SAME_AS = {"sam_linear": "sam_weight", **{f"sam_conv{nd}d": "sam_weight" for nd in (1, 2, 3)},
           **{f"sam_conv_transpose{nd}d": "sam_weight" for nd in (1, 2, 3)}}


def check(op: str, impl, device: torch.device | str, dtype: torch.dtype, seed: int | None = None) -> None:
    """Run ``op``'s check for backend ``impl`` on ``device`` and ``dtype``; raise on any difference.

    ``seed`` replays a case (the error message of a failure gives it); ``None`` draws a fresh one.
    Raises :class:`SelfTestMismatch` on a wrong result, or whatever the backend raised.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    try:
        CHECKS[op](impl, torch.device(device), dtype, g)
    except SelfTestMismatch as e:
        raise SelfTestMismatch(f"{e} (seed {seed})") from None


# ---------------------------------------------------------------------------- verdicts at first use
_verdicts: dict[tuple, str | None] = {}  # (backend, op, device, dtype) -> None (passed) or the error
_lock = threading.RLock()


def _key(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> tuple:
    return backend, SAME_AS.get(op, op), str(device), dtype


def known(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`verify` already has a verdict for these arguments (it would not run a check)."""
    return _key(backend, op, device, dtype) in _verdicts


def verify(backend: str, op: str, impl, device: torch.device, dtype: torch.dtype) -> str | None:
    """Run ``op``'s check once per process for ``(backend, device, dtype)``; ``None`` if it passed,
    else the error text. Later calls return the remembered verdict. Inside ``torch.compile`` tracing
    or CUDA graph capture no check runs: a known verdict is returned, an unknown one counts as passed
    (the usual warm-up call before capturing runs the check)."""
    key = _key(backend, op, device, dtype)
    op = key[1]
    verdict = _verdicts.get(key, ...)
    if verdict is not ...:
        return verdict
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return None  # a check cannot run while tracing or capturing a CUDA graph; a warm-up call runs it
    with _lock:
        if key in _verdicts:
            return _verdicts[key]
        try:
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                check(op, impl, device, dtype)
            verdict = None
        except Exception as e:  # a wrong result, or the kernel itself failing
            verdict = f"{type(e).__name__}: {e}"
        _verdicts[key] = verdict
        return verdict


def clear() -> None:
    """Forget every verdict (the next use of each op checks again)."""
    with _lock:
        _verdicts.clear()


# ----------------------------------------------------------------------------------- on demand
@dataclass
class Result:
    backend: str
    op: str
    device: str
    dtypes: str
    ok: bool
    detail: str  # the error, or the time taken


# Rows of ``info --selftest``: (row name, checks it runs, whether the backend must provide them).
_ROWS = (("topk_mask", ("topk_mask",)), ("sam_weight fwd/bwd", ("sam_weight",)), ("swap_", ("swap_",)),
         ("conv 1d/2d/3d (+T)", tuple(f"sam_conv{t}{nd}d" for t in ("", "_transpose") for nd in (1, 2, 3))),
         ("fused conv2d (+T)", ("fused_sam_conv2d", "fused_sam_conv_transpose2d")))
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def _provides(impl, op: str) -> bool:
    if op.startswith("fused_"):
        return hasattr(impl, op[len("fused_"):] + "_forward")
    from . import backends
    return all(hasattr(impl, f) for f in backends.OPS[op])


def run_all(dtypes=None) -> list[Result]:
    """Every check of every available backend on every present device, each dtype (default
    :data:`DTYPES`) a fresh case.

    One :class:`Result` per backend, row and device where the backend can run; a row fails when any of
    its checks fails in any dtype (the detail names the first failure).
    """
    from . import backends

    dtypes = DTYPES if dtypes is None else tuple(dtypes)
    results = []
    for device in _devices():
        for name in backends.BACKENDS:
            ok, _ = backends.available(name, device.type, "topk_mask")
            if not ok:
                continue
            impl = backends.get(name)
            for row, ops in _ROWS:
                ops = [op for op in ops if _provides(impl, op)]
                if not ops:
                    continue
                t0, failure = time.perf_counter(), None
                for op in ops:
                    for dtype in dtypes:
                        try:
                            check(op, impl, device, dtype)
                        except Exception as e:
                            failure = failure or f"{op} {str(dtype).replace('torch.', '')}: {type(e).__name__}: {e}"
                ms = (time.perf_counter() - t0) * 1e3
                results.append(Result(name, row, str(device), ",".join(str(d).replace("torch.", "") for d in dtypes),
                                      failure is None, failure or f"{ms:.1f} ms"))
    return results
