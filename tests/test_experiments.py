"""The experiment pipeline: method accounting on a tiny model, and the whole `ci` preset end to end."""
import importlib.util
import json
import math
from dataclasses import replace

import pytest
import torch

from sparse_sam.experiments import methods as M
from sparse_sam.experiments.autoencoder import AWGNLink, DMCLink, SemanticAutoencoder
from sparse_sam.experiments.reproduce import PRESETS, main, run


def test_psnr_per_image():
    x = torch.rand(4, 3, 32, 32)
    y = x.clone()
    y[0] += 0.1            # MSE 0.01 -> 20 dB
    y[1] += 0.01           # MSE 1e-4 -> 40 dB
    p = M.psnr(y, x)
    torch.testing.assert_close(p[:2], torch.tensor([20.0, 40.0]), atol=1e-3, rtol=0)
    assert p[2] == 100.0   # perfect reconstruction is capped, not infinite


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    low = torch.rand(96, 3, 8, 8, generator=g)
    imgs = torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)
    sc = M.Scenario(imgs[:48], imgs[48:64], imgs[64:80], imgs[80:].flip(1), "VX", progress=False)
    pre = M.pretrain(sc, M.TrainConfig(epochs=2, lr=1e-2, batch_size=16), width=4).artifact
    sc = replace(sc, pretrained=pre)
    da = M.baseline_da(sc, M.TrainConfig(epochs=2, lr=1e-2, batch_size=16))
    return replace(sc, adapted=da.artifact), da


def test_zfda_switch_off_is_bit_exact_and_pretrained_untouched(tiny):
    sc, _ = tiny
    before = {k: v.clone() for k, v in sc.pretrained.state_dict().items()}
    r = M.zfda(sc, M.ZFDAConfig(sparsity=0.05, epochs=2, batch_size=16, lr_scores=0.05, lr_delta=1e-2))
    for k, v in sc.pretrained.state_dict().items():  # BatchNorm buffers included
        assert torch.equal(v, before[k]), k
    assert r.info["state_bit_identical"] and r.info["outputs_bit_identical"]
    assert r.psnr["tx_adapted"] == r.psnr["aligned"] == r.psnr["rx_adapted"]
    assert r.psnr["domain_fp32"] == r.psnr["domain"]  # exported patch == live patched model
    assert r.bytes_exchanged == 0 and r.extra_params == 0
    assert r.info["patch_bytes"]["compact"] < r.info["patch_bytes"]["fp32"] < r.info["model_bytes"]
    assert len(r.info["flipped_per_epoch"]) == 2 and r.info["flipped_fraction"] > 0


def test_zfda_paper_literal_rule_flips_nothing(tiny):
    sc, _ = tiny
    r = M.zfda(sc, M.ZFDAConfig(sparsity=0.05, epochs=2, batch_size=16, optimizer="sgd", lr_scores=1.0,
                                lr_delta=1e-4, delta_grad="masked"))
    assert r.info["flipped_fraction"] == 0.0


def test_realignment_costs(tiny):
    sc, da = tiny
    for side in ("tx", "rx"):
        rs = replace(sc, side=side)
        t = M.tuning(rs, M.RealignConfig(n_samples=32, steps=4))
        assert t.bytes_exchanged == 32 * (2 * 512 * 4 + 3072) and t.extra_params == 0
        assert t.psnr["misaligned"] == pytest.approx(da.psnr[f"{side}_adapted"], abs=1e-6)
        e = M.equalizer(rs, M.RealignConfig(n_samples=32, epochs=1, hidden=16))
        assert e.extra_params == 512 * 16 + 16 + 16 * 512 + 512
        assert e.bytes_exchanged == 32 * (512 * 4 + 3072)
        dec = sum(t.numel() * 4 for t in [*sc.pretrained.decoder.parameters(), *sc.pretrained.decoder.buffers()]
                  if t.is_floating_point())
        s0 = M.slf(rs, M.SLFConfig(frozen=0, n_samples=32, epochs=1))
        s6 = M.slf(rs, M.SLFConfig(frozen=6, n_samples=32, epochs=1))
        assert s6.info["upload_bytes"] == 0 and s6.psnr["realigned"] == s6.psnr["misaligned"]
        assert s0.info["download_bytes"] >= dec and s0.info["upload_bytes"] == s0.info["download_bytes"]
        for r in (t, e, s0):
            assert math.isfinite(r.psnr["realigned"]) and r.wall_s > 0
    with pytest.raises(ValueError, match="frozen"):
        M.slf(sc, M.SLFConfig(frozen=7))
    with pytest.raises(ValueError, match="side"):
        M.tuning(replace(sc, side="both"), M.RealignConfig())


