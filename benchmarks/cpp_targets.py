"""Speed targets of the ``cpp`` backend, measured in one run on this machine's CPU.

    python benchmarks/cpp_targets.py [--numel 10000000] [--layers 12] [--gamma 0.01] [--repeat 15]
                                     [--threads N] [--thp]

Prints, each against a baseline measured in the same run:

* ``topk_mask`` over all layers vs a per-layer ``torch.topk`` + scatter loop (target >= 10x), and vs the
  memory floor: two reads of the scores plus the mask write at the measured copy bandwidth (target
  within 3x);
* ``sam_weight`` forward + backward achieved bandwidth vs copy bandwidth (target >= 60%);
* ``swap_`` of 100k entries into a 10M-element weight (target <= 0.2 ms).

Timings are medians; on a shared machine they vary from run to run. Every op returns freshly allocated
outputs, and where page faults are slow (virtual machines) first-touching that memory can cost more
than the kernel: ``--thp`` sets torch's ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB pages for large CPU tensors)
to show the kernels without most of that cost. Two copy baselines are printed: into existing memory
(the target's reference) and ``clone()``, which allocates its output as the ops do.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


torch = None  # imported in main(), after --thp is applied


def median_time(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def layer_sizes(numel: int, layers: int, g: torch.Generator) -> list[int]:
    """Uneven layer sizes summing to ``numel`` (real models mix small and large layers)."""
    w = torch.rand(layers, generator=g) + 0.25
    sizes = (w / w.sum() * numel).long()
    sizes[-1] += numel - int(sizes.sum())
    return sizes.tolist()


def topk_loop(scores, ks):
    masks = []
    for s, k in zip(scores, ks):
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[s.reshape(-1).topk(k).indices] = True
        masks.append(m.view(s.shape))
    return masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--thp", action="store_true", help="THP_MEM_ALLOC_ENABLE=1 (must precede importing torch)")
    ap.add_argument("--numel", type=int, default=10_000_000)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--gamma", type=float, default=0.01)
    ap.add_argument("--swap-entries", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    if args.thp:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if "torch" in sys.modules and args.thp:
        raise SystemExit("--thp must be set before torch is imported")
    global torch
    import torch

    from sparse_sam import backends, reference

    if args.threads:
        torch.set_num_threads(args.threads)
    cpp = backends.get("cpp")
    g = torch.Generator().manual_seed(0)
    n, r = args.numel, args.repeat
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, numel={n:,}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '0')}")

    src = torch.randn(n, generator=g)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), r)
    bw = 2 * src.nbytes / t_copy
    # clone() allocates its output like the ops do, so it pays the same first-touch page faults.
    bw_alloc = 2 * src.nbytes / median_time(lambda: src.clone(), r)
    print(f"copy bandwidth               {bw / 1e9:8.2f} GB/s (into existing memory), "
          f"{bw_alloc / 1e9:.2f} GB/s (clone, fresh memory)")

    sizes = layer_sizes(n, args.layers, g)
    scores = [torch.randn(s, generator=g) for s in sizes]
    ks = [round(args.gamma * s) for s in sizes]
    assert all(torch.equal(a, b) for a, b in zip(cpp.topk_mask(scores, ks, None), topk_loop(scores, ks)))
    t_cpp = median_time(lambda: cpp.topk_mask(scores, ks, None), r)
    t_loop = median_time(lambda: topk_loop(scores, ks), max(3, r // 3))
    floor = (2 * 4 * n + n) / bw
    print(f"topk_mask cpp                {t_cpp * 1e3:8.2f} ms")
    print(f"topk_mask torch.topk loop    {t_loop * 1e3:8.2f} ms   speed-up {t_loop / t_cpp:6.1f}x (target >= 10x)")
    print(f"topk_mask memory floor       {floor * 1e3:8.2f} ms   cpp/floor {t_cpp / floor:6.2f}x (target <= 3x)")

    w, v, s_grad = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)
    m = torch.rand(n, generator=g) < args.gamma
    t_fwd = median_time(lambda: cpp.sam_weight_forward(w, m, v), r)
    t_bwd = median_time(lambda: cpp.sam_weight_backward(s_grad, m, v, torch.float32, "masked"), r)
    t_ref = (median_time(lambda: reference.sam_weight_forward_ref(w, m, v), r)
             + median_time(lambda: reference.sam_weight_backward_ref(s_grad, m, v, torch.float32, "masked"), r))
    # forward: read W, m, v, write W_eff; backward: read g, m, v, write grad_v, grad_s (fp32, bool mask)
    moved = n * (4 + 1 + 4 + 4) + n * (4 + 1 + 4 + 4 + 4)
    ach = moved / (t_fwd + t_bwd)
    print(f"sam_weight fwd / bwd         {t_fwd * 1e3:8.2f} / {t_bwd * 1e3:.2f} ms   {ach / 1e9:.2f} GB/s = "
          f"{100 * ach / bw:.0f}% of copy bandwidth (target >= 60%), {100 * ach / bw_alloc:.0f}% of clone; "
          f"{t_ref / (t_fwd + t_bwd):.1f}x the torch reference")

    weight = torch.randn(n, generator=g)
    idx = torch.randperm(n, generator=g)[: args.swap_entries].sort().values
    vals = torch.randn(args.swap_entries, generator=g)
    t_swap = median_time(lambda: cpp.swap_([weight], [idx], [vals]), max(r, 50))
    t_swap_ref = median_time(lambda: reference.swap_bits_unchecked_([weight], [idx], [vals]), max(r, 50))
    print(f"swap_ {args.swap_entries:,} into {n:,}     {t_swap * 1e3:8.3f} ms   (target <= 0.2 ms); "
          f"torch reference {t_swap_ref * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
