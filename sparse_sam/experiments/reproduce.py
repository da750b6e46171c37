"""Reproduce the ZFDA paper's Sec. V: ``python -m sparse_sam.experiments.reproduce``.

    python -m sparse_sam.experiments.reproduce --preset quick --data embedded --out results/quick
    python -m sparse_sam.experiments.reproduce --preset quick --seeds 0,1,2 --out results/quick3
    python -m sparse_sam.experiments.reproduce --preset sweep --out results/sweep
    python -m sparse_sam.experiments.reproduce --preset budget --out results/budget
    python -m sparse_sam.experiments.reproduce --preset paper --data cifar100 --root PATH \\
        --out results/paper --device cuda

Writes ``results.json`` (config, seed, versions, device, every number, timings), ``tables.md`` and the
figures ``fig2_domains.png``, ``fig3_misalignment.png``, ``fig4_adaptation.png``, ``memory.png``.

Presets (see :data:`PRESETS`): ``paper`` uses the paper's epochs, learning rates and γ grid and is
meant for a GPU; ``quick`` (the README demo) uses a narrower net, fewer samples and the γ subset
{0.3 %, 1 %}, pre-trains to convergence and gives DA and ZFDA equal epochs at the rates ``--preset
sweep`` picked (:mod:`sparse_sam.experiments.sweep`), within 10 minutes on 2 CPU cores; ``ci`` is a tiny
version for tests. All three run every method on every domain.

The CLI caches the pre-trained model (:func:`load_or_pretrain`, ``~/.cache/sparse_sam`` or
``$SPARSE_SAM_CACHE``; ``--no-cache`` to pre-train anyway); ``--seeds 0,1,2`` runs several seeds and
summarises them (:func:`aggregate_seeds`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from . import methods as M
from .autoencoder import make_link
from .data import Splits, load_data
from .domains import DOMAIN_RANGES, DOMAINS, apply_domain

__all__ = ["Preset", "PRESETS", "run", "main", "load_or_pretrain", "default_cache_dir", "checks"]

PAPER_GAMMAS = (0.0003, 0.001, 0.003, 0.01)
ABLATION_VARIANTS = (("optimised", "linear"), ("optimised", "uniform"), ("fixed", "linear"), ("fixed", "uniform"))


@dataclass
class Preset:
    """Everything a run depends on besides data source, seed and device."""
    name: str
    width: int
    sizes: dict
    pretrain: M.TrainConfig
    da: M.TrainConfig
    zfda: M.ZFDAConfig                      # the main ZFDA setting (γ = zfda.sparsity)
    gammas: tuple[float, ...]               # Fig. 4 grid
    ablation_epochs: int                    # ZFDA epochs of the Fig. 4 runs
    tuning: M.RealignConfig
    equalizer: M.RealignConfig
    slf: M.SLFConfig
    slf_frozen: tuple[int, ...]             # SLF sweep over frozen decoder stages
    optimiser_ablation: dict = field(default_factory=dict)  # row name -> ZFDAConfig overrides
    optimiser_ablation_domain: str = "VH"
    notes: tuple[str, ...] = ()             # where the settings come from (printed in tables.md)


def _optimiser_rows(lr_scores: float, lr_delta: float = 1e-3, full: bool = True) -> dict:
    """Row name -> ZFDAConfig overrides; ``lr_scores`` / ``lr_delta`` are the preset's own (named in the rows)."""
    rows = {
        "paper literal: SGD, α_s=1, α_v=1e-4, masked": dict(optimizer="sgd", lr_scores=1.0, lr_delta=1e-4,
                                                           delta_grad="masked"),
        "SGD, α_s=1e4, α_v=1e-3, masked": dict(optimizer="sgd", lr_scores=1e4, lr_delta=1e-3, delta_grad="masked"),
        "Adam, α_v=1e-4, dense": dict(lr_delta=1e-4),
        f"Adam, α_v={lr_delta:g}, masked": dict(delta_grad="masked"),
        f"Adam, α_s={lr_scores:g}, α_v={lr_delta:g}, dense (default)": dict(),
        "Adam, dense, fixed mask": dict(learn_mask=False),
    }
    if not full:  # the quick preset skips the rows that other tables already cover
        for name in ("SGD, α_s=1e4, α_v=1e-3, masked", "Adam, dense, fixed mask"):
            rows.pop(name)
    return rows