def test_ci_pipeline_end_to_end(tmp_path):
    """The whole reproduction, tiny: the quick preset's three claims hold as properties."""
    pytest.importorskip("skimage")
    pytest.importorskip("matplotlib")
    out = tmp_path / "ci"
    report = run(PRESETS["ci"], "embedded", out=str(out), seed=0, progress=False)
    ch = report["results"]["checks"]
    # (a) baseline DA misaligns both cases, measurably (mean over domains per case).
    for side in ("tx", "rx"):
        drops = list(ch[f"misalignment_drop_{side}_db"].values())
        assert len(drops) == 4 and sum(drops) / 4 > 0.5, (side, drops)
    assert ch["a_baseline_da_misaligns"]
    # (b) ZFDA switched off: exactly zero drop, bit-identical outputs.
    assert all(v == 0.0 for v in ch["zfda_switched_off_drop_db"].values()) and ch["b_zfda_off_exact"]
    # (c) ZFDA improves on the un-adapted model in every domain.
    assert all(v > 0 for v in ch["zfda_gain_over_unadapted_db"].values()) and ch["c_zfda_beats_unadapted"]
    # (d) the cosine-annealed base gains less than 0.1 dB in its last epoch (held at the final rate).
    per = report["results"]["pretrain"]["info"]["psnr_per_epoch"]
    assert len(per) == PRESETS["ci"].pretrain.epochs and ch["pretrain_last_epoch_gain_db"] == per[-1] - per[-2]
    assert ch["pretrain_last_epoch_gain_db"] < 0.1 and ch["d_base_converged"]
    # (e) DA trains at least as long as ZFDA; (f) ZFDA − DA is reported per domain (at this size ZFDA
    # trails DA: the tiny net has few weights per γ), and the verdict matches the numbers.
    assert ch["e_da_epochs_ge_zfda"] is True
    doms = report["results"]["domains"]
    for c, v in ch["zfda_minus_da_db"].items():
        assert v == doms[c]["zfda"]["psnr"]["domain"] - doms[c]["baseline_da"]["psnr"]["domain"]
    assert ch["f_zfda_within_goal"] == all(v >= -0.3 for v in ch["zfda_minus_da_db"].values())
    # Every realignment method is bounded by the aligned pair here (the realignment bound holds).
    assert set(ch["realignment_above_aligned_db"]) == {"tuning", "equalizer", "slf_F3"}
    assert ch["realignment_within_slack"] and all(v <= 0.3 for v in ch["realignment_above_aligned_db"].values())
    # Every realignment baseline reports PSNR and cost, in every domain and case.
    for d in report["results"]["domains"].values():
        for side in ("tx", "rx"):
            names = {r["method"] for r in d["realign"][side]}
            assert {"tuning", "equalizer"} <= names and any(n.startswith("slf_F") for n in names)
            assert all(r["bytes_exchanged"] > 0 and math.isfinite(r["psnr"]["realigned"]) for r in d["realign"][side])
    lit = [r for r in report["results"]["optimiser_ablation"] if r["name"].startswith("paper literal")]
    assert lit and lit[0]["flipped_fraction"] == 0.0
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 0 and saved["versions"]["torch"] == torch.__version__
    assert saved["results"]["checks"] == json.loads(json.dumps(ch))
    tables = (out / "tables.md").read_text()
    assert "ZFDA switched off, drop | 0.000 dB" in tables and "Memory" in tables
    assert "(d) the pre-trained base converged" in tables and "(f) ZFDA − baseline DA per domain" in tables
    # Several seeds: mean and sample std per number (a second "seed" made by shifting every ZFDA PSNR).
    import copy

    from sparse_sam.experiments.reproduce import aggregate_seeds, checks, seeds_md

    other = copy.deepcopy(report)
    other["seed"] = 1
    for d in other["results"]["domains"].values():
        d["zfda"]["psnr"]["domain"] += 1.0
    other["results"]["checks"] = checks(other["results"], other["preset"])
    agg = aggregate_seeds([report, other])
    assert agg["seeds"] == [0, 1]
    for c, d in agg["domains"].items():
        z0 = doms[c]["zfda"]["psnr"]["domain"]
        assert d["zfda"]["mean"] == pytest.approx(z0 + 0.5) and d["zfda"]["std"] == pytest.approx(2 ** -0.5)
        assert d["baseline_da"]["std"] == 0.0
        assert d["zfda_minus_da"]["values"][1] - d["zfda_minus_da"]["values"][0] == pytest.approx(1.0)
    assert agg["ablation"]["optimised_minus_fixed_db"]["std"] == 0.0  # fig4 numbers are unchanged
    md = seeds_md(agg)
    assert "| VA |" in md and "± 0.71" in md
    for png in ("fig2_domains.png", "fig3_misalignment.png", "fig4_adaptation.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_rejects_cifar_without_root():
    with pytest.raises(SystemExit):
        main(["--data", "cifar100"])


@pytest.mark.parametrize("bad", ["awgn:loud", "dmc:1.5", "fibre:3"])
def test_cli_rejects_bad_link(bad, capsys):
    with pytest.raises(SystemExit):
        main(["--link", bad])
    assert "--link" in capsys.readouterr().err


@pytest.mark.parametrize("spec, cls", [("awgn:5", AWGNLink), ("dmc:0.05:3", DMCLink)])
def test_noisy_link_runs_through_the_methods_reproducibly(tiny, spec, cls):
    """A noisy link sits in the pre-trained model and every copy of it; evaluations draw the same
    channel noise each time and leave the global RNG alone, so ZFDA switched off stays exact."""
    sc, _ = tiny
    sc = replace(sc, link=spec, adapted=None)
    pre = M.pretrain(sc, M.TrainConfig(epochs=1, lr=1e-2, batch_size=16), width=4).artifact
    assert isinstance(pre.link, cls)
    state = torch.random.get_rng_state()
    a = M.pair_outputs(pre, pre, sc.orig_test)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, M.pair_outputs(pre, pre, sc.orig_test))
    clean = SemanticAutoencoder(4)
    clean.load_state_dict(pre.state_dict())
    assert not torch.equal(a, M.pair_outputs(clean, clean, sc.orig_test))  # the channel does something
    r = M.zfda(replace(sc, pretrained=pre), M.ZFDAConfig(sparsity=0.05, epochs=1, batch_size=16, lr_scores=0.05,
                                                         lr_delta=1e-2))
    assert r.info["outputs_bit_identical"] and r.psnr["tx_adapted"] == r.psnr["aligned"]


