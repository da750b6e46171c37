"""Instructions per call of the ``cpp`` backend's CPU ops beside their plain-PyTorch baselines, counted by
valgrind's callgrind: a figure that does not move with the load of a shared machine, unlike times.

Cases, on the data of ``cpp_targets.py`` (same sizes, same seed), one thread:

* ``topk_mask``: 10 M fp32 scores in 12 uneven layers, k = 1 % of each, against ``baselines.topk_loop``
  (``torch.topk(sorted=False)`` into preallocated outputs + ``index_fill_`` per layer);
* ``swap_``: 100 k sorted entries into a 10 M weight, against ``baselines.swap_loop``.

Each case runs in its own process under callgrind, after the same setup and one warm-up call; a process
that only does the setup and warm-up is the zero point, so ``(count − zero) / calls`` is the count of one
call. The zero point itself moves by a few million instructions from process to process, so each case
makes enough calls for that to be a small share (see ``CALLS``). Instruction counts are not times: a
memory-bound op can run far slower than its count suggests. They are for comparing code (before and after a change, or with the baseline), on any machine of the
same instruction set. torch picks SIMD kernels at run time, so the baseline's count depends on the CPU's
vector extensions.

Usage: ``python benchmarks/instructions.py [--reps 3] [--out FILE]`` (needs ``valgrind``; several minutes:
importing torch under callgrind alone takes about a minute and a half on a 2-core machine).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CASES = ("topk_mask cpp", "topk_mask loop", "swap_ cpp", "swap_ loop")
# Calls counted per case, per unit of --reps. Two processes' counts differ by a few million
# instructions (the zero point moves that much), so a case must run far more than that: a swap_ call
# is about a million instructions, a topk_mask call tens of millions.
CALLS = {"topk_mask cpp": 1, "topk_mask loop": 1, "swap_ cpp": 40, "swap_ loop": 40}


def child(case: str, reps: int) -> None:
    """Setup, one warm-up call of ``case`` (of every case for the zero point), then ``reps`` calls."""
    import torch

    import cpp_targets
    from baselines import swap_loop, topk_loop
    from sparse_sam import backends

    cpp_targets.torch = torch  # it imports torch in its main(), after its environment options

    torch.set_num_threads(1)
    cpp = backends.get("cpp")
    g = torch.Generator().manual_seed(0)
    n = 10_000_000
    sizes = cpp_targets.layer_sizes(n, 12, g)
    scores = [torch.randn(s, generator=g) for s in sizes]
    ks = [round(0.01 * s) for s in sizes]
    weight = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[:100_000].sort().values
    vals = torch.randn(100_000, generator=g)
    fns = {"topk_mask cpp": lambda: cpp.topk_mask(scores, ks, None), "topk_mask loop": topk_loop(scores, ks),
           "swap_ cpp": lambda: cpp.swap_([weight], [idx], [vals]), "swap_ loop": swap_loop([weight], [idx], [vals])}
    for fn in fns.values():  # the same warm-up in every process, so the zero point cancels it
        fn()
    for _ in range(reps):
        fns[case]()


def count(case: str, reps: int) -> int:
    """Instructions callgrind collected for one child process."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
           os.path.abspath(__file__), "--child", case, "--reps", str(reps)]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"callgrind run for {case!r} failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3,
                    help="calls counted: this many of topk_mask, 40 times as many of swap_ (default 3)")
    ap.add_argument("--out", default=None, help="append the table to this file")
    ap.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.reps)
        return
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed; it is what counts the instructions")
    import torch

    torch.set_num_threads(1)  # as in the counted processes, which the header reports

    from common import emit, header

    jobs = [(CASES[0], 0)] + [(c, args.reps * CALLS[c]) for c in CASES]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        counts = list(pool.map(lambda job: count(*job), jobs))
    zero = counts[0]
    per = {c: (n - zero) / (args.reps * CALLS[c]) for c, n in zip(CASES, counts[1:])}
    lines = header("instructions (callgrind)", f"python benchmarks/instructions.py --reps {args.reps}") + [
        f"zero point (setup and warm-up): {zero:,} instructions; calls counted: "
        + ", ".join(f"{c} {args.reps * CALLS[c]}" for c in CASES), "",
        "| case | instructions per call | baseline / cpp |", "|---|---|---|"]
    for op in ("topk_mask", "swap_"):
        c, b = per[f"{op} cpp"], per[f"{op} loop"]
        lines += [f"| {op} cpp | {c:,.0f} | {b / c:.1f}× |", f"| {op} plain-PyTorch loop | {b:,.0f} | |"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
