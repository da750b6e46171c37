"""``python -m sparse_sam.info``: versions, devices, and which backend each op resolves to, and why."""
from __future__ import annotations

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
    for var in ("SPARSE_SAM_BACKEND", "SPARSE_SAM_BUILD_EXT", "SPARSE_SAM_CPU_CACHE_MB", "TRITON_INTERPRET"):
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


if __name__ == "__main__":
    print(report())
