"""PatchServer speed table: a mixed batch against one plain forward of the same samples, in one run.

The paper's conv autoencoder (``SemanticAutoencoder``, width 32) in eval mode, batch 256, random
patches at γ = 1 %, ids drawn at random. Cases and their baselines:

* ``8 patches + base``: the server vs one base forward of the 256 samples;
* ``64 patches``: the same;
* ``1 patch``: the server with one id for the whole batch vs one forward with that patch applied.

Beside the server, ``grouped apply`` is the straightforward way (per id: ``patch.apply`` → forward of
its rows → ``patch.remove``). Every provider is timed round-robin (``--repeats`` rounds, median), and the
server's output is checked bit for bit against the grouped one before timing.

Run: ``python benchmarks/server_table.py [--threads 2] [--out benchmarks/results/NAME/server.md]``
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import random
import statistics
import subprocess
import time

import torch
import torch.nn as nn

import sparse_sam
from sparse_sam.experiments.autoencoder import SemanticAutoencoder


def make_model(width: int, seed: int = 0) -> nn.Module:
    """An eval-mode ``SemanticAutoencoder`` with random weights and random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = SemanticAutoencoder(width)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def make_patches(model: nn.Module, count: int, sparsity: float = 0.01, seed: int = 0) -> dict:
    """``count`` random patches of ``model`` (each layer's budget as ``sparse_sam.patch`` gives it, random
    indices, deltas ~ N(0, 0.05²)), named ``p0``, ``p1``, ... One is exported from a real handle; the
    others share its layers and base fingerprint with fresh indices and deltas."""
    handle = sparse_sam.patch(model, sparsity, seed=seed)
    template = handle.export()
    sparse_sam.unpatch(model)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        layers = []
        for layer in template.layers:
            k, n = layer.indices.numel(), layer.numel
            idx = torch.sort(torch.randperm(n, generator=g)[:k]).values.to(torch.int32)
            layers.append(dataclasses.replace(layer, indices=idx,
                                              deltas=0.05 * torch.randn(k, generator=g, dtype=layer.deltas.dtype)))
        p = copy.copy(template)
        p.layers = layers
        out[f"p{i}"] = p
    return out


def grouped_apply(model: nn.Module, patches: dict, x: torch.Tensor, ids: list) -> torch.Tensor:
    """The straightforward way: per id, apply its patch, run its rows, remove it."""
    out = None
    for g in dict.fromkeys(ids):
        rows = torch.tensor([i for i, v in enumerate(ids) if v == g])
        if g is None:
            y = model(x[rows])
        else:
            with patches[g].applied(model):
                y = model(x[rows])
        out = torch.empty((x.shape[0], *y.shape[1:]), dtype=y.dtype) if out is None else out
        out[rows] = y
    return out


def cases(model: nn.Module, batch: int, n_few: int, n_many: int, seed: int = 0) -> list[dict]:
    """The three cases: name, patches, ids and the name of the baseline provider."""
    rng = random.Random(seed)
    many = make_patches(model, n_many, seed=seed)
    few = {k: many[k] for k in list(many)[:n_few]}
    return [
        {"case": f"{n_few} patches + base", "patches": few, "ids": [rng.choice([None, *few]) for _ in range(batch)],
         "baseline": "base forward"},
        {"case": f"{n_many} patches", "patches": many, "ids": [rng.choice(list(many)) for _ in range(batch)],
         "baseline": "base forward"},
        {"case": "1 patch", "patches": {"p0": many["p0"]}, "ids": ["p0"] * batch, "baseline": "applied forward"},
    ]


def providers(model: nn.Module, case: dict, x: torch.Tensor) -> dict:
    """name -> zero-argument callable, the case's baseline first."""
    server = sparse_sam.PatchServer(model, case["patches"])
    patches, ids = case["patches"], case["ids"]

    def applied():
        with patches["p0"].applied(model):
            return model(x)

    base = {"base forward": lambda: model(x), "applied forward": applied}[case["baseline"]]
    return {case["baseline"]: base, "server": lambda: server(x, ids),
            "grouped apply": lambda: grouped_apply(model, patches, x, ids)}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--few", type=int, default=8)
    ap.add_argument("--many", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=None, help="also append the table (markdown) to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = make_model(args.width)
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.no_grad():
        for case in cases(model, args.batch, args.few, args.many):
            fns = providers(model, case, x)
            y, ref = fns["server"](), fns["grouped apply"]()
            if not torch.equal(y.view(torch.int32), ref.view(torch.int32)):
                raise SystemExit(f"{case['case']}: the server's output is not bit-identical to the grouped one")
            times = {k: [] for k in fns}
            for _ in range(args.repeats):
                for k, f in fns.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            med = {k: statistics.median(v) for k, v in times.items()}
            b = med[case["baseline"]]
            rows.append((case["case"], case["baseline"], b, med["server"] / b, med["grouped apply"] / b))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [f"`python benchmarks/server_table.py --threads {torch.get_num_threads()} --repeats {args.repeats}` "
             f"(width {args.width}, batch {args.batch}); {cpu_name()}, {os.cpu_count()} CPUs, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, 1-min load average {load:.1f}",
             "",
             "| case | baseline | baseline ms | server / baseline | grouped apply / baseline |",
             "|---|---|---|---|---|"]
    lines += [f"| {c} | {bn} | {b * 1e3:.0f} | {s:.2f}× | {g:.2f}× |" for c, bn, b, s, g in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
