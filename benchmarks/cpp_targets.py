"""Speed targets of the ``cpp`` backend, measured in one run on this machine's CPU.

    python benchmarks/cpp_targets.py [--numel 10000000] [--layers 12] [--gamma 0.01] [--repeat 15]
                                     [--threads N] [--thp] [--out FILE | --save]

Prints, each against a baseline measured in the same run (baselines: ``baselines.py``):

* ``topk_mask`` over all layers vs the per-layer loop ``torch.topk(k, sorted=False)`` into preallocated
  outputs + ``index_fill_`` of a preallocated mask (target >= 10x), and vs the memory floor: two reads
  of the scores plus the mask write at the measured copy bandwidth (target within 3x);
* ``sam_weight`` forward + backward achieved bandwidth vs copy bandwidth (target >= 60%);
* ``swap_`` of 100k entries into a 10M-element weight (target <= 0.2 ms), beside the plain index loop
  and beside a single gather of the same entries (``index_select(out=)``, which reads the same scattered
  cache lines and writes nothing back: the floor of any op on them, whatever the machine).

``--out FILE`` appends the table, headed by the command, the date, the machine (``lscpu`` model) and
the commit, to FILE; ``--save`` appends it to ``benchmarks/results/<cpu-model>/cpp_targets.md``.

Timings are medians of round-robin rounds (each op beside its baseline), yet on a shared machine they
still vary from run to run. Every op returns fresh outputs; large ones come from the extension's cache
of freed blocks (csrc/cpu/alloc.cpp), as they do in a training loop, so the op does not pay first-touch
page faults each call. ``--thp`` sets torch's ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB pages for the inputs
and the torch baselines too). Two copy baselines are printed: into existing memory (the target's
reference) and ``clone()``, which allocates its output from PyTorch's allocator.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


torch = None  # imported in main(), after --thp is applied


def median_times(fns: dict, repeat: int, warmup: int = 2) -> dict:
    """Median seconds per call of each function, timed round-robin so that drift on a shared machine
    (other jobs, frequency changes) falls on every candidate alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def layer_sizes(numel: int, layers: int, g: torch.Generator) -> list[int]:
    """Uneven layer sizes summing to ``numel`` (real models mix small and large layers)."""
    w = torch.rand(layers, generator=g) + 0.25
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    return sizes.tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 (must precede importing torch)")
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--gamma", type=float, default=0.01)
    ap.add_argument("--swap-entries", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=15)
    dest = ap.add_mutually_exclusive_group()
    dest.add_argument("--out", default=None, help="append the results to this file")
    dest.add_argument("--save", action="store_true", help="append to benchmarks/results/<cpu-model>/cpp_targets.md")
    args = ap.parse_args()
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if "torch" in sys.modules and args.thp:
        raise SystemExit("--thp must be set before torch is imported")
    global torch
    import torch

    from sparse_sam import backends, reference
    from baselines import swap_loop, topk_loop
    from common import emit, header, results_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    cpp = backends.get("cpp")
    g = torch.Generator().manual_seed(0)
    n, r = args.numel, args.repeat
    lines = []
    out = lines.append
    out(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numel={n:,}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}")

    src = torch.randn(n, generator=g)
    dst = torch.empty_like(src)

    def copy_bandwidth():
        t = median_times({"copy": lambda: dst.copy_(src), "clone": lambda: src.clone()}, r)
        return 2 * src.nbytes / t["copy"], 2 * src.nbytes / t["clone"]

    # clone() allocates its output from PyTorch's allocator, paying first-touch page faults.
    bw, bw_alloc = copy_bandwidth()
    out(f"copy bandwidth               {bw / 1e9:8.2f} GB/s (into existing memory), "
        f"{bw_alloc / 1e9:.2f} GB/s (clone, fresh memory)")

    sizes = layer_sizes(n, args.layers, g)
    scores = [torch.randn(s, generator=g) for s in sizes]
    ks = [round(args.gamma * s) for s in sizes]
    loop = topk_loop(scores, ks)
    assert all(torch.equal(a, b) for a, b in zip(cpp.topk_mask(scores, ks, None), loop()))
    t = median_times({"cpp": lambda: cpp.topk_mask(scores, ks, None), "loop": loop,
                      "copy": lambda: dst.copy_(src)}, r)
    t_cpp, t_loop = t["cpp"], t["loop"]
    bw = 2 * src.nbytes / t["copy"]  # measured again beside the op, in the same rounds
    floor = (2 * 4 * n + n) / bw
    out(f"topk_mask cpp                {t_cpp * 1e3:8.2f} ms   ({len(sizes)} layers of {min(sizes):,} to "
        f"{max(sizes):,} scores, k = {args.gamma:g} of each)")
    out(f"topk_mask torch.topk loop    {t_loop * 1e3:8.2f} ms   speed-up {t_loop / t_cpp:6.1f}x (target >= 10x)")
    out(f"topk_mask memory floor       {floor * 1e3:8.2f} ms   cpp/floor {t_cpp / floor:6.2f}x (target <= 3x; "
        f"copy {bw / 1e9:.1f} GB/s in the same rounds)")

    w, v, s_grad = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    m = torch.rand(n, generator=g) < args.gamma
    t = median_times({
        "fwd": lambda: cpp.sam_weight_forward(w, m, v),
        "bwd": lambda: cpp.sam_weight_backward(s_grad, m, v, torch.float32, "masked"),
        "ref": lambda: (reference.sam_weight_forward_ref(w, m, v),
                        reference.sam_weight_backward_ref(s_grad, m, v, torch.float32, "masked")),
        "copy": lambda: dst.copy_(src),
    }, r)
    t_fwd, t_bwd, t_ref = t["fwd"], t["bwd"], t["ref"]
    bw = 2 * src.nbytes / t["copy"]  # measured again beside the op, in the same rounds
    # forward: read W, m, v, write W_eff; backward: read g, m, v, write grad_v, grad_s (fp32, bool mask)
    moved = n * (4 + 1 + 4 + 4) + n * (4 + 1 + 4 + 4 + 4)
    ach = moved / (t_fwd + t_bwd)
    out(f"sam_weight fwd / bwd         {t_fwd * 1e3:8.2f} / {t_bwd * 1e3:.2f} ms   {ach / 1e9:.2f} GB/s = "
        f"{100 * ach / bw:.0f}% of copy bandwidth ({bw / 1e9:.1f} GB/s in the same rounds; target >= 60%), "
        f"{100 * ach / bw_alloc:.0f}% of clone; "
        f"{t_ref / (t_fwd + t_bwd):.1f}x the torch reference")

    weight = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[: args.swap_entries].sort().values
    vals = torch.randn(args.swap_entries, generator=g)
    plain_swap = swap_loop([weight], [idx], [vals])
    # The floor of any op on these entries: one plain gather of them (it reads the same scattered cache
    # lines and writes nothing back into the weight), timed in the same rounds.
    gathered = torch.empty_like(vals)
    t = median_times({"cpp": lambda: cpp.swap_([weight], [idx], [vals]), "loop": plain_swap,
                      "gather": lambda: torch.index_select(weight, 0, idx, out=gathered)}, max(r, 50))
    t_swap, t_swap_loop, t_gather = t["cpp"], t["loop"], t["gather"]
    out(f"swap_ {args.swap_entries:,} into {n:,}     {t_swap * 1e3:8.3f} ms   (target <= 0.2 ms); "
        f"index loop {t_swap_loop * 1e3:.3f} ms; one gather index_select(out=) {t_gather * 1e3:.3f} ms, "
        f"swap_/gather {t_swap / t_gather:.2f}")
    # A patch applied once finds nothing in cache: flush the caches (a copy larger than L3) before each.
    big = torch.randn(32_000_000, generator=g)
    big_dst = torch.empty_like(big)
    cold = {"cpp": [], "loop": []}
    for _ in range(max(r, 20)):
        for name, fn in (("cpp", lambda: cpp.swap_([weight], [idx], [vals])), ("loop", plain_swap)):
            big_dst.copy_(big)
            t0 = time.perf_counter()
            fn()
            cold[name].append(time.perf_counter() - t0)
    out(f"swap_ cold caches                {statistics.median(cold['cpp']) * 1e3:8.3f} ms   "
        f"index loop {statistics.median(cold['loop']) * 1e3:.3f} ms")
    target = os.path.join(results_dir(), "cpp_targets.md") if args.save else args.out
    command = "python benchmarks/cpp_targets.py " + " ".join(sys.argv[1:])
    emit(header("cpp backend targets", command.strip()) + ["```"] + lines + ["```"], target)

if __name__ == "__main__":
    main()
