"""The experiment pipeline: method accounting on a tiny model, and the whole `ci` preset end to end."""
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