PRESETS = {
    # The paper's recipe. Its optimiser and batch size are not stated: Adam, batch 64. Width 32 is ours.
    "paper": Preset(
        name="paper", width=32,
        sizes=dict(n_orig_train=None, n_orig_test=None, n_dom_train=None, n_dom_test=None),
        pretrain=M.TrainConfig(epochs=40, lr=1e-2, batch_size=64),
        da=M.TrainConfig(epochs=10, lr=1e-4, batch_size=64),
        zfda=M.ZFDAConfig(sparsity=0.01, epochs=30, lr_scores=0.01, lr_delta=1e-3),
        gammas=PAPER_GAMMAS, ablation_epochs=30,
        tuning=M.RealignConfig(n_samples=1024, steps=8, lr=1e-3),
        equalizer=M.RealignConfig(n_samples=1024, epochs=30, lr=1e-3),
        slf=M.SLFConfig(n_samples=1024, epochs=30, lr=1e-4), slf_frozen=(0, 2, 4),
        optimiser_ablation=_optimiser_rows(0.01)),
    # Under 10 minutes on 2 CPU cores: width 16, 3000 pre-training patches, 512 per domain, γ ∈ {0.3 %, 1 %}.
    # Pre-training anneals (cosine) over 40 epochs and then trains 2 more at the final rate, so the
    # base is converged (check d). DA and ZFDA train equally long, at the rates the sweep picked.
    "quick": Preset(
        name="quick", width=16,
        sizes=dict(n_orig_train=3000, n_orig_test=400, n_dom_train=512, n_dom_test=256),
        pretrain=M.TrainConfig(epochs=42, lr=3e-3, batch_size=64, schedule="cosine", final_lr_ratio=0.01,
                               hold_epochs=2),
        da=M.TrainConfig(epochs=12, lr=3e-3, batch_size=64, schedule="cosine"),
        zfda=M.ZFDAConfig(sparsity=0.01, epochs=12, lr_scores=0.05, lr_delta=3e-3),
        gammas=(0.003, 0.01), ablation_epochs=6,
        tuning=M.RealignConfig(n_samples=1024, steps=8, lr=1e-3),
        equalizer=M.RealignConfig(n_samples=1024, epochs=5, lr=1e-3),
        slf=M.SLFConfig(n_samples=1024, epochs=2, lr=1e-3), slf_frozen=(0, 3),
        optimiser_ablation=_optimiser_rows(0.05, 3e-3, full=False),
        notes=("Baseline DA: lr 3e-3 with a cosine schedule, the best mean domain PSNR over lr ∈ {1e-4, 3e-4, "
               "1e-3, 3e-3} at a constant rate (19.92 / 24.51 / 27.43 / 27.59 dB) and the best rate with a "
               "cosine schedule (27.68 dB), 12 epochs (`--preset sweep`, seed 0: docs/results/sweep/tables.md).",
               "ZFDA: α_v = 3e-3 of {1e-3, 3e-3, 1e-2} (26.53 / 27.00 / 26.02 dB), then α_s = 0.05 of "
               "{0.01, 0.05, 0.2} (26.02 / 27.00 / 26.89 dB), then score init scale 1 of {0.1, 1} "
               "(26.86 / 27.00 dB), 12 epochs (same sweep).",
               "DA and ZFDA train on the same 512 images per domain, batch 64, for the same 12 epochs.")),
    # For tests: tiny everything, every method and domain still runs.
    "ci": Preset(
        name="ci", width=8,
        sizes=dict(n_orig_train=1024, n_orig_test=64, n_dom_train=128, n_dom_test=64),
        pretrain=M.TrainConfig(epochs=8, lr=1e-2, batch_size=64, schedule="cosine", hold_epochs=1),
        da=M.TrainConfig(epochs=6, lr=1e-2, batch_size=32),
        zfda=M.ZFDAConfig(sparsity=0.01, epochs=4, lr_scores=0.05, lr_delta=1e-2, batch_size=32),
        gammas=(0.01,), ablation_epochs=2,
        tuning=M.RealignConfig(n_samples=128, steps=4, lr=1e-3),
        equalizer=M.RealignConfig(n_samples=128, epochs=2, lr=1e-3, hidden=64),
        slf=M.SLFConfig(n_samples=128, epochs=1, lr=1e-3), slf_frozen=(3,),
        optimiser_ablation={"paper literal: SGD, α_s=1, α_v=1e-4, masked":
                            dict(optimizer="sgd", lr_scores=1.0, lr_delta=1e-4, delta_grad="masked")}),
}


