"""LoRA (PEFT) and sparse_sam side by side on the same ViT: switching an adapter into the weights and back.

* LoRA, r = 8 on q/k/v/o/fc1/fc2 (random non-zero B so the merge changes the weights):
  ``merge_adapter()`` + ``unmerge_adapter()``; PEFT subtracts ``B·A`` again, so the base drifts by rounding.
* sparse_sam at γ = 1 % of the same ViT: ``apply`` + ``remove``, a raw-bit swap.

Reported: median time of one on+off cycle, and how many base weights differ in their bits from the
original after ``--cycles`` cycles. Needs ``pip install peft`` (the ``bench`` extra).

Usage: ``python benchmarks/peft_compare.py [--cycles 20] [--out FILE]``
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import emit, header
from switching import make_patch, vit


def drifted(model, originals) -> int:
    return sum(int((p.detach().view(torch.int32) != originals[n].view(torch.int32)).sum())
               for n, p in model.named_parameters() if n in originals)


def lora(cycles: int) -> tuple[float, int, int]:
    from peft import LoraConfig, get_peft_model

    model = vit()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"])
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 1e-2)  # a trained adapter: B ≠ 0
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in peft_model.named_parameters() if "lora_" not in n}
    times = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()
        times.append((time.perf_counter() - t0) * 1e3)
    n_lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    changed = sum(int((p.detach().view(torch.int32) != originals[n].view(torch.int32)).sum())
                  for n, p in base.items() if n in originals)
    return statistics.median(times), changed, n_lora


def sparse(cycles: int) -> tuple[float, int, int]:
    model = vit()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    patch = make_patch(model)
    times = []
    for _ in range(cycles):
        t0 = time.perf_counter()
        patch.apply(model)
        patch.remove(model)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:] or times), drifted(model, originals), patch.num_modified


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--out", default=None, help="append the table to this file")
    args = ap.parse_args()
    lt, ld, ln = lora(args.cycles)
    st, sd, sn = sparse(args.cycles)
    n = sum(p.numel() for p in vit().parameters())
    lines = header("PEFT side by side", f"python benchmarks/peft_compare.py --cycles {args.cycles}") + [
        f"ViT: {n / 1e6:.1f} M parameters", "",
        f"| method | adapter size | on + off, median ms | base weights with changed bits after {args.cycles} cycles |",
        "|---|---|---|---|",
        f"| LoRA r=8 (q/k/v/o/fc1/fc2), merge_adapter + unmerge_adapter | {ln:,} parameters | {lt:.2f} | {ld:,} |",
        f"| sparse_sam γ=1 %, apply + remove | {sn:,} entries | {st:.2f} | {sd:,} |"]
    emit(lines, args.out)

if __name__ == "__main__":
    main()
