"""Learning-rate sweeps for baseline DA and ZFDA, and the table of ZFDA levers.

    python -m sparse_sam.experiments.reproduce --preset sweep --out results/sweep

Runs on the quick preset's data and pre-trained model (shared through the cache), on every domain:

1. **Baseline DA**: ``lr`` over :data:`DA_LRS` at the quick preset's DA epochs, constant rate, then
   the best rate with a cosine schedule.
2. **ZFDA**, one coordinate at a time from the quick preset's ZFDA config: ``lr_delta`` (α_v) over
   :data:`ZFDA_LR_DELTA`, then ``lr_scores`` (α_s) over :data:`ZFDA_LR_SCORES` at the best α_v, then
   ``score_init_scale`` over :data:`ZFDA_INIT_SCALE` at the best pair.
3. **Levers**: from the best ZFDA config, one change at a time (:func:`lever_rows`), each keeping the
   sparse budget γ and the exact switch-off. Allocation and a fixed mask are the Fig. 4 grid of
   ``reproduce`` and are not repeated here.

A setting's score is the mean domain-test PSNR over the four domains (seed ``seed``). Writes
``sweep.json`` (every number, the winners) and ``tables.md``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, replace

from . import methods as M
from .data import load_data
from .domains import DOMAINS

__all__ = ["DA_LRS", "ZFDA_LR_DELTA", "ZFDA_LR_SCORES", "ZFDA_INIT_SCALE", "lever_rows", "run_sweep", "sweep_md"]

DA_LRS = (1e-4, 3e-4, 1e-3, 3e-3)
ZFDA_LR_DELTA = (1e-3, 3e-3, 1e-2)
ZFDA_LR_SCORES = (0.01, 0.05, 0.2)
ZFDA_INIT_SCALE = (0.1, 1.0)


def lever_rows(cfg: M.ZFDAConfig) -> dict[str, dict]:
    """Row name -> ZFDAConfig overrides: one lever changed at a time from ``cfg``."""
    return {
        "tuned (reference)": {},
        "masked delta gradient": dict(delta_grad="masked"),
        "warm start: mask from first |gradients|": dict(score_init="grad"),
        "cosine schedule": dict(schedule="cosine"),
        "2× epochs": dict(epochs=2 * cfg.epochs),
    }


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs)


def run_sweep(preset, data_source: str = "embedded", root: str | None = None, out: str | None = None,
              seed: int = 0, device: str = "cpu", progress: bool = True, link: str = "identity",
              cache_dir: str | None = None, domains=DOMAINS) -> dict:
    """Run the sweeps on ``preset``'s data and pre-trained model; write ``out`` (if given); return the report."""
    from .reproduce import _device_info, _domain_sets, _versions, load_or_pretrain

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    t_start = time.perf_counter()
    data = load_data(data_source, root, seed=seed, **preset.sizes)
    doms = _domain_sets(data, seed)
    base = M.Scenario(data.orig_train, data.orig_test, device=device, seed=seed, progress=False, link=link)
    pre_res = load_or_pretrain(preset, base, data_source, root, cache_dir, log)
    scen = {c: replace(base, dom_train=doms[c][0], dom_test=doms[c][1], domain=c, pretrained=pre_res.artifact)
            for c in domains}

    def score(rows):
        return _mean(r["psnr"] for r in rows.values())

    def da_row(cfg):
        rows = {c: {"psnr": (r := M.baseline_da(scen[c], cfg)).psnr["domain"], "wall_s": r.wall_s} for c in domains}
        log(f"[sweep] DA lr {cfg.lr:g} {cfg.schedule}: {score(rows):.2f} dB")
        return {"config": asdict(cfg), "domains": rows, "mean": score(rows)}

    def zf_row(cfg):
        rows = {}
        for c in domains:
            r = M.zfda(scen[c], cfg)
            rows[c] = {"psnr": r.psnr["domain"], "flipped_fraction": r.info["flipped_fraction"], "wall_s": r.wall_s}
        log(f"[sweep] ZFDA {cfg}: {score(rows):.2f} dB")
        return {"config": asdict(cfg), "domains": rows, "mean": score(rows)}

    report: dict = {"preset": preset.name, "seed": seed, "link": link, "data": data.source,
                    "domains": list(domains), "pretrain": {"aligned": pre_res.psnr["aligned"],
                                                           "cached": pre_res.info.get("cached", False)}}
    # 1. baseline DA
    da = [da_row(replace(preset.da, lr=lr, schedule="constant")) for lr in DA_LRS]
    best_da = max(da, key=lambda r: r["mean"])
    da.append(da_row(replace(M.TrainConfig(**best_da["config"]), schedule="cosine")))
    report["da"] = da
    report["da_best"] = max(da, key=lambda r: r["mean"])["config"]

    # 2. ZFDA, one coordinate at a time
    cache: dict[str, dict] = {}

    def zf(cfg):
        k = repr(cfg)
        if k not in cache:
            cache[k] = zf_row(cfg)
        return cache[k]

    cfg = replace(preset.zfda, score_init_scale=1.0)
    stages = []
    for field_name, grid in (("lr_delta", ZFDA_LR_DELTA), ("lr_scores", ZFDA_LR_SCORES),
                             ("score_init_scale", ZFDA_INIT_SCALE)):
        rows = [zf(replace(cfg, **{field_name: v})) for v in grid]
        best = max(rows, key=lambda r: r["mean"])
        cfg = replace(cfg, **{field_name: best["config"][field_name]})
        stages.append({"field": field_name, "rows": rows, "best": best["config"][field_name]})
    report["zfda"] = stages
    report["zfda_best"] = asdict(cfg)

    # 3. levers from the best config
    report["levers"] = [{"name": n, **zf(replace(cfg, **over))} for n, over in lever_rows(cfg).items()]
    report["da_reference"] = {"config": report["da_best"],
                              "mean": max(da, key=lambda r: r["mean"])["mean"],
                              "domains": max(da, key=lambda r: r["mean"])["domains"]}
    # The 2x-epochs lever gets a DA with 2x epochs too, so the comparison stays at equal epochs.
    report["da_2x_epochs"] = da_row(replace(M.TrainConfig(**report["da_best"]), epochs=2 * cfg.epochs))
    report.update(versions=_versions(), device=_device_info(device), wall_s=time.perf_counter() - t_start,
                  command=" ".join(sys.argv) if sys.argv and sys.argv[0].endswith("reproduce.py") else None)
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(report, f, indent=1)
        with open(os.path.join(out, "tables.md"), "w") as f:
            f.write(sweep_md(report))
        log(f"[done] sweep {report['wall_s']:.1f} s; wrote {out}")
    return report


