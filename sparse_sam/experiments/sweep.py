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
``sweep.json`` (every number, the winners) and ``tables.md``; with ``--seeds 0,1,2``, one folder per
seed and the summary ``seeds.md`` / ``sweep_seeds.json`` (:func:`aggregate_sweep`).

    python -m sparse_sam.experiments.reproduce --preset budget --out results/budget

The **budget study** (:func:`run_budget`) asks why ZFDA at γ = 1% stays below DA: it trains ZFDA at
several γ and on bases of two widths, with the tuned settings, beside DA, and records every run's
final training loss (:data:`BUDGET_GRID`; writes ``budget.json`` and ``tables.md``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace

from . import methods as M
from .data import load_data
from .domains import DOMAINS

__all__ = ["BUDGET_GRID", "DA_LRS", "ZFDA_LR_DELTA", "ZFDA_LR_SCORES", "ZFDA_INIT_SCALE", "aggregate_budget",
           "aggregate_sweep", "budget_md", "budget_seeds_md", "lever_rows", "run_budget", "run_sweep", "sweep_md",
           "sweep_seeds_md"]

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
    from .reproduce import load_or_pretrain

    t_start = time.perf_counter()
    log, data, doms, base = _setup(preset, data_source, root, seed, device, link, progress)
    pre_res = load_or_pretrain(preset, base, data_source, root, cache_dir, log)
    scen = _scenarios(base, doms, pre_res.artifact, domains)

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
    return _finish(report, t_start, device, out, "sweep.json", sweep_md, log)


def _setup(preset, data_source, root, seed, device, link, progress):
    """``(log, data, domain sets, base Scenario)`` of a study on ``preset``'s data."""
    from .reproduce import _domain_sets

    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)
    data = load_data(data_source, root, seed=seed, **preset.sizes)
    base = M.Scenario(data.orig_train, data.orig_test, device=device, seed=seed, progress=False, link=link)
    return log, data, _domain_sets(data, seed), base


def _scenarios(base, doms, pretrained, domains) -> dict:
    """Domain code -> the base Scenario with that domain's data and ``pretrained``."""
    return {c: replace(base, dom_train=doms[c][0], dom_test=doms[c][1], domain=c, pretrained=pretrained)
            for c in domains}


def _finish(report: dict, t_start: float, device: str, out, json_name: str, md_fn, log) -> dict:
    """Stamp ``report`` (versions, device, wall time, command) and write ``out/json_name`` and
    ``out/tables.md`` (``md_fn(report)``) when ``out`` is given."""
    from .reproduce import _command, _device_info, _versions, _write_outputs

    report.update(versions=_versions(), device=_device_info(device), wall_s=time.perf_counter() - t_start,
                  command=_command())
    if out is not None:
        _write_outputs(out, json_name, report, "tables.md", md_fn(report))
        log(f"[done] {json_name} {report['wall_s']:.1f} s; wrote {out}")
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
        da_mean = _lever_da_mean(rep, r["name"])
        L.append(f"| {r['name'].replace('|', chr(92) + '|')} | " + _cells(r, doms) + f" | {r['mean'] - ref:+.2f} | {r['mean'] - da_mean:+.2f} |")
    L += ["", f"Baseline DA at its best setting: " + _cells(rep["da_reference"], doms).replace(" | ", ", ")
          + f"; with 2× epochs ({rep['da_2x_epochs']['config']['epochs']}): "
          + _cells(rep["da_2x_epochs"], doms).replace(" | ", ", ") + ".", ""]
    return "\n".join(L)



def _lever_da_mean(rep: dict, name: str) -> float:
    """The DA mean a lever row is compared with: DA at the lever's epochs."""
    return rep["da_2x_epochs"]["mean"] if name == "2× epochs" else rep["da_reference"]["mean"]