def test_autoencoder_width_changes_size():
    n = lambda w: sum(p.numel() for p in SemanticAutoencoder(w).parameters())  # noqa: E731
    assert n(4) < n(8) < n(16)


def test_cosine_schedule_anneals_to_the_final_ratio():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 0.1}])
    sched = M._scheduler(opt, "cosine", 5, 0.01)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: a no-op, keeps the optimiser-then-scheduler order
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing
    assert M._scheduler(opt, "constant", 5, 0.01) is None
    with pytest.raises(ValueError, match="schedule"):
        M._scheduler(opt, "step", 5, 0.01)


def test_pretrain_records_per_epoch_psnr(tiny):
    sc, _ = tiny
    r = M.pretrain(replace(sc, pretrained=None, adapted=None),
                   M.TrainConfig(epochs=3, lr=1e-2, batch_size=16, schedule="cosine"), width=4)
    per = r.info["psnr_per_epoch"]
    assert len(per) == 3 and per[-1] == pytest.approx(r.psnr["aligned"], abs=1e-5)
    assert r.info["last_epoch_gain_db"] == pytest.approx(per[-1] - per[-2])


def test_zfda_warm_start_takes_the_mask_from_first_gradients(tiny):
    """score_init="grad": the initial mask of every layer is the top-k of |∂L/∂W| of the un-patched model."""
    sc, _ = tiny
    cfg = M.ZFDAConfig(sparsity=0.05, epochs=1, batch_size=16, lr_scores=0.05, lr_delta=1e-2, score_init="grad",
                       warm_start_batches=2)
    model = __import__("copy").deepcopy(sc.pretrained)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = M._first_gradients(model, sc, cfg)
    for k, v in model.state_dict().items():  # weights and BatchNorm buffers untouched
        assert torch.equal(v, before[k]), k
    convs = {f"{n}.weight": m for n, m in model.named_modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))}
    assert set(g) == set(convs) and all(g[n].shape == convs[n].weight.shape and g[n].sum() > 0 for n in g)
    # The patched model's initial mask (epochs=0: no training step) is the per-layer top-k of those gradients.
    import sparse_sam

    m2 = __import__("copy").deepcopy(sc.pretrained)
    h = sparse_sam.patch(m2, 0.05, seed=sc.seed)
    ks = {n: layer.k for n, layer in h.layers.items()}
    sparse_sam.unpatch(m2)
    r = M.zfda(sc, replace(cfg, epochs=0, encodings=("fp32",)))
    assert r.info["flipped_fraction"] == 0.0
    got = {layer.name: set(layer.indices.tolist()) for layer in r.artifact.layers}
    assert set(got) == set(ks)
    for n, k in ks.items():
        assert got[n] == set(torch.topk(g[n].flatten(), k).indices.tolist()), n
    with pytest.raises(ValueError, match="score_init"):
        M.zfda(sc, replace(cfg, score_init="zeros"))


