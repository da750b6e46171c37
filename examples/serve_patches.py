"""One receiver, four domain patches, one mixed batch: ``sparse_sam.PatchServer``.

A receiver decodes the semantics of many transmitters. Four of them see a local domain of the paper
(VA rotated, VP perspective, VC contrast, VH hue); the others see the original domain. The receiver
keeps its pre-trained decoder and one sparse patch per domain, and decodes a mixed batch in one call,
each sample with its transmitter's patch (``None``: the pre-trained decoder).

1. Pre-train the paper's conv autoencoder on the embedded photos (tiny width, a few epochs).
2. Per domain, train a ZFDA patch of the decoder only (γ = 1 %), on the pre-trained encoder's semantics.
3. Serve a shuffled batch of all five sources; print per-domain PSNR with and without the patches, and
   check that the original-domain rows equal the pre-trained decoder's output bit for bit.

Run: ``python examples/serve_patches.py [--width 8] [--epochs 4]`` (about 3 minutes of CPU time).
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import sparse_sam
from sparse_sam.experiments.data import load_embedded
from sparse_sam.experiments.domains import DOMAINS, apply_domain
from sparse_sam.experiments.methods import Scenario, TrainConfig, ZFDAConfig, pretrain, psnr


def train_decoder_patch(model, z: torch.Tensor, x: torch.Tensor, cfg: ZFDAConfig, seed: int):
    """A ZFDA patch of ``model.decoder`` mapping semantics ``z`` ``(N, 8, 8, 8)`` to images ``x``."""
    torch.manual_seed(seed)
    handle = sparse_sam.patch(model.decoder, cfg.sparsity, seed=seed, delta_grad=cfg.delta_grad, norm=cfg.norm)
    opt = torch.optim.Adam(handle.param_groups(lr_scores=cfg.lr_scores, lr_delta=cfg.lr_delta))
    g = torch.Generator().manual_seed(seed)
    model.decoder.train()
    for _ in range(cfg.epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(cfg.batch_size):
            loss = F.mse_loss(model.decoder(z[idx]), x[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.decoder.eval()
    patch = handle.export()
    sparse_sam.unpatch(model.decoder)
    return patch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each domain patch")
    ap.add_argument("--per-source", type=int, default=48, help="test samples per source in the mixed batch")
    args = ap.parse_args()
    t0 = time.perf_counter()
    data = load_embedded(n_orig_train=1024, n_orig_test=args.per_source, n_dom_train=256,
                         n_dom_test=args.per_source)
    sc = Scenario(data.orig_train, data.orig_test, progress=False)
    model = pretrain(sc, TrainConfig(epochs=6, lr=1e-2, batch_size=64), width=args.width).artifact.eval()
    pretrained = copy.deepcopy(model)
    z_of = model.encoder  # every transmitter runs the pre-trained encoder
    cfg = ZFDAConfig(sparsity=0.01, epochs=args.epochs, lr_scores=0.05, lr_delta=3e-3, batch_size=32)
    patches = {}
    for i, d in enumerate(DOMAINS):
        x_tr = apply_domain(data.dom_train, d, seed=i)
        with torch.no_grad():
            z_tr = z_of(x_tr)
        patches[d] = train_decoder_patch(model, z_tr, x_tr, cfg, seed=i)
    print(f"pre-trained width-{args.width} autoencoder; decoder patches: "
          + ", ".join(f"{d} {p.nbytes} B" for d, p in patches.items())
          + f" (decoder: {sum(p.numel() * 4 for p in model.decoder.parameters())} B)")

    # The mixed batch: per source, its test images; the original domain is served by the base decoder.
    sources = {None: data.orig_test, **{d: apply_domain(data.dom_test, d, seed=10 + i) for i, d in enumerate(DOMAINS)}}
    x = torch.cat(list(sources.values()))
    ids = [s for s, xs in sources.items() for _ in range(xs.shape[0])]
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    x, ids = x[order], [ids[i] for i in order]

    server = sparse_sam.PatchServer(model.decoder, patches)
    with torch.no_grad():
        z = z_of(x)
        y = server(z, ids)                   # one call, each row with its own patch
        y_base = pretrained.decoder(z)       # the pre-trained receiver, for comparison
    print(f"{'source':>10} {'rows':>5} {'pre-trained dB':>15} {'served dB':>10}")
    for s in sources:
        rows = torch.tensor([i for i, v in enumerate(ids) if v == s])
        print(f"{s or 'original':>10} {rows.numel():>5} {float(psnr(y_base[rows], x[rows]).mean()):15.2f} "
              f"{float(psnr(y[rows], x[rows]).mean()):10.2f}")
    base_rows = torch.tensor([i for i, v in enumerate(ids) if v is None])
    with torch.no_grad():
        ref = pretrained.decoder(z[base_rows])  # those rows alone through the untouched pre-trained decoder
    same = torch.equal(y[base_rows].view(torch.int32), ref.view(torch.int32))
    unchanged = all(torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                                b.view(torch.uint8) if b.is_floating_point() else b)
                    for a, b in zip(model.state_dict().values(), pretrained.state_dict().values()))
    print(f"original-domain rows bit-identical to the pre-trained decoder: {same}; "
          f"decoder weights and buffers unchanged after serving: {unchanged} "
          f"({time.perf_counter() - t0:.0f} s in all)")
    if not (same and unchanged):
        raise SystemExit("zero-forget violated")


if __name__ == "__main__":
    main()
