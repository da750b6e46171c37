"""PNG figures of a reproduction run (matplotlib, imported lazily; Agg backend, no display needed)."""
from __future__ import annotations

from .domains import save_domain_grid

__all__ = ["budget", "fig2", "fig3", "fig4", "memory"]


def _gamma_axis(ax, gammas_pct) -> None:
    # Label exactly the γ values that were run; log-axis defaults print them as 3×10⁻¹.
    ax.set_xscale("log")
    ax.set_xticks(gammas_pct, [f"{g:g}" for g in gammas_pct])
    ax.minorticks_off()


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib (pip install 'sparse_sam[experiments]'), "
                          "or pass --no-plots") from e
    return plt


def _save(plt, fig, path: str, title: str | None = None) -> None:
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig2(data, seed: int, path: str) -> None:
    """Samples of the original domain and of VA/VP/VC/VH (paper Fig. 2), from the domain test images."""
    save_domain_grid(data.dom_test, path, seed=seed, n=8)


def fig3(report: dict, path: str) -> None:
    """Paper Fig. 3: original-domain PSNR per domain and method, Tx adapted (left) and Rx adapted (right)."""
    plt = _plt()
    res, p = report["results"], report["preset"]
    codes = list(res["domains"])
    slf = [f"slf_F{f}" for f in p["slf_frozen"]]
    series = ["aligned", "misaligned", "tuning", "equalizer", *slf, "ZFDA (off)"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(series)
    for ax, side in zip(axes, ("tx", "rx")):
        for j, s in enumerate(series):
            vals = []
            for c in codes:
                d = res["domains"][c]
                rr = {r["method"]: r for r in d["realign"][side]}
                if s == "aligned":
                    vals.append(d["baseline_da"]["psnr"]["aligned"])
                elif s == "misaligned":
                    vals.append(d["baseline_da"]["psnr"][f"{side}_adapted"])
                elif s == "ZFDA (off)":
                    vals.append(d["zfda"]["psnr"][f"{side}_adapted"])
                else:
                    vals.append(rr[s]["psnr"]["realigned"])
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(codes))]
            ax.bar(xs, vals, width, label=s.replace("slf_F", "SLF F="))
        ax.set_xticks(range(len(codes)), codes)
        ax.set_title(f"{side.upper()} AI adapted")
        ax.set_ylabel("PSNR on original domain (dB)")
        lo = min(d["baseline_da"]["psnr"][f"{s}_adapted"] for d in res["domains"].values() for s in ("tx", "rx"))
        ax.set_ylim(max(0.0, lo - 3), None)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    _save(plt, fig, path, f"Misalignment and realignment (preset {p['name']}, {report['data']['source']})")


def fig4(report: dict, path: str) -> None:
    """Paper Fig. 4: domain PSNR vs γ for {optimised, fixed} × {linear, uniform}, with baseline DA."""
    plt = _plt()
    res, p = report["results"], report["preset"]
    codes = list(res["fig4"])
    fig, axes = plt.subplots(1, len(codes), figsize=(3.6 * len(codes), 3.4), squeeze=False)
    styles = {("optimised", "linear"): "o-", ("optimised", "uniform"): "s--", ("fixed", "linear"): "^-",
              ("fixed", "uniform"): "v--"}
    for ax, c in zip(axes[0], codes):
        rows = res["fig4"][c]
        for v, st in styles.items():
            pts = sorted((r["gamma"], r["psnr"]) for r in rows if (r["mask"], r["allocation"]) == v)
            ax.plot([g * 100 for g, _ in pts], [q for _, q in pts], st, label=f"{v[0]} mask, {v[1]}")
        d = res["domains"][c]["baseline_da"]["psnr"]
        ax.axhline(d["domain"], color="k", ls=":", label="baseline DA")
        ax.axhline(d["domain_pretrained"], color="gray", ls="-.", label="un-adapted")
        _gamma_axis(ax, sorted({r["gamma"] * 100 for r in rows}))
        ax.set_xlabel("sparsity γ (%)")
        ax.set_title(c)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("domain PSNR (dB)")
    axes[0][-1].legend(fontsize=7)
    _save(plt, fig, path, f"Domain PSNR vs sparsity (preset {p['name']})")


def memory(report: dict, path: str) -> None:
    """Patch bytes (fp32 and compact encodings) against the model's weight bytes, per γ."""
    plt = _plt()
    rows = report["results"]["memory"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    gs = [r["gamma"] * 100 for r in rows]
    for enc, st in (("fp32", "o-"), ("compact", "s-")):
        ax.plot(gs, [r["patch_bytes"][enc] for r in rows], st, label=f"patch ({enc})")
    ax.axhline(rows[0]["model_bytes"], color="k", ls=":", label="model weights (fp32)")
    _gamma_axis(ax, gs)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity γ (%)"), ax.set_ylabel("bytes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(plt, fig, path)


def budget(agg: dict, path: str) -> None:
    """ZFDA − DA (dB) against the number of modified entries, one panel per domain: the budget study
    over seeds (:func:`sparse_sam.experiments.sweep.aggregate_budget`), mean ± std, one line per base
    width, with the ±0.3 dB goal band."""
    plt = _plt()
    doms = agg["domains"]
    fig, axes = plt.subplots(1, len(doms), figsize=(3.2 * len(doms), 3.2), sharey=True, squeeze=False)
    for ax, c in zip(axes[0], doms):
        ax.axhspan(-0.3, 0.3, color="0.9", label="±0.3 dB of DA")
        ax.axhline(0.0, color="0.5", lw=0.8)
        for w, e in agg["widths"].items():
            pts = sorted((z["entries"], z["gap"][c]["mean"], z["gap"][c]["std"], float(g)) for g, z in e["zfda"].items())
            xs, ys, es, gs = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"width {w} ({e['params']:,} params)")
            for x, y, g in zip(xs, ys, gs):
                ax.annotate(f"{100 * g:g}%", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_title(c)
        ax.set_xlabel("modified entries")
    axes[0][0].set_ylabel("ZFDA − baseline DA (dB)")
    axes[0][0].legend(fontsize=7, loc="lower right")
    _save(plt, fig, path, f"Budget study, seeds {', '.join(map(str, agg['seeds']))}: mean ± std")