def aggregate_sweep(reports: list[dict]) -> dict:
    """Mean ± sample std over :func:`run_sweep` reports of different seeds (same domains).

    Each seed's sweep picks its own winners, and its levers start from its own winner, so the lever
    rows compare within a seed: ``delta`` is a lever's mean PSNR minus that seed's tuned reference,
    ``gap`` its mean minus that seed's DA at the same epochs. Returns ``{"seeds", "domains", "preset",
    "wall_s", "winners": [{"seed", "da": {...}, "zfda": {...}}], "da": [{"label", "mean": ms}],
    "levers": [{"name", "delta": ms, "gap": ms, "domains": {domain: ms}}], "da_reference": ms}`` with
    ``ms = {"mean", "std", "values"}``.
    """
    from .reproduce import _mean_std

    doms = reports[0]["domains"]
    out: dict = {"seeds": [r["seed"] for r in reports], "domains": doms, "preset": reports[0]["preset"],
                 "wall_s": [r["wall_s"] for r in reports],
                 "winners": [{"seed": r["seed"], "da": r["da_best"], "zfda": r["zfda_best"]} for r in reports]}
    out["da"] = [{"label": f"lr {row['config']['lr']:g}, {row['config']['schedule']}",
                  "mean": _mean_std(r["da"][i]["mean"] for r in reports)}
                 for i, row in enumerate(reports[0]["da"][:-1])]  # the cosine row's rate differs by seed
    out["da"].append({"label": "best rate, cosine", "mean": _mean_std(r["da"][-1]["mean"] for r in reports)})
    out["da_reference"] = _mean_std(r["da_reference"]["mean"] for r in reports)
    out["levers"] = []
    for i, lever in enumerate(reports[0]["levers"]):
        rows = [r["levers"][i] for r in reports]
        if any(row["name"] != lever["name"] for row in rows):
            raise ValueError(f"the reports list different levers at row {i}")
        out["levers"].append({
            "name": lever["name"],
            "delta": _mean_std(row["mean"] - r["levers"][0]["mean"] for row, r in zip(rows, reports)),
            "gap": _mean_std(row["mean"] - _lever_da_mean(r, row["name"]) for row, r in zip(rows, reports)),
            "domains": {c: _mean_std(row["domains"][c]["psnr"] for row in rows) for c in doms}})
    return out


def sweep_seeds_md(agg: dict) -> str:
    """Markdown of :func:`aggregate_sweep`: the winners per seed, the DA sweep and the lever table with
    mean ± sample std over the seeds."""
    from .reproduce import _per_seed as per_seed
    from .reproduce import _pm as ms

    doms = agg["domains"]
    L = [f"# Sweeps — preset `{agg['preset']}`, seeds {', '.join(map(str, agg['seeds']))}: mean ± sample std "
         "over the seeds", "",
         "Per seed: OUT/seed<N>/tables.md. Each seed's sweep picks its own winners on its own test sets, and its "
         "levers start from its own winner.", "",
         "## Winners per seed", "", "| seed | baseline DA | ZFDA |", "|---|---|---|"]
    for w in agg["winners"]:
        d, z = w["da"], w["zfda"]
        L.append(f"| {w['seed']} | lr {d['lr']:g}, {d['schedule']}, {d['epochs']} epochs | α_v = {z['lr_delta']:g}, "
                 f"α_s = {z['lr_scores']:g}, score init scale {z['score_init_scale']:g}, {z['epochs']} epochs |")
    L += ["", "## Baseline DA: mean domain PSNR (dB)", "", "| setting | mean ± std |", "|---|---|"]
    L += [f"| {r['label']} | {ms(r['mean'])} |" for r in agg["da"]]
    L += ["", "## ZFDA levers (one change at a time from each seed's winner)", "",
          "| lever | " + " | ".join(doms) + " | Δ mean vs tuned | per seed | mean ZFDA − DA | per seed |",
          "|---|" + "---|" * (len(doms) + 4)]
    for r in agg["levers"]:
        L.append(f"| {r['name'].replace('|', chr(92) + '|')} | "
                 + " | ".join(ms(r["domains"][c]) for c in doms)
                 + f" | {ms(r['delta'], True)} | {per_seed(r['delta'])} | {ms(r['gap'], True)} | {per_seed(r['gap'])} |")
    L += ["", f"Baseline DA at each seed's best setting: {ms(agg['da_reference'])} dB (mean over domains); the "
          "2× epochs lever is compared with DA at 2× epochs.", "",
          "Wall time per seed: " + ", ".join(f"{s:.0f} s" for s in agg["wall_s"]) + ".", ""]
    return "\n".join(L)

# ------------------------------------------------------------------------------------- budget study
#: ZFDA budgets per base width: at the quick preset's width a γ grid; at width 32 (the paper preset's
#: width) γ = 1% and the γ that gives about as many modified entries as 1% of the width-16 model.
BUDGET_GRID = {16: (0.01, 0.02, 0.03, 0.05), 32: (0.0026, 0.01)}