def _versions() -> dict:
    import numpy

    import sparse_sam

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "sparse_sam": sparse_sam.__version__, "platform": platform.platform()}
    for mod in ("skimage", "matplotlib"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:
            v[mod] = None
    return v


def _device_info(device: str) -> dict:
    d = {"device": device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return d


def _domain_sets(data: Splits, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {code: (apply_domain(data.dom_train, code, seed * 1000 + 10 * i + 1),
                   apply_domain(data.dom_test, code, seed * 1000 + 10 * i + 2))
            for i, code in enumerate(DOMAINS)}


# ------------------------------------------------------------------------------------- pre-trained model cache
CACHE_ENV = "SPARSE_SAM_CACHE"
_CODE_FILES = ("autoencoder.py", "methods.py", "data.py")  # what pre-training depends on


def default_cache_dir() -> str:
    """``$SPARSE_SAM_CACHE`` if set, else ``~/.cache/sparse_sam``."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "sparse_sam")


def _pretrain_key(preset: Preset, data_source: str, root: str | None, seed: int, link: str, device: str) -> str:
    """Cache file name: preset, data and seed in clear, plus a hash of the configuration and the code."""
    h = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _CODE_FILES:
        with open(os.path.join(here, name), "rb") as f:
            h.update(f.read())
    cfg = {"width": preset.width, "sizes": preset.sizes, "pretrain": asdict(preset.pretrain), "data": data_source,
           "root": os.path.abspath(root) if root else None, "seed": seed, "link": link,
           "device": torch.device(device).type, "torch": torch.__version__}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    return f"pretrained-{preset.name}-{data_source}-seed{seed}-{h.hexdigest()[:16]}.pt"


def load_or_pretrain(preset: Preset, base: M.Scenario, data_source: str, root: str | None = None,
                     cache_dir: str | None = None, log=lambda *a: None) -> M.MethodResult:
    """:func:`~sparse_sam.experiments.methods.pretrain` for ``preset``, or its cached result.

    With ``cache_dir`` (None: no cache), the model and its result are stored under
    ``cache_dir/pretrained-<preset>-<data>-seed<seed>-<hash>.pt``, the hash covering the preset's
    width, sizes and pre-training config, the data source, link, device type, torch version and the
    source of the modules pre-training depends on. A hit returns the stored model and numbers with
    ``info["cached"] = True``; ``wall_s`` is then the load time and ``info["trained_wall_s"]`` the
    original training time.
    """
    path = None
    if cache_dir is not None:
        path = os.path.join(cache_dir, _pretrain_key(preset, data_source, root, base.seed, base.link, base.device))
        if os.path.isfile(path):
            t0 = time.perf_counter()
            blob = torch.load(path, map_location=base.device, weights_only=True)
            model = M.SemanticAutoencoder(preset.width, link=make_link(base.link)).to(base.device)
            model.load_state_dict(blob["state_dict"])
            model.eval()
            r = blob["result"]
            log(f"[pretrain] loaded from cache {path}")
            return M.MethodResult("pretrain", None, None, r["psnr"], time.perf_counter() - t0,
                                  info={**r["info"], "cached": True, "cache_file": os.path.basename(path),
                                        "trained_wall_s": r["wall_s"]}, artifact=model)
    res = M.pretrain(base, preset.pretrain, width=preset.width)
    res.info["cached"] = False
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save({"state_dict": res.artifact.state_dict(), "result": res.to_dict()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads a half-written file
        res.info["cache_file"] = os.path.basename(path)
        log(f"[pretrain] cached to {path}")
    return res


def run(preset: Preset, data_source: str = "embedded", root: str | None = None, out: str | None = None,
        seed: int = 0, device: str = "cpu", progress: bool = True, plots: bool = True,
        link: str = "identity", cache_dir: str | None = None) -> dict:
    """Run every experiment of ``preset``; write results to ``out`` (if given) and return them.

    ``link`` is the channel between every Tx and Rx: ``"identity"`` (the paper's setting),
    ``"awgn:SNR_DB"`` or ``"dmc:P[:BITS]"`` (see :func:`~sparse_sam.experiments.autoencoder.make_link`).
    ``cache_dir``: where the pre-trained model is cached (see :func:`load_or_pretrain`); None: no cache.
    """
    make_link(link)  # a bad spec fails here, before any training
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if progress else (lambda *a: None)

    t = time.perf_counter()
    data = load_data(data_source, root, seed=seed, **preset.sizes)
    doms = _domain_sets(data, seed)
    timings["data"] = time.perf_counter() - t
    log(f"[data] {data.source}: {data.sizes()} ({timings['data']:.1f} s)")

    base = M.Scenario(data.orig_train, data.orig_test, device=device, seed=seed, progress=progress, link=link)
    pre_res = load_or_pretrain(preset, base, data_source, root, cache_dir, log)
    pre = pre_res.artifact
    timings["pretrain"] = pre_res.wall_s
    log(f"[pretrain] aligned PSNR {pre_res.psnr['aligned']:.2f} dB, last epoch "
        f"{pre_res.info['last_epoch_gain_db']:+.3f} dB ({pre_res.wall_s:.1f} s)")

    results: dict = {"pretrain": pre_res.to_dict(), "domains": {}, "fig4": {}, "optimiser_ablation": [],
                     "memory": []}
    zfda_runs = {}  # (domain, repr(config)) -> result: a run is reused only for an identical config
    t = time.perf_counter()
    for code in DOMAINS:
        dtr, dte = doms[code]
        sc = replace(base, dom_train=dtr, dom_test=dte, domain=code, pretrained=pre)
        da = M.baseline_da(sc, preset.da)
        zf = M.zfda(sc, preset.zfda)
        zfda_runs[(code, repr(preset.zfda))] = zf
        realign = {}
        for side in ("tx", "rx"):
            rs = replace(sc, adapted=da.artifact, side=side)
            rows = [M.tuning(rs, preset.tuning), M.equalizer(rs, preset.equalizer)]
            rows += [M.slf(rs, replace(preset.slf, frozen=f)) for f in preset.slf_frozen]
            realign[side] = [r.to_dict() for r in rows]
        results["domains"][code] = {"baseline_da": da.to_dict(), "zfda": zf.to_dict(), "realign": realign}
        log(f"[{code}] DA {da.psnr['domain']:.2f} dB, ZFDA {zf.psnr['domain']:.2f} dB, un-adapted "
            f"{da.psnr['domain_pretrained']:.2f} dB; misaligned tx {da.psnr['tx_adapted']:.2f} / rx "
            f"{da.psnr['rx_adapted']:.2f} dB vs aligned {da.psnr['aligned']:.2f} dB")
    timings["domains"] = time.perf_counter() - t

    # Fig. 4: γ grid × {optimised, fixed} × {linear, uniform}, all at ablation_epochs so the four
    # curves are comparable; the main run is reused where its config is identical.
    t = time.perf_counter()
    for code in DOMAINS:
        dtr, dte = doms[code]
        sc = replace(base, dom_train=dtr, dom_test=dte, domain=code, pretrained=pre)
        for gamma in preset.gammas:
            for mask, alloc in ABLATION_VARIANTS:
                cfg = replace(preset.zfda, sparsity=gamma, allocation=alloc, learn_mask=mask == "optimised",
                              epochs=preset.ablation_epochs)
                key = (code, repr(cfg))
                if key not in zfda_runs:
                    zfda_runs[key] = M.zfda(sc, cfg)
                r = zfda_runs[key]
                results["fig4"].setdefault(code, []).append(
                    {"gamma": gamma, "mask": mask, "allocation": alloc, "psnr": r.psnr["domain"],
                     "epochs": r.info["config"]["epochs"], "flipped_fraction": r.info["flipped_fraction"],
                     "patch_bytes": r.info["patch_bytes"], "model_bytes": r.info["model_bytes"],
                     "wall_s": r.wall_s})
    timings["fig4"] = time.perf_counter() - t

    # Memory: patch bytes vs model bytes per γ (optimised, linear runs), both encodings.
    for gamma in sorted(set(preset.gammas)):
        cfg = replace(preset.zfda, sparsity=gamma, allocation="linear", learn_mask=True, epochs=preset.ablation_epochs)
        runs = [zfda_runs[(c, repr(cfg))] for c in DOMAINS if (c, repr(cfg)) in zfda_runs]
        if not runs:
            continue
        r0 = runs[0]
        results["memory"].append({
            "gamma": gamma, "num_modified": r0.info["num_modified"], "model_bytes": r0.info["model_bytes"],
            "patch_bytes": r0.info["patch_bytes"], "patch_ratio": r0.info["patch_ratio"],
            "compact_psnr_cost_db": sum(r.psnr["domain_fp32"] - r.psnr["domain_compact"] for r in runs) / len(runs),
            "domains": len(runs)})

    # Score-optimiser ablation on one domain at the main γ.
    t = time.perf_counter()
    code = preset.optimiser_ablation_domain
    dtr, dte = doms[code]
    sc = replace(base, dom_train=dtr, dom_test=dte, domain=code, pretrained=pre)
    main_row = results["domains"][code]["zfda"]
    for name, over in preset.optimiser_ablation.items():
        cfg = replace(preset.zfda, **over)
        r = main_row if cfg == preset.zfda else M.zfda(sc, cfg).to_dict()
        results["optimiser_ablation"].append({"name": name, "config": r["info"]["config"], "psnr": r["psnr"]["domain"],
                                              "flipped_fraction": r["info"]["flipped_fraction"],
                                              "flipped_per_epoch": r["info"]["flipped_per_epoch"]})
    timings["optimiser_ablation"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start

    results["checks"] = checks(results, asdict(preset))
    report = {"preset": asdict(preset), "data": {"source": data.source, "sizes": data.sizes(),
                                                 "orig_classes": data.orig_classes, "dom_classes": data.dom_classes,
                                                 **data.info},
              "domain_ranges": DOMAIN_RANGES, "seed": seed, "link": link, "versions": _versions(),
              "device": _device_info(device), "timings_s": timings, "results": results,
              "command": _command()}
    if out is not None:
        _write_outputs(out, "results.json", report, "tables.md", tables_md(report))
        if plots:
            from . import plots as P

            P.fig2(data, seed, os.path.join(out, "fig2_domains.png"))
            P.fig3(report, os.path.join(out, "fig3_misalignment.png"))
            P.fig4(report, os.path.join(out, "fig4_adaptation.png"))
            P.memory(report, os.path.join(out, "memory.png"))
        log(f"[done] {timings['total']:.1f} s; wrote {out}")
    return report


def _command() -> str | None:
    """The command line, when this module runs as a script (recorded in every report)."""
    return " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("reproduce.py") else None


def _write_outputs(out: str, json_name: str, obj: dict, md_name: str, md: str) -> None:
    """``out/json_name`` (``obj`` as JSON; dataclasses and tuples as objects and lists) and ``out/md_name``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, json_name), "w") as f:
        json.dump(obj, f, indent=1, default=_json_default)
    with open(os.path.join(out, md_name), "w") as f:
        f.write(md)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return asdict(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------- summaries
CONVERGED_GAIN_DB = 0.1   # (d): the last pre-training epoch adds less than this
ZFDA_GOAL_DB = 0.3        # (f): ZFDA within this of baseline DA, or above it
REALIGN_SLACK_DB = 0.3    # a realignment method ending more than this above aligned would mean an unconverged base
CHECKS_REQUIRED = ("a_baseline_da_misaligns", "b_zfda_off_exact", "c_zfda_beats_unadapted", "d_base_converged",
                   "e_da_epochs_ge_zfda")  # the CLI's exit status; (f) and the realignment bound are reported


def checks(results: dict, preset: dict | None = None) -> dict:
    """The properties the quick preset must show, computed from the numbers (see tables.md).

    ``preset`` (the preset as a dict) is needed for (e); without it (e) is None.
    """
    doms = results["domains"]
    drop_tx = {c: d["baseline_da"]["psnr"]["aligned"] - d["baseline_da"]["psnr"]["tx_adapted"] for c, d in doms.items()}
    drop_rx = {c: d["baseline_da"]["psnr"]["aligned"] - d["baseline_da"]["psnr"]["rx_adapted"] for c, d in doms.items()}
    zf_drop = {c: max(d["zfda"]["psnr"]["aligned"] - d["zfda"]["psnr"][s] for s in ("tx_adapted", "rx_adapted"))
               for c, d in doms.items()}
    zf_gain = {c: d["zfda"]["psnr"]["domain"] - d["baseline_da"]["psnr"]["domain_pretrained"] for c, d in doms.items()}
    zf_minus_da = {c: d["zfda"]["psnr"]["domain"] - d["baseline_da"]["psnr"]["domain"] for c, d in doms.items()}
    pi = results["pretrain"]["info"]
    gain = pi.get("last_epoch_gain_db", float("nan"))
    # Per realignment method: the most it ends above the aligned pair, over domains and cases.
    above: dict[str, float] = {}
    for d in doms.values():
        for side in ("tx", "rx"):
            for r in d["realign"][side]:
                v = r["psnr"]["realigned"] - d["baseline_da"]["psnr"]["aligned"]
                above[r["method"]] = max(above.get(r["method"], -math.inf), v)
    return {
        "misalignment_drop_tx_db": drop_tx, "misalignment_drop_rx_db": drop_rx,
        # Measurable: at least 0.5 dB on average over the domains, for each case (Tx / Rx adapted).
        "a_baseline_da_misaligns": _mean(drop_tx.values()) > 0.5 and _mean(drop_rx.values()) > 0.5,
        "zfda_switched_off_drop_db": zf_drop,
        "b_zfda_off_exact": all(v == 0.0 for v in zf_drop.values())
        and all(d["zfda"]["info"]["outputs_bit_identical"] and d["zfda"]["info"]["state_bit_identical"]
                for d in doms.values()),
        "zfda_gain_over_unadapted_db": zf_gain,
        "c_zfda_beats_unadapted": all(v > 0.0 for v in zf_gain.values()),
        "pretrain_last_epoch_gain_db": gain,
        "d_base_converged": bool(gain < CONVERGED_GAIN_DB),
        "e_da_epochs_ge_zfda": None if preset is None else preset["da"]["epochs"] >= preset["zfda"]["epochs"],
        "zfda_minus_da_db": zf_minus_da,
        "f_zfda_within_goal": all(v >= -ZFDA_GOAL_DB for v in zf_minus_da.values()),
        "realignment_above_aligned_db": above,
        "realignment_within_slack": all(v <= REALIGN_SLACK_DB for v in above.values()),
    }


def _mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def tables_md(report: dict) -> str:
    res, p = report["results"], report["preset"]
    doms = res["domains"]
    codes = list(doms)
    slf_names = [f"slf_F{f}" for f in p["slf_frozen"]]
    L = [f"# ZFDA reproduction — preset `{p['name']}`, data `{report['data']['source']}`, seed {report['seed']}, "
         f"link `{report.get('link', 'identity')}`", ""]
    L += [f"Device: {report['device']}; total wall time {report['timings_s']['total']:.1f} s "
          f"(data {report['timings_s']['data']:.1f} s, pre-training {report['timings_s']['pretrain']:.1f} s).",
          f"Data sizes: {report['data']['sizes']}. Autoencoder width {p['width']}, "
          f"{res['pretrain']['info']['params']} parameters. PSNR: dB, peak 1.0, mean over test images.", ""]
    L += [f"Pre-trained (aligned) PSNR on original-domain test data: **{res['pretrain']['psnr']['aligned']:.2f} dB** "
          "(paper, CIFAR-100: 30.51 dB).", ""]
    pi, pc = res["pretrain"]["info"], p["pretrain"]
    if pi.get("psnr_per_epoch"):
        per = pi["psnr_per_epoch"]
        cached = (f" Loaded from the cache ({pi['cache_file']}); it trained in {pi['trained_wall_s']:.1f} s."
                  if pi.get("cached") else "")
        L += [f"Pre-training: {pc['epochs']} epochs, Adam, lr {pc['lr']:g}, {pc.get('schedule', 'constant')} schedule"
              + (f" to {pc['lr'] * pc.get('final_lr_ratio', 1):g}" if pc.get("schedule") == "cosine" else "")
              + f", batch {pc['batch_size']}. Test PSNR after every epoch: "
              + ", ".join(f"{v:.2f}" for v in per) + f". Last epoch: {pi['last_epoch_gain_db']:+.3f} dB." + cached, ""]
    if p.get("notes"):
        L += ["Where the settings come from:", "", *[f"- {n}" for n in p["notes"]], ""]

    L += ["## Fig. 3 — misalignment: PSNR on original-domain test data (dB)", "",
          "Tx adapted = adapted encoder → pre-trained decoder; Rx adapted = pre-trained encoder → adapted decoder. "
          "Realignment methods start from the misaligned (baseline-DA) pair.", ""]
    head = ["case", "domain", "aligned", "misaligned (baseline DA)", "tuning", "equalizer",
            *[f"SLF F={f}" for f in p["slf_frozen"]], "ZFDA switched off", "ZFDA bit-identical"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for side in ("tx", "rx"):
        for c in codes:
            d = doms[c]
            rr = {r["method"]: r for r in d["realign"][side]}
            row = [f"{side.upper()} adapted", c, f"{d['baseline_da']['psnr']['aligned']:.2f}",
                   f"{d['baseline_da']['psnr'][side + '_adapted']:.2f}",
                   f"{rr['tuning']['psnr']['realigned']:.2f}", f"{rr['equalizer']['psnr']['realigned']:.2f}",
                   *[f"{rr[n]['psnr']['realigned']:.2f}" for n in slf_names],
                   f"{d['zfda']['psnr'][side + '_adapted']:.2f}",
                   "yes" if d["zfda"]["info"]["outputs_bit_identical"] else "NO"]
            L.append("| " + " | ".join(row) + " |")
    ch = res["checks"]
    dtx, drx = _mean(ch["misalignment_drop_tx_db"].values()), _mean(ch["misalignment_drop_rx_db"].values())
    L += ["", "| summary (mean over domains) | this run | paper |", "|---|---|---|",
          f"| misalignment drop, Tx adapted | {dtx:.2f} dB | ≈ 2.89 dB |",
          f"| misalignment drop, Rx adapted | {drx:.2f} dB | 7.91 dB |",
          f"| misalignment drop, average | {(dtx + drx) / 2:.2f} dB | 5.34 dB |"]
    for m, paper in (("tuning", "+2.41 dB"), ("equalizer", "+0.80 dB"), *[(n, "—") for n in slf_names]):
        gain = _mean(r["psnr"]["realigned"] - r["psnr"]["misaligned"] for d in doms.values()
                     for s in ("tx", "rx") for r in d["realign"][s] if r["method"] == m)
        L.append(f"| {m} recovers | {gain:+.2f} dB | {paper} |")
    L.append(f"| ZFDA switched off, drop | {max(ch['zfda_switched_off_drop_db'].values()):.3f} dB | 0 (zero loss) |")
    L.append("")

    L += ["## Realignment cost (mean over domains)", "",
          "| method | case | PSNR gain | bytes exchanged | extra parameters | wall time |", "|---|---|---|---|---|---|"]
    for m in ("tuning", "equalizer", *slf_names):
        for side in ("tx", "rx"):
            rows = [r for d in doms.values() for r in d["realign"][side] if r["method"] == m]
            L.append(f"| {m} | {side.upper()} adapted | {_mean(r['psnr']['realigned'] - r['psnr']['misaligned'] for r in rows):+.2f} dB"
                     f" | {_fmt_bytes(_mean(r['bytes_exchanged'] for r in rows))} | {rows[0]['extra_params']}"
                     f" | {_mean(r['wall_s'] for r in rows):.2f} s |")
    L.append("| ZFDA (switch patch off) | both | exact (0.000 dB loss) | 0 B | 0 | 0 s |")
    L.append("")

    L += ["## Domain adaptation (domain test PSNR, dB)", "",
          f"Main ZFDA setting: γ = {p['zfda']['sparsity']:.2%}, {p['zfda']['allocation']} allocation, "
          f"{p['zfda']['optimizer']} (α_s = {p['zfda']['lr_scores']:g}, α_v = {p['zfda']['lr_delta']:g}), "
          f"delta_grad = {p['zfda']['delta_grad']}, {p['zfda']['epochs']} epochs. Baseline DA: "
          f"{p['da']['epochs']} epochs at lr {p['da']['lr']:g} ({p['da'].get('schedule', 'constant')} schedule).", "",
          "| domain | un-adapted | baseline DA | ZFDA | ZFDA − un-adapted | ZFDA − DA | mask entries flipped |",
          "|---|---|---|---|---|---|---|"]
    for c in codes:
        d = doms[c]
        L.append(f"| {c} | {d['baseline_da']['psnr']['domain_pretrained']:.2f} | {d['baseline_da']['psnr']['domain']:.2f}"
                 f" | {d['zfda']['psnr']['domain']:.2f} | {ch['zfda_gain_over_unadapted_db'][c]:+.2f}"
                 f" | {ch['zfda_minus_da_db'][c]:+.2f} | {d['zfda']['info']['flipped_fraction']:.2%} |")
    L.append("")

    L += ["## Fig. 4 — domain PSNR vs γ (dB)", "",
          f"Every cell trains {p['ablation_epochs']} epochs; otherwise the main ZFDA setting.", ""]
    head = ["domain", "γ", *[f"{m} / {a}" for m, a in ABLATION_VARIANTS], "baseline DA"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in codes:
        for g in p["gammas"]:
            cells = {(r["mask"], r["allocation"]): r["psnr"] for r in res["fig4"][c] if r["gamma"] == g}
            L.append(f"| {c} | {g:.2%} | " + " | ".join(f"{cells[v]:.2f}" for v in ABLATION_VARIANTS)
                     + f" | {doms[c]['baseline_da']['psnr']['domain']:.2f} |")
    avg = {v: _mean(r["psnr"] for c in codes for r in res["fig4"][c] if (r["mask"], r["allocation"]) == v)
           for v in ABLATION_VARIANTS}
    opt_gain = _mean([avg[("optimised", "linear")] - avg[("fixed", "linear")],
                      avg[("optimised", "uniform")] - avg[("fixed", "uniform")]])
    lin_gain = _mean([avg[("optimised", "linear")] - avg[("optimised", "uniform")],
                      avg[("fixed", "linear")] - avg[("fixed", "uniform")]])
    L += ["", f"Mean over domains and γ: optimised mask vs fixed {opt_gain:+.2f} dB (paper +0.73 dB); "
              f"linear vs uniform allocation {lin_gain:+.2f} dB (paper +1.13 dB).", ""]

    L += ["## Score optimiser ablation "
          f"(domain {p['optimiser_ablation_domain']}, γ = {p['zfda']['sparsity']:.2%}, {p['zfda']['epochs']} epochs)", "",
          "| setting | domain PSNR | mask entries flipped |", "|---|---|---|"]
    for r in res["optimiser_ablation"]:
        L.append(f"| {r['name']} | {r['psnr']:.2f} | {r['flipped_fraction']:.3%} |")
    L.append("")

    L += ["## Memory — patch vs model", "",
          "| γ | modified weights | model bytes | patch fp32 | ratio | patch compact | ratio | compact PSNR cost |",
          "|---|---|---|---|---|---|---|---|"]
    for r in res["memory"]:
        L.append(f"| {r['gamma']:.2%} | {r['num_modified']} | {_fmt_bytes(r['model_bytes'])} | "
                 f"{_fmt_bytes(r['patch_bytes']['fp32'])} | {r['patch_ratio']['fp32']:.2%} | "
                 f"{_fmt_bytes(r['patch_bytes']['compact'])} | {r['patch_ratio']['compact']:.2%} | "
                 f"{round(r['compact_psnr_cost_db'], 4) + 0.0:.4f} dB |")
    L += ["", "## Checks", "",
          f"- (a) baseline DA misaligns both Tx-adapted and Rx-adapted pairs (> 0.5 dB mean drop per case): "
          f"**{ch['a_baseline_da_misaligns']}**",
          f"- (b) ZFDA switched off: 0.000 dB drop, outputs and state bit-identical: **{ch['b_zfda_off_exact']}**",
          f"- (c) ZFDA above the un-adapted model in every domain: **{ch['c_zfda_beats_unadapted']}**",
          f"- (d) the pre-trained base converged (last epoch {ch['pretrain_last_epoch_gain_db']:+.3f} dB, "
          f"< {CONVERGED_GAIN_DB} dB): **{ch['d_base_converged']}**",
          f"- (e) baseline DA trains at least as many epochs as ZFDA ({p['da']['epochs']} vs {p['zfda']['epochs']}): "
          f"**{ch['e_da_epochs_ge_zfda']}**",
          f"- (f) ZFDA − baseline DA per domain, goal ≥ −{ZFDA_GOAL_DB} dB: "
          + ", ".join(f"{c} {v:+.2f} dB{'' if v >= -ZFDA_GOAL_DB else ' (MISSED)'}" for c, v in ch["zfda_minus_da_db"].items())
          + f": **{ch['f_zfda_within_goal']}**",
          f"- Realignment ends at most {REALIGN_SLACK_DB} dB above the aligned pair (most above, over domains and "
          "cases: " + ", ".join(f"{m} {v:+.2f} dB" for m, v in ch["realignment_above_aligned_db"].items())
          + f"): **{ch['realignment_within_slack']}**", ""]
    return "\n".join(L)


# ------------------------------------------------------------------------------------- several seeds
def _mean_std(xs) -> dict:
    xs = [float(x) for x in xs]
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return {"mean": m, "std": sd, "values": xs}


def _pm(ms: dict, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`_mean_std` summary, 2 decimals (``signed``: the mean with its sign)."""
    return f"{ms['mean']:{'+' if signed else ''}.2f} ± {ms['std']:.2f}"


def _per_seed(ms: dict) -> str:
    """The per-seed values of a :func:`_mean_std` summary, signed, 2 decimals."""
    return ", ".join(f"{v:+.2f}" for v in ms["values"])


def aggregate_seeds(reports: list[dict]) -> dict:
    """Mean ± sample std over runs of one preset with different seeds: pre-trained PSNR, per domain
    un-adapted / baseline DA / ZFDA / ZFDA − DA, the Fig. 4 ablation gains and the misalignment drops."""
    seeds = [r["seed"] for r in reports]
    res = [r["results"] for r in reports]
    out: dict = {"preset": reports[0]["preset"]["name"], "seeds": seeds, "link": reports[0].get("link"),
                 "aligned": _mean_std(r["pretrain"]["psnr"]["aligned"] for r in res),
                 "pretrain_last_epoch_gain_db": _mean_std(r["checks"]["pretrain_last_epoch_gain_db"] for r in res),
                 "domains": {}, "ablation": {}, "misalignment_drop_db": {}}
    for c in res[0]["domains"]:
        out["domains"][c] = {
            "unadapted": _mean_std(r["domains"][c]["baseline_da"]["psnr"]["domain_pretrained"] for r in res),
            "baseline_da": _mean_std(r["domains"][c]["baseline_da"]["psnr"]["domain"] for r in res),
            "zfda": _mean_std(r["domains"][c]["zfda"]["psnr"]["domain"] for r in res),
            "zfda_minus_da": _mean_std(r["checks"]["zfda_minus_da_db"][c] for r in res)}
    for side in ("tx", "rx"):
        out["misalignment_drop_db"][side] = _mean_std(_mean(r["checks"][f"misalignment_drop_{side}_db"].values())
                                                      for r in res)

    def variant_mean(r, mask, alloc):
        return _mean(x["psnr"] for rows in r["fig4"].values() for x in rows
                     if x["mask"] == mask and x["allocation"] == alloc)

    opt, lin = [], []
    for r in res:
        v = {k: variant_mean(r, *k) for k in ABLATION_VARIANTS}
        opt.append(_mean([v[("optimised", "linear")] - v[("fixed", "linear")],
                          v[("optimised", "uniform")] - v[("fixed", "uniform")]]))
        lin.append(_mean([v[("optimised", "linear")] - v[("optimised", "uniform")],
                          v[("fixed", "linear")] - v[("fixed", "uniform")]]))
    out["ablation"] = {"optimised_minus_fixed_db": _mean_std(opt), "linear_minus_uniform_db": _mean_std(lin)}
    out["checks_required_hold"] = {k: [bool(r["checks"][k]) for r in res] for k in CHECKS_REQUIRED}
    out["f_zfda_within_goal"] = [bool(r["checks"]["f_zfda_within_goal"]) for r in res]
    out["wall_s"] = [r_["timings_s"]["total"] for r_ in reports]
    return out


def seeds_md(agg: dict) -> str:
    """The Markdown summary of :func:`aggregate_seeds`."""
    L = [f"# ZFDA reproduction — preset `{agg['preset']}`, seeds {', '.join(map(str, agg['seeds']))}, "
         f"link `{agg['link']}`: mean ± std (sample std over seeds)", "",
         f"Pre-trained (aligned) PSNR: {_pm(agg['aligned'])} dB; last pre-training epoch "
         f"{agg['pretrain_last_epoch_gain_db']['mean']:+.3f} ± {agg['pretrain_last_epoch_gain_db']['std']:.3f} dB.", "",
         "| domain | un-adapted | baseline DA | ZFDA | ZFDA − DA | per seed ZFDA − DA |", "|---|---|---|---|---|---|"]
    for c, d in agg["domains"].items():
        L.append(f"| {c} | {_pm(d['unadapted'])} | {_pm(d['baseline_da'])} | {_pm(d['zfda'])} | "
                 f"{_pm(d['zfda_minus_da'], True)} | {_per_seed(d['zfda_minus_da'])} |")
    a = agg["ablation"]
    L += ["", "| Fig. 4 ablation (mean over domains and γ) | mean ± std | per seed | paper |", "|---|---|---|---|",
          f"| optimised − fixed mask | {_pm(a['optimised_minus_fixed_db'], True)} dB"
          f" | {_per_seed(a['optimised_minus_fixed_db'])} | +0.73 dB |",
          f"| linear − uniform allocation | {_pm(a['linear_minus_uniform_db'], True)} dB"
          f" | {_per_seed(a['linear_minus_uniform_db'])} | +1.13 dB |",
          "", "| misalignment drop (mean over domains) | mean ± std |", "|---|---|"]
    for side, d in agg["misalignment_drop_db"].items():
        L.append(f"| {side.upper()} adapted | {_pm(d)} dB |")
    L += ["", "Checks (a)–(e) per seed: " + "; ".join(f"{k}: {v}" for k, v in agg["checks_required_hold"].items()),
          f"(f) ZFDA within {ZFDA_GOAL_DB} dB of DA in every domain, per seed: {agg['f_zfda_within_goal']}",
          "Wall time per seed: " + ", ".join(f"{w:.0f} s" for w in agg["wall_s"]), ""]
    return "\n".join(L)


def _write_seeds(out: str, json_name: str, agg: dict, md_fn) -> None:
    """A multi-seed summary: ``out/json_name`` and ``out/seeds.md`` (``md_fn(agg)``, also printed)."""
    md = md_fn(agg)
    _write_outputs(out, json_name, agg, "seeds.md", md)
    print(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparse_sam.experiments.reproduce", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted([*PRESETS, "sweep", "budget"]), default="quick",
                    help="sweep: the learning-rate sweeps and ZFDA lever table on the quick preset's data and "
                         "pre-trained model; budget: ZFDA against DA at several budgets γ and base widths "
                         "(both in sparse_sam.experiments.sweep)")
    ap.add_argument("--data", choices=("embedded", "cifar100"), default="embedded")
    ap.add_argument("--root", default=None, help="CIFAR-100 folder (cifar-100-python or its parent)")
    ap.add_argument("--out", default=None, help="output folder (default results/<preset>)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default=None,
                    help="comma-separated seeds (e.g. 0,1,2): one run per seed under OUT/seed<N>, plus "
                         "OUT/seeds.md and OUT/seeds.json with mean ± std over the seeds")
    ap.add_argument("--no-cache", action="store_true",
                    help=f"pre-train even if a cached model exists (cache: ${CACHE_ENV} or ~/.cache/sparse_sam)")
    ap.add_argument("--link", default="identity",
                    help="channel between Tx and Rx: identity (paper), awgn:SNR_DB, or dmc:P[:BITS] (default 4 bits)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars or log lines")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    a = ap.parse_args(argv)
    if a.data == "cifar100" and a.root is None:
        ap.error("--data cifar100 needs --root PATH")
    try:
        make_link(a.link)
    except ValueError as e:
        ap.error(f"--link: {e}")
    seeds = [a.seed]
    if a.seeds is not None:
        try:
            seeds = [int(v) for v in a.seeds.split(",") if v.strip()]
        except ValueError:
            ap.error(f"--seeds: comma-separated integers expected, got {a.seeds!r}")
        if not seeds or len(set(seeds)) != len(seeds):
            ap.error(f"--seeds: distinct integers expected, got {a.seeds!r}")
    out = a.out or os.path.join("results", a.preset)
    cache_dir = None if a.no_cache else default_cache_dir()
    if a.preset == "sweep":
        from .sweep import aggregate_sweep, run_sweep, sweep_md, sweep_seeds_md

        reps = []
        for s in seeds:
            reps.append(run_sweep(PRESETS["quick"], a.data, a.root, out if a.seeds is None else os.path.join(out, f"seed{s}"),
                                  s, a.device, not a.no_progress, a.link, cache_dir))
            print(sweep_md(reps[-1]))
        if a.seeds is not None:
            _write_seeds(out, "sweep_seeds.json", aggregate_sweep(reps), sweep_seeds_md)
        return 0
    if a.preset == "budget":
        from .sweep import aggregate_budget, budget_md, budget_seeds_md, run_budget

        reps = [run_budget(PRESETS["quick"], a.data, a.root, out if a.seeds is None else os.path.join(out, f"seed{s}"),
                           s, a.device, not a.no_progress, a.link, cache_dir) for s in seeds]
        if a.seeds is None:
            print(budget_md(reps[0]))
            return 0
        agg = aggregate_budget(reps)
        _write_seeds(out, "budget_seeds.json", agg, budget_seeds_md)
        if not a.no_plots:
            from . import plots

            plots.budget(agg, os.path.join(out, "budget.png"))
        return 0
    if a.seeds is None:
        report = run(PRESETS[a.preset], a.data, a.root, out, a.seed, a.device, not a.no_progress, not a.no_plots,
                     link=a.link, cache_dir=cache_dir)
        print(tables_md(report))
        return 0 if all(report["results"]["checks"][k] for k in CHECKS_REQUIRED) else 1
    reports = [run(PRESETS[a.preset], a.data, a.root, os.path.join(out, f"seed{s}"), s, a.device,
                   not a.no_progress, not a.no_plots, link=a.link, cache_dir=cache_dir) for s in seeds]
    _write_seeds(out, "seeds.json", aggregate_seeds(reports), seeds_md)
    return 0 if all(r["results"]["checks"][k] for r in reports for k in CHECKS_REQUIRED) else 1


if __name__ == "__main__":
    sys.exit(main())
