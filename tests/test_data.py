"""Data loaders (CIFAR-100 python format on synthetic files, embedded photos), domains and links."""
import math
import os
import pickle

import numpy as np
import pytest
import torch

from sparse_sam.experiments import autoencoder as AE
from sparse_sam.experiments import data as D
from sparse_sam.experiments import domains as V


# ------------------------------------------------------------------------------ synthetic CIFAR-100
def _write_cifar(folder, n_classes=100, per_class_train=3, per_class_test=2, bytes_keys=True, seed=0):
    """Files laid out exactly like cifar-100-python: pickled dicts, uint8 (N, 3072) CHW rows."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    # The official files were written by Python 2 (protocol 2, bytes keys); protocol 2 also for str keys.
    proto = 2
    names = [f"class_{i:03d}" for i in range(n_classes)]
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({k("fine_label_names"): [k(n) for n in names],
                     k("coarse_label_names"): [k("c")]}, f, protocol=proto)
    out = {}
    for split, per in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(n_classes), per)
        rng.shuffle(labels)
        data = rng.integers(0, 256, size=(labels.size, 3072), dtype=np.uint8)
        with open(os.path.join(folder, split), "wb") as f:
            pickle.dump({k("filenames"): [k(f"{i}.png") for i in range(labels.size)], k("batch_label"): k(split),
                         k("fine_labels"): labels.tolist(), k("coarse_labels"): [0] * labels.size,
                         k("data"): data}, f, protocol=proto)
        out[split] = (data, labels)
    return names, out


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar100_loader_split_and_layout(tmp_path, bytes_keys):
    folder = tmp_path / "cifar-100-python"
    names, raw = _write_cifar(str(folder), bytes_keys=bytes_keys)
    s = D.load_cifar100(str(tmp_path), seed=3)  # the parent folder is accepted too
    assert len(s.orig_classes) == 80 and len(s.dom_classes) == 10
    assert not set(s.orig_classes) & set(s.dom_classes)
    assert s.sizes() == {"orig_train": 240, "orig_test": 160, "dom_train": 30, "dom_test": 20}
    for t in (s.orig_train, s.orig_test, s.dom_train, s.dom_test):
        assert t.dtype == torch.float32 and t.shape[1:] == (3, 32, 32)
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    # CHW layout and order: the j-th domain test image is the j-th test row whose label is a domain class.
    data, labels = raw["test"]
    dom_ids = {names.index(n) for n in s.dom_classes}
    rows = data[[i for i, y in enumerate(labels) if y in dom_ids]]
    r = rows[5]
    for c, h, w in ((0, 0, 0), (1, 7, 30), (2, 31, 3)):
        assert s.dom_test[5, c, h, w].item() == float(np.float32(r[c * 1024 + h * 32 + w]) / np.float32(255))
    # Same seed, same split; another seed, another split.
    assert D.load_cifar100(str(folder), seed=3).dom_classes == s.dom_classes
    assert D.load_cifar100(str(folder), seed=4).dom_classes != s.dom_classes


def test_cifar100_caps_and_errors(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_cifar(str(folder))
    s = D.load_data("cifar100", str(folder), n_orig_train=50, n_dom_test=7)
    assert s.sizes()["orig_train"] == 50 and s.sizes()["dom_test"] == 7 and s.sizes()["orig_test"] == 160
    with pytest.raises(FileNotFoundError, match="train"):
        os.remove(folder / "train")
        D.load_cifar100(str(folder))
    with pytest.raises(ValueError, match="--root"):
        D.load_data("cifar100", None)
    with pytest.raises(ValueError, match="unknown data source"):
        D.load_data("imagenet")


def test_cifar100_rejects_bad_data(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(str(folder))
    with open(folder / "test", "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "fine_labels": [0, 1, 2, 3]}, f, protocol=2)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        D.load_cifar100(str(folder))


# ------------------------------------------------------------------------------ embedded photos
def test_embedded_deterministic_and_disjoint():
    pytest.importorskip("skimage")
    a = D.load_embedded(60, 20, 30, 12, seed=1)
    b = D.load_embedded(60, 20, 30, 12, seed=1)
    c = D.load_embedded(60, 20, 30, 12, seed=2)
    assert a.sizes() == {"orig_train": 60, "orig_test": 20, "dom_train": 30, "dom_test": 12}
    for k in ("orig_train", "orig_test", "dom_train", "dom_test"):
        x = getattr(a, k)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 32, 32)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        assert torch.equal(x, getattr(b, k))
        assert not torch.equal(x, getattr(c, k))
    assert not set(a.orig_classes) & set(a.dom_classes)
    # Flat crops are redrawn: every patch has some texture.
    assert float(a.orig_train.flatten(1).std(1).min()) > 0.0


# ------------------------------------------------------------------------------ domains
@pytest.fixture
def imgs():
    g = torch.Generator().manual_seed(0)
    # Smooth random images (not noise) so resampling differences stay small.
    low = torch.rand(6, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(low, size=(32, 32), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("code", V.DOMAINS)
def test_domain_is_seeded_shape_preserving_and_changes_images(imgs, code):
    a, b, c = V.apply_domain(imgs, code, 5), V.apply_domain(imgs, code, 5), V.apply_domain(imgs, code, 6)
    assert a.shape == imgs.shape and a.dtype == imgs.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert float((a - imgs).abs().mean()) > 0.02


def test_domain_ops_identities(imgs):
    z = torch.zeros(imgs.shape[0], dtype=torch.float64)
    torch.testing.assert_close(V.rotate(imgs, z), imgs, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.rotate(imgs, z + 90), torch.rot90(imgs, 1, dims=(2, 3)), atol=1e-4, rtol=0)
    unit = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]]).expand(imgs.shape[0], 4, 2)
    torch.testing.assert_close(V.perspective(imgs, unit), imgs, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.contrast(imgs, z + 1), imgs, atol=1e-6, rtol=0)
    torch.testing.assert_close(V.hue_rotate(imgs, z), imgs, atol=1e-5, rtol=0)
    torch.testing.assert_close(V.hue_rotate(imgs, z + 360), imgs, atol=1e-5, rtol=0)


def test_hue_rotation_keeps_luma():
    x = 0.4 + 0.2 * torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))  # far from clamping
    y = V.hue_rotate(x, torch.full((4,), 40.0))
    luma = lambda t: (t * V._RGB2YIQ[0].view(1, 3, 1, 1)).sum(1)  # noqa: E731
    torch.testing.assert_close(luma(y), luma(x), atol=1e-5, rtol=0)
    assert float((y - x).abs().max()) > 0.01


def test_domain_errors_and_grid(tmp_path, imgs):
    with pytest.raises(ValueError, match="unknown domain 'VX'"):
        V.apply_domain(imgs, "VX")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        V.apply_domain(imgs[:, :1], "VA")
    pytest.importorskip("matplotlib")
    path = tmp_path / "grid.png"
    V.save_domain_grid(imgs, str(path), n=4)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ autoencoder, links
def test_autoencoder_shapes_and_pairing():
    torch.manual_seed(0)
    a, b = AE.SemanticAutoencoder(4).eval(), AE.SemanticAutoencoder(4).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        z = a.encode(x)
    assert z.shape == (3, *AE.SEMANTIC_SHAPE) and z[0].numel() == AE.SEMANTIC_DIM
    with torch.no_grad():
        y = a(x)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert len(a.tx_layers()) == 6 and len(a.rx_blocks()) == 6
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in a.decoder.modules()) == 6
    assert torch.equal(AE.transmit(a, b, x), b.decode(a.encode(x)))
    with pytest.raises(ValueError, match="width"):
        AE.SemanticAutoencoder(0)


def test_links():
    torch.manual_seed(0)
    z = 3 * torch.randn(5, 8, 8, 8)
    n = AE.AWGNLink(100.0)(z)  # negligible noise: what is left is the power normalisation
    torch.testing.assert_close(n.flatten(1).pow(2).mean(1), torch.ones(5), atol=1e-4, rtol=0)
    noisy = AE.AWGNLink(0.0)(z)
    assert float((noisy - AE._power_normalise(z)).pow(2).mean()) == pytest.approx(1.0, rel=0.1)
    q = AE.DMCLink(0.0, bits=3, clip=2.0)(z)
    levels = torch.linspace(-2, 2, 8)
    assert torch.isin(q.round(decimals=5), levels.round(decimals=5)).all()
    flipped = AE.DMCLink(1.0, bits=3, clip=2.0)(z)
    assert not torch.isclose(flipped, q).any()  # p = 1: every symbol becomes another level
    zr = z.clone().requires_grad_(True)
    AE.DMCLink(0.1)(zr).sum().backward()
    assert torch.equal(zr.grad, ((z >= -3) & (z <= 3)).float())  # straight-through inside the clip range
    assert isinstance(AE.make_link("awgn:10"), AE.AWGNLink) and AE.make_link("dmc:0.1:4").bits == 4
    with pytest.raises(ValueError, match="unknown link"):
        AE.make_link("rayleigh")
    with pytest.raises(ValueError, match="crossover"):
        AE.DMCLink(1.5)
    assert math.isfinite(float(AE.make_link(None)(z).sum()))