def test_pretrained_cache_round_trip(tmp_path, tiny):
    """A second load_or_pretrain with the same key returns the stored model bit for bit, without training;
    another seed is another key; no cache_dir means no file."""
    from sparse_sam.experiments.reproduce import load_or_pretrain

    sc, _ = tiny
    base = replace(sc, pretrained=None, adapted=None)
    preset = replace(PRESETS["ci"], width=4, pretrain=M.TrainConfig(epochs=2, lr=1e-2, batch_size=16))
    a = load_or_pretrain(preset, base, "embedded", cache_dir=str(tmp_path))
    files = list(tmp_path.iterdir())
    assert not a.info["cached"] and len(files) == 1 and "seed0" in files[0].name
    b = load_or_pretrain(preset, base, "embedded", cache_dir=str(tmp_path))
    assert b.info["cached"] and b.info["trained_wall_s"] == pytest.approx(a.wall_s)
    assert b.psnr == a.psnr and b.info["psnr_per_epoch"] == a.info["psnr_per_epoch"]
    for (k, x), y in zip(a.artifact.state_dict().items(), b.artifact.state_dict().values()):
        assert x.dtype == y.dtype and torch.equal(x, y), k
    assert M.evaluate(b.artifact, b.artifact, sc.orig_test) == a.psnr["aligned"]
    load_or_pretrain(preset, replace(base, seed=1), "embedded", cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    c = load_or_pretrain(preset, base, "embedded", cache_dir=None)
    assert not c.info["cached"] and len(list(tmp_path.iterdir())) == 2


def test_cosine_schedule_holds_the_last_epochs():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = M._scheduler(opt, "cosine", 6, 0.1, hold_epochs=2)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1.0) and lrs[3:] == pytest.approx([0.1] * 3) and lrs[2] > 0.1
    with pytest.raises(ValueError, match="hold_epochs"):
        M._scheduler(opt, "cosine", 3, 0.1, hold_epochs=3)


