"""Benchmark harness. ``pytest benchmarks/ --benchmark-only`` times every op on every backend that can
run here, beside the plain-PyTorch way of doing the same thing, so speed-ups are ratios from one run.

``SPARSE_SAM_BENCH_SMALL=1`` shrinks every size (CI runs the files that way with
``--benchmark-disable``, so they cannot rot). Achieved bandwidth and the memory-bound floor go into
``benchmark.extra_info``.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from sparse_sam import backends

SMALL = os.environ.get("SPARSE_SAM_BENCH_SMALL") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def size(full: int, small: int) -> int:
    return small if SMALL else full


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def providers(op: str, baseline: str = "pytorch") -> list:
    """The plain-PyTorch baseline plus every backend; unavailable ones skip with the reason."""
    out = [pytest.param(baseline, id=baseline)]
    for name in backends.BACKENDS:
        if name == "cuda" and DEVICE != "cuda":
            continue
        ok, why = backends.available(name, DEVICE, op)
        if name == "triton" and DEVICE == "cpu":
            ok, why = False, "the Triton interpreter is for correctness, not timing"
        out.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}")))
    return out


def run(benchmark, fn, nbytes: int | None = None, **extra):
    """Time ``fn`` (synchronised) and record GB/s against the bytes a memory-bound version must move."""
    def call():
        out = fn()
        sync()
        return out

    result = benchmark(call)
    benchmark.extra_info.update(extra, device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu")
    if nbytes is not None and benchmark.stats is not None:
        secs = benchmark.stats.stats.median
        benchmark.extra_info.update(floor_bytes=nbytes, achieved_GBps=round(nbytes / secs / 1e9, 3))
    return result
