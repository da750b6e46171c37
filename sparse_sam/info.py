"""``python -m sparse_sam.info``: versions, devices, and which backend each op resolves to, and why.

``python -m sparse_sam.info --selftest`` also checks every available backend's ops against the reference
on every present device (:func:`sparse_sam.selftest.run_all`), prints one PASS/FAIL row per backend, op
and device, and exits with status 1 if any row fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch

from . import __version__, backends


def report() -> str:
    """The info text: versions, devices, backend availability and per-op resolution."""
    lines = [f"sparse_sam {__version__}", f"python     {platform.python_version()} ({sys.platform})",
             f"torch      {torch.__version__}"]
    try:
        import triton
        lines.append(f"triton     {triton.__version__}")
    except ImportError:
        lines.append("triton     not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"cuda       {torch.version.cuda or 'none'}; "
                 + (f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}" if cuda
                    else "no CUDA device"))
    for var in ("SPARSE_SAM_BACKEND", "SPARSE_SAM_BUILD_EXT", "SPARSE_SAM_CPU_CACHE_MB", "SPARSE_SAM_SELFTEST",
                "SPARSE_SAM_FUSED_CONV", "TRITON_INTERPRET"):
        if os.environ.get(var) is not None:
            lines.append(f"env        {var}={os.environ[var]}")
    lines.append("")
    lines.append("backends:")
    for name in backends.BACKENDS:
        probe = backends._load(name)
        lines.append(f"  {name:<7} {'available  ' if probe.impl is not None else 'unavailable'}  {probe.reason}")
    if hasattr(torch.ops.sparse_sam, "cpu_cache_stats"):  # loaded with the compiled extension
        cached, limit, hits, misses = torch.ops.sparse_sam.cpu_cache_stats()
        lines.append(f"  cpp output cache: limit {limit / 2**20:.0f} MiB (SPARSE_SAM_CPU_CACHE_MB), "
                     f"{cached / 2**20:.1f} MiB held, {hits} hits, {misses} misses")
    lines.append("")
    lines.append("resolution (automatic unless SPARSE_SAM_BACKEND is set):")
    for row in backends.explain():
        lines.append(f"  {row['device']:<5} {row['op']:<21} -> {row['backend']:<7} {row['why']}")
    return "\n".join(lines)


def selftest_table(results) -> str:
    """The ``--selftest`` table: one row per backend, op and device."""
    lines = [f"{'backend':<8} {'op':<20} {'device':<7} {'result':<6} detail"]
    for r in results:
        lines.append(f"{r.backend:<8} {r.op:<20} {r.device:<7} {'PASS' if r.ok else 'FAIL':<6} {r.detail}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m sparse_sam.info", description=__doc__.splitlines()[0])
    parser.add_argument("--selftest", action="store_true",
                        help="check every available backend's ops against the reference on every present "
                             "device; exit status 1 on any FAIL")
    args = parser.parse_args(argv)
    print(report())
    if not args.selftest:
        return 0
    from . import selftest

    results = selftest.run_all()
    print()
    print("self-test (bitwise for topk_mask, sam_weight, swap_; convolutions within selftest.conv_tolerance; "
          "dtypes " + (results[0].dtypes if results else "-") + "):")
    print(selftest_table(results))
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