def run_budget(preset, data_source: str = "embedded", root: str | None = None, out: str | None = None,
               seed: int = 0, device: str = "cpu", progress: bool = True, link: str = "identity",
               cache_dir: str | None = None, domains=DOMAINS, grid=None) -> dict:
    """Where the ZFDA − DA gap at γ = 1% comes from: ZFDA at several budgets γ and base widths.

    For every width in ``grid`` (width → γ values; default :data:`BUDGET_GRID`), the base is
    ``preset``'s pre-training at that width (cached like the preset's own), then per domain baseline
    DA (``preset.da``) and ZFDA (``preset.zfda`` at each γ) train on the same data. Besides the
    domain-test PSNR, every run records its last-epoch training loss (mean squared error on the
    domain's training images), which tells a method that runs out of capacity (its training loss
    stalls above DA's) from one that over-fits (training loss below DA's, test PSNR lower).

    Returns (and writes to ``out``: ``budget.json`` and ``tables.md``) ``{"widths": {w: {"aligned",
    "last_epoch_gain_db", "params", "da": {domain: run}, "zfda": {γ: {domain: run}}}}, ...}`` with
    ``run = {"psnr", "train_loss", "entries", "wall_s"}`` (``entries``: modified weights, ZFDA only).
    """
    from .reproduce import load_or_pretrain

    grid = dict(BUDGET_GRID if grid is None else grid)
    t_start = time.perf_counter()
    log, data, doms, base = _setup(preset, data_source, root, seed, device, link, progress)
    report: dict = {"preset": preset.name, "seed": seed, "link": link, "data": data.source, "domains": list(domains),
                    "da_config": asdict(preset.da), "zfda_config": asdict(preset.zfda), "widths": {}}
    for width, gammas in grid.items():
        pw = replace(preset, width=int(width))
        pre = load_or_pretrain(pw, base, data_source, root, cache_dir, log)
        scen = _scenarios(base, doms, pre.artifact, domains)
        entry = {"aligned": pre.psnr["aligned"], "last_epoch_gain_db": pre.info.get("last_epoch_gain_db"),
                 "params": sum(p.numel() for p in pre.artifact.parameters()), "da": {}, "zfda": {}}
        for c in domains:
            r = M.baseline_da(scen[c], preset.da)
            entry["da"][c] = {"psnr": r.psnr["domain"], "train_loss": r.info["losses"][-1], "wall_s": r.wall_s}
        log(f"[budget] width {width}: DA {_mean(v['psnr'] for v in entry['da'].values()):.2f} dB")
        for g in gammas:
            rows = {}
            for c in domains:
                r = M.zfda(scen[c], replace(preset.zfda, sparsity=float(g)))
                rows[c] = {"psnr": r.psnr["domain"], "train_loss": r.info["losses"][-1],
                           "entries": r.info["num_modified"], "wall_s": r.wall_s}
            entry["zfda"][repr(float(g))] = rows
            log(f"[budget] width {width}, γ {g:g}: ZFDA {_mean(v['psnr'] for v in rows.values()):.2f} dB")
        report["widths"][str(width)] = entry
    return _finish(report, t_start, device, out, "budget.json", budget_md, log)


def budget_md(rep: dict) -> str:
    """The Markdown tables of :func:`run_budget`'s report."""
    doms = rep["domains"]
    z, d = rep["zfda_config"], rep["da_config"]
    L = [f"# Budget study — preset `{rep['preset']}`, data `{rep['data']}`, seed {rep['seed']}, link `{rep['link']}`", "",
         f"Device: {rep['device']}; wall time {rep['wall_s']:.0f} s. ZFDA: the preset's setting "
         f"({z['optimizer']}, α_s = {z['lr_scores']:g}, α_v = {z['lr_delta']:g}, {z['allocation']} allocation, "
         f"{z['epochs']} epochs) at each γ; baseline DA: lr {d['lr']:g}, {d['schedule']} schedule, {d['epochs']} "
         "epochs. Every base is the preset's pre-training at that width. Cells: domain-test PSNR (dB), "
         "ZFDA − DA in brackets.", "",
         "| width | parameters | aligned | method | γ | modified entries | " + " | ".join(doms)
         + " | mean | within 0.3 dB of DA everywhere |",
         "|---|---|---|---|---|---|" + "---|" * (len(doms) + 2)]
    for w, e in rep["widths"].items():
        da = e["da"]
        head = f"| {w} | {e['params']:,} | {e['aligned']:.2f} |"
        L.append(f"{head} baseline DA | 100% | {e['params']:,} | "
                 + " | ".join(f"{da[c]['psnr']:.2f}" for c in doms) + f" | {_mean(da[c]['psnr'] for c in doms):.2f} | |")
        for g, rows in e["zfda"].items():
            gap = [rows[c]["psnr"] - da[c]["psnr"] for c in doms]
            ent = sorted({rows[c]["entries"] for c in doms})
            L.append(f"{head} ZFDA | {float(g):.2%} | {'/'.join(map(str, ent))} | "
                     + " | ".join(f"{rows[c]['psnr']:.2f} ({x:+.2f})" for c, x in zip(doms, gap))
                     + f" | {_mean(rows[c]['psnr'] for c in doms):.2f} ({_mean(gap):+.2f}) | "
                     + ("yes" if min(gap) >= -0.3 else f"no (worst {min(gap):+.2f})") + " |")
    L += ["", "Last-epoch training loss (MSE on the domain's training images, ×1e-3): a method whose training "
          "loss stalls above DA's lacks capacity; one below DA's with a lower test PSNR over-fits.", "",
          "| width | method | γ | " + " | ".join(doms) + " | mean |", "|---|---|---|" + "---|" * (len(doms) + 1)]
    for w, e in rep["widths"].items():
        runs = [("baseline DA", "100%", e["da"])] + [("ZFDA", f"{float(g):.2%}", r) for g, r in e["zfda"].items()]
        for name, g, rows in runs:
            L.append(f"| {w} | {name} | {g} | " + " | ".join(f"{1e3 * rows[c]['train_loss']:.3f}" for c in doms)
                     + f" | {1e3 * _mean(rows[c]['train_loss'] for c in doms):.3f} |")
    gains = ", ".join(f"width {w}: {e['last_epoch_gain_db']:+.3f} dB" for w, e in rep["widths"].items()
                      if e["last_epoch_gain_db"] is not None)
    L += ["", f"Last pre-training epoch's gain on the original test set: {gains}.", ""]
    return "\n".join(L)