def test_budget_study_tiny(tmp_path):
    """The budget study runs DA and ZFDA per width and γ, and its table states each ZFDA − DA gap."""
    pytest.importorskip("skimage")
    from sparse_sam.experiments.sweep import budget_md, run_budget

    p = replace(PRESETS["ci"], sizes=dict(n_orig_train=256, n_orig_test=32, n_dom_train=64, n_dom_test=32),
                pretrain=replace(PRESETS["ci"].pretrain, epochs=2), da=replace(PRESETS["ci"].da, epochs=1),
                zfda=replace(PRESETS["ci"].zfda, epochs=1))
    rep = run_budget(p, out=str(tmp_path), progress=False, cache_dir=str(tmp_path / "cache"),
                     domains=("VA", "VH"), grid={4: (0.01, 0.05), 6: (0.02,)})
    assert list(rep["widths"]) == ["4", "6"]
    w4, w6 = rep["widths"]["4"], rep["widths"]["6"]
    assert w4["params"] < w6["params"]
    assert list(w4["zfda"]) == ["0.01", "0.05"] and list(w6["zfda"]) == ["0.02"]
    for e in (w4, w6):
        for rows in [e["da"], *e["zfda"].values()]:
            assert set(rows) == {"VA", "VH"}
            assert all(math.isfinite(r["psnr"]) and r["train_loss"] > 0 for r in rows.values())
    # More budget, more modified entries: exactly the budgets patch() allocates on that width's net.
    from sparse_sam.budget import layer_budgets

    for w, e in ((4, w4), (6, w6)):
        for g, rows in e["zfda"].items():
            want = sum(layer_budgets(SemanticAutoencoder(w), float(g)).values())
            assert {r["entries"] for r in rows.values()} == {want}, (w, g)
    assert w4["zfda"]["0.01"]["VA"]["entries"] < w4["zfda"]["0.05"]["VA"]["entries"]
    md = (tmp_path / "tables.md").read_text()
    assert md == budget_md(rep) and json.loads((tmp_path / "budget.json").read_text())["widths"].keys() == {"4", "6"}
    gap = w4["zfda"]["0.05"]["VH"]["psnr"] - w4["da"]["VH"]["psnr"]
    assert f"({gap:+.2f})" in md
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cached base per width
    # Over seeds: the gap's mean and sample std per cell, and the seeds that meet 0.3 dB everywhere.
    import copy

    from sparse_sam.experiments.sweep import aggregate_budget, budget_seeds_md

    rep2 = copy.deepcopy(rep)
    rep2["seed"] = 1
    rep2["widths"]["4"]["zfda"]["0.05"]["VH"]["psnr"] += 1.0
    agg = aggregate_budget([rep, rep2])
    cell = agg["widths"]["4"]["zfda"]["0.05"]["gap"]["VH"]
    assert cell["values"] == pytest.approx([gap, gap + 1.0]) and cell["mean"] == pytest.approx(gap + 0.5)
    assert cell["std"] == pytest.approx(math.sqrt(0.5))
    assert agg["widths"]["4"]["zfda"]["0.01"]["gap"]["VA"]["std"] == 0.0
    within = [min(r["widths"]["4"]["zfda"]["0.05"][c]["psnr"] - r["widths"]["4"]["da"][c]["psnr"]
                  for c in ("VA", "VH")) >= -0.3 for r in (rep, rep2)]
    assert agg["widths"]["4"]["zfda"]["0.05"]["all_within_0.3"] == within
    assert f"{gap + 0.5:+.2f} ± {math.sqrt(0.5):.2f}" in budget_seeds_md(agg)
    if importlib.util.find_spec("matplotlib") is not None:
        from sparse_sam.experiments import plots

        plots.budget(agg, str(tmp_path / "budget.png"))
        assert (tmp_path / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_tiny_and_its_seed_summary(tmp_path):
    """The sweep picks the best of each grid by mean PSNR, its levers start from the ZFDA winner, and the
    multi-seed summary compares each lever with its own seed's reference."""
    pytest.importorskip("skimage")
    import copy

    from sparse_sam.experiments import sweep as S

    p = replace(PRESETS["ci"], sizes=dict(n_orig_train=128, n_orig_test=32, n_dom_train=64, n_dom_test=32),
                pretrain=replace(PRESETS["ci"].pretrain, epochs=2), da=replace(PRESETS["ci"].da, epochs=1),
                zfda=replace(PRESETS["ci"].zfda, epochs=1))
    rep = S.run_sweep(p, out=str(tmp_path), progress=False, cache_dir=str(tmp_path / "cache"), domains=("VH",))
    assert [r["config"]["lr"] for r in rep["da"][:-1]] == list(S.DA_LRS)
    assert rep["da_best"] == max(rep["da"], key=lambda r: r["mean"])["config"]
    for stage in rep["zfda"]:
        assert stage["best"] == max(stage["rows"], key=lambda r: r["mean"])["config"][stage["field"]]
        assert rep["zfda_best"][stage["field"]] == stage["best"]
    assert [r["name"] for r in rep["levers"]] == list(S.lever_rows(M.ZFDAConfig(**rep["zfda_best"])))
    assert rep["levers"][0]["config"] == rep["zfda_best"]
    assert rep["da_2x_epochs"]["config"]["epochs"] == 2 * rep["zfda_best"]["epochs"]
    assert (tmp_path / "tables.md").read_text() == S.sweep_md(rep)

    rep2 = copy.deepcopy(rep)
    rep2["seed"] = 1
    cosine = next(r for r in rep2["levers"] if r["name"] == "cosine schedule")
    cosine["mean"] += 0.5
    rep2["da_reference"]["mean"] -= 0.25
    agg = S.aggregate_sweep([rep, rep2])
    lev = {r["name"]: r for r in agg["levers"]}
    d0 = next(r for r in rep["levers"] if r["name"] == "cosine schedule")["mean"] - rep["levers"][0]["mean"]
    assert lev["cosine schedule"]["delta"]["values"] == pytest.approx([d0, d0 + 0.5])
    assert lev["tuned (reference)"]["delta"]["values"] == [0.0, 0.0]
    g0 = rep["levers"][0]["mean"] - rep["da_reference"]["mean"]
    assert lev["tuned (reference)"]["gap"]["values"] == pytest.approx([g0, g0 + 0.25])
    g2x = next(r for r in rep["levers"] if r["name"] == "2× epochs")["mean"] - rep["da_2x_epochs"]["mean"]
    assert lev["2× epochs"]["gap"]["values"] == pytest.approx([g2x, g2x])
    md = S.sweep_seeds_md(agg)
    assert f"{d0 + 0.25:+.2f} ± {math.sqrt(0.125):.2f}" in md and "| 1 | lr " in md
    rep2["levers"] = rep2["levers"][::-1]
    with pytest.raises(ValueError, match="different levers"):
        S.aggregate_sweep([rep, rep2])