def _cells(row, domains):
    return " | ".join(f"{row['domains'][c]['psnr']:.2f}" for c in domains) + f" | **{row['mean']:.2f}**"


def sweep_md(rep: dict) -> str:
    """The Markdown tables of :func:`run_sweep`'s report."""
    doms = rep["domains"]
    head = "| " + " | ".join(doms) + " | mean |"
    L = [f"# Sweeps — preset `{rep['preset']}`, data `{rep['data']}`, seed {rep['seed']}, link `{rep['link']}`", "",
         f"Device: {rep['device']}; wall time {rep['wall_s']:.0f} s. Pre-trained (aligned) PSNR "
         f"{rep['pretrain']['aligned']:.2f} dB. Every cell is the domain-test PSNR (dB) of one run; a setting's "
         "score is the mean over the domains, and the winner of each sweep is the highest mean. The sweeps select "
         "on the test sets of this seed; the quick preset's other seeds are the out-of-sample check.", "",
         "## Baseline DA: learning rate", "", "| lr | schedule | epochs " + head, "|---|---|---|" + "---|" * (len(doms) + 1)]
    for r in rep["da"]:
        c = r["config"]
        L.append(f"| {c['lr']:g} | {c['schedule']} | {c['epochs']} | " + _cells(r, doms) + " |")
    b = rep["da_best"]
    L += ["", f"Winner: lr {b['lr']:g}, {b['schedule']} schedule, {b['epochs']} epochs.", ""]
    L += ["## ZFDA: α_v, then α_s, then score initialisation scale (one at a time)", ""]
    for st in rep["zfda"]:
        L += [f"| {st['field']} | epochs " + head, "|---|---|" + "---|" * (len(doms) + 1)]
        for r in st["rows"]:
            L.append(f"| {r['config'][st['field']]:g} | {r['config']['epochs']} | " + _cells(r, doms) + " |")
        L += ["", f"Best {st['field']}: {st['best']:g}.", ""]
    z = rep["zfda_best"]
    L += [f"Winner: γ = {z['sparsity']:.2%}, {z['optimizer']}, α_s = {z['lr_scores']:g}, α_v = {z['lr_delta']:g}, "
          f"score init scale {z['score_init_scale']:g}, {z['epochs']} epochs.", ""]
    L += ["## ZFDA levers (one change at a time from the winner)", "",
          "| lever | " + " | ".join(doms) + " | mean | Δ mean vs tuned | mean ZFDA − DA |",
          "|---|" + "---|" * (len(doms) + 3)]
    ref = rep["levers"][0]["mean"]
    for r in rep["levers"]:
        da_mean = rep["da_2x_epochs"]["mean"] if r["name"] == "2× epochs" else rep["da_reference"]["mean"]
        L.append(f"| {r['name'].replace('|', chr(92) + '|')} | " + _cells(r, doms) + f" | {r['mean'] - ref:+.2f} | {r['mean'] - da_mean:+.2f} |")
    L += ["", f"Baseline DA at its best setting: " + _cells(rep["da_reference"], doms).replace(" | ", ", ")
          + f"; with 2× epochs ({rep['da_2x_epochs']['config']['epochs']}): "
          + _cells(rep["da_2x_epochs"], doms).replace(" | ", ", ") + ".", ""]
    return "\n".join(L)