def aggregate_budget(reports: list[dict]) -> dict:
    """Mean ± sample std over :func:`run_budget` reports of different seeds (same grid and domains).

    Returns ``{"seeds", "domains", "widths": {w: {"da": {domain: ms}, "zfda": {γ: {"gap": {domain: ms},
    "gap_mean": ms, "entries", "all_within_0.3": [bool per seed]}}}}}`` with ``ms = {"mean", "std",
    "values"}``; ``gap`` is ZFDA − DA in dB.
    """
    from .reproduce import _mean_std

    doms = reports[0]["domains"]
    out: dict = {"seeds": [r["seed"] for r in reports], "domains": doms, "preset": reports[0]["preset"],
                 "wall_s": [r["wall_s"] for r in reports], "widths": {}}
    for w, e0 in reports[0]["widths"].items():
        es = [r["widths"][w] for r in reports]
        ent = {"params": e0["params"], "aligned": _mean_std(e["aligned"] for e in es),
               "da": {c: _mean_std(e["da"][c]["psnr"] for e in es) for c in doms}, "zfda": {}}
        for g in e0["zfda"]:
            gaps = [{c: e["zfda"][g][c]["psnr"] - e["da"][c]["psnr"] for c in doms} for e in es]
            ent["zfda"][g] = {"gap": {c: _mean_std(x[c] for x in gaps) for c in doms},
                              "gap_mean": _mean_std(_mean(x.values()) for x in gaps),
                              "entries": e0["zfda"][g][doms[0]]["entries"],
                              "all_within_0.3": [min(x.values()) >= -0.3 for x in gaps]}
        out["widths"][w] = ent
    return out


def budget_seeds_md(agg: dict) -> str:
    """Markdown of :func:`aggregate_budget`: ZFDA − DA per width, γ and domain, mean ± std over seeds."""
    from .reproduce import _pm

    doms = agg["domains"]
    L = [f"# Budget study — preset `{agg['preset']}`, seeds {', '.join(map(str, agg['seeds']))}: ZFDA − DA (dB), "
         "mean ± sample std over the seeds", "",
         "Per seed: OUT/seed<N>/tables.md. The last column counts the seeds in which ZFDA is within 0.3 dB "
         "of DA in every domain.", "",
         "| width | γ | modified entries | " + " | ".join(doms) + " | mean | seeds within 0.3 dB everywhere |",
         "|---|---|---|" + "---|" * (len(doms) + 2)]
    for w, e in agg["widths"].items():
        L.append(f"| {w} | *DA PSNR* | {e['params']:,} | "
                 + " | ".join(f"*{_pm(e['da'][c])}*" for c in doms) + " | | |")
        for g, z in e["zfda"].items():
            ok = z["all_within_0.3"]
            L.append(f"| {w} | {float(g):.2%} | {z['entries']:,} | "
                     + " | ".join(_pm(z["gap"][c], True) for c in doms)
                     + f" | {_pm(z['gap_mean'], True)} | {sum(ok)} of {len(ok)} |")
    L += ["", "Wall time per seed: " + ", ".join(f"{s:.0f} s" for s in agg["wall_s"]) + ".", ""]
    return "\n".join(L)
