"""Image data for the experiments: CIFAR-100 (python format, from a local path) or an embedded offline set.

Both sources return :class:`Splits`: float32 tensors of shape ``(N, 3, 32, 32)`` in ``[0, 1]``, split
by class into an *original* domain (pre-training classes) and held-out classes for the local domains,
mirroring the paper's 80 / 10 CIFAR-100 class split. Nothing is ever downloaded.

Equivalent for one CIFAR record (``data`` row ``r``, uint8 of length 3072, laid out CHW)::

    img = torch.from_numpy(r).view(3, 32, 32).float() / 255
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["Splits", "load_cifar100", "load_embedded", "load_data", "EMBEDDED_PRETRAIN_PHOTOS",
           "EMBEDDED_DOMAIN_PHOTOS"]


@dataclass
class Splits:
    """Images in ``[0, 1]``, float32, shape ``(N, 3, 32, 32)``; labels int64 ``(N,)``.

    ``orig_*`` are the pre-training classes (the "original domain"); ``dom_*`` are the held-out classes
    that every local domain is built from (before its variation is applied).
    """
    orig_train: Tensor
    orig_test: Tensor
    dom_train: Tensor
    dom_test: Tensor
    orig_classes: list[str]
    dom_classes: list[str]
    source: str
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {k: int(getattr(self, k).shape[0]) for k in ("orig_train", "orig_test", "dom_train", "dom_test")}


# ------------------------------------------------------------------------------------------ CIFAR-100
def _unpickle(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-100 file not found: {path} (expected the extracted "
                                "'cifar-100-python' folder with train, test and meta)")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    # The official files have bytes keys (pickled by Python 2); files re-pickled by Python 3 have str.
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_images(d: dict, path: str) -> tuple[np.ndarray, np.ndarray]:
    for key in ("data", "fine_labels"):
        if key not in d:
            raise KeyError(f"{path}: missing key {key!r}; found {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(d["fine_labels"], dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.shape[0]} fine_labels for {data.shape[0]} images")
    return data, labels


def _to_tensor(u8: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(u8)).view(-1, 3, 32, 32).float().div_(255.0)


def load_cifar100(root: str, n_orig_classes: int = 80, n_dom_classes: int = 10, seed: int = 0,
                  max_per_split: dict[str, int] | None = None) -> Splits:
    """Load CIFAR-100 from ``root`` (the ``cifar-100-python`` folder, or its parent).

    The 100 fine classes are permuted with ``seed``; the first ``n_orig_classes`` are the pre-training
    classes and the next ``n_dom_classes`` the held-out classes of the local domains. ``max_per_split``
    (e.g. ``{"orig_train": 8000}``) keeps a seeded random subset of a split.
    """
    if os.path.isdir(os.path.join(root, "cifar-100-python")):
        root = os.path.join(root, "cifar-100-python")
    meta = _unpickle(os.path.join(root, "meta"))
    names = meta.get("fine_label_names")
    if names is None:
        raise KeyError(f"{os.path.join(root, 'meta')}: missing key 'fine_label_names'")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    n_cls = len(names)
    if n_orig_classes + n_dom_classes > n_cls:
        raise ValueError(f"{n_orig_classes} + {n_dom_classes} classes requested, the meta file lists {n_cls}")
    perm = np.random.default_rng(seed).permutation(n_cls)
    orig_c, dom_c = perm[:n_orig_classes], perm[n_orig_classes:n_orig_classes + n_dom_classes]
    tr, tr_y = _cifar_images(_unpickle(os.path.join(root, "train")), os.path.join(root, "train"))
    te, te_y = _cifar_images(_unpickle(os.path.join(root, "test")), os.path.join(root, "test"))
    rng = np.random.default_rng(seed + 1)
    out = {}
    for split, (x, y, cls) in {"orig_train": (tr, tr_y, orig_c), "orig_test": (te, te_y, orig_c),
                               "dom_train": (tr, tr_y, dom_c), "dom_test": (te, te_y, dom_c)}.items():
        idx = np.flatnonzero(np.isin(y, cls))
        cap = (max_per_split or {}).get(split)
        if cap is not None and cap < idx.size:
            idx = np.sort(rng.choice(idx, cap, replace=False))
        out[split] = _to_tensor(x[idx])
    return Splits(**out, orig_classes=[names[i] for i in orig_c], dom_classes=[names[i] for i in dom_c],
                  source="cifar100", info={"root": os.path.basename(os.path.normpath(root))})


# ------------------------------------------------------------------------------------------ embedded
# Photographs bundled inside the scikit-image wheel that load without any download (checked on
# scikit-image 0.26: the others in skimage.data need pooch and a network). Each photo is one pseudo-class.
# Colour photos go to the domains because the VH (hue) and VC (contrast) variations need colour.
EMBEDDED_PRETRAIN_PHOTOS = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry",
                            "stereo_motorcycle", "colorwheel", "camera", "brick", "grass", "gravel",
                            "coins", "moon", "clock", "cell")
EMBEDDED_DOMAIN_PHOTOS = ("chelsea", "coffee", "retina")
PATCH_SCALES = (32, 48, 64, 96)  # square crop sides in source pixels, area-resampled to 32 x 32
_TEST_FRACTION = 0.3             # right-hand part of every photo, never cropped for training
_MIN_STD, _MAX_REDRAWS = 0.03, 20

_PHOTO_CACHE: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB."""
    if name not in _PHOTO_CACHE:
        try:
            import skimage.data as skd
        except ImportError as e:
            raise ImportError("the embedded data set needs scikit-image "
                              "(pip install 'sparse_sam[experiments]')") from e
        img = getattr(skd, name)()
        if name == "stereo_motorcycle":
            img = img[0]  # (left, right, disparity): the left view only
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        _PHOTO_CACHE[name] = np.ascontiguousarray(img[..., :3].astype(np.uint8))
    return _PHOTO_CACHE[name]


def _patches(img: np.ndarray, n: int, rng: np.random.Generator, cols: tuple[int, int]) -> Tensor:
    """``n`` random square crops from columns ``[cols[0], cols[1])`` at random scales -> (n, 3, 32, 32)."""
    h = img.shape[0]
    x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)
    out = torch.empty(n, 3, 32, 32)
    avail = [s for s in PATCH_SCALES if s <= min(h, cols[1] - cols[0])]
    for i in range(n):
        # Flat crops (black retina background, sky) would be reconstructed almost perfectly and their
        # near-infinite per-image PSNR would dominate averages: redraw them, a bounded number of times.
        for _ in range(_MAX_REDRAWS):
            s = int(avail[rng.integers(len(avail))])
            top = int(rng.integers(0, h - s + 1))
            left = int(rng.integers(cols[0], cols[1] - s + 1))
            crop = x[:, top:top + s, left:left + s].unsqueeze(0)
            if float(crop.std()) >= _MIN_STD:
                break
        out[i] = torch.nn.functional.interpolate(crop, size=(32, 32), mode="area")[0]
    return out


def load_embedded(n_orig_train: int = 4000, n_orig_test: int = 500, n_dom_train: int = 1024,
                  n_dom_test: int = 256, seed: int = 0) -> Splits:
    """32 x 32 patches at scales :data:`PATCH_SCALES` from photographs bundled with scikit-image.

    Pre-training photos (:data:`EMBEDDED_PRETRAIN_PHOTOS`) and domain photos
    (:data:`EMBEDDED_DOMAIN_PHOTOS`) are disjoint. Within each photo the left 70 % of the columns
    feed the training crops and the right 30 % the test crops, so no test pixel is seen in training.
    Counts are split evenly over the photos of each group. Deterministic given ``seed``.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for group, photos, n_tr, n_te in (("orig", EMBEDDED_PRETRAIN_PHOTOS, n_orig_train, n_orig_test),
                                      ("dom", EMBEDDED_DOMAIN_PHOTOS, n_dom_train, n_dom_test)):
        trs, tes = [], []
        for j, name in enumerate(photos):
            img = _photo(name)
            cut = int(round(img.shape[1] * (1 - _TEST_FRACTION)))
            share = lambda n: n // len(photos) + (1 if j < n % len(photos) else 0)  # noqa: E731
            trs.append(_patches(img, share(n_tr), rng, (0, cut)))
            tes.append(_patches(img, share(n_te), rng, (cut, img.shape[1])))
        # Shuffle so that a mini-batch or a prefix of a split mixes photos.
        tr, te = torch.cat(trs), torch.cat(tes)
        out[f"{group}_train"] = tr[torch.from_numpy(rng.permutation(tr.shape[0]))]
        out[f"{group}_test"] = te[torch.from_numpy(rng.permutation(te.shape[0]))]
    return Splits(**out, orig_classes=list(EMBEDDED_PRETRAIN_PHOTOS), dom_classes=list(EMBEDDED_DOMAIN_PHOTOS),
                  source="embedded", info={"patch_scales": list(PATCH_SCALES), "test_fraction": _TEST_FRACTION})


def load_data(source: str, root: str | None = None, seed: int = 0, **sizes) -> Splits:
    """``source="embedded"`` or ``"cifar100"`` (needs ``root``).

    ``sizes``: ``n_orig_train``, ``n_orig_test``, ``n_dom_train``, ``n_dom_test``; ``None`` entries mean
    the default (embedded) or everything (CIFAR-100, e.g. 40 000 pre-training images).
    """
    if source == "embedded":
        # None means "as large as the source allows"; for the embedded set that is its default size.
        return load_embedded(seed=seed, **{k: v for k, v in sizes.items() if v is not None})
    if source == "cifar100":
        if root is None:
            raise ValueError("--data cifar100 needs --root PATH (the extracted cifar-100-python folder)")
        # Sizes are caps here: n_orig_train=8000 keeps a seeded subset of the 40000 pre-training images.
        caps = {k[2:]: v for k, v in sizes.items() if v is not None}
        return load_cifar100(root, seed=seed, max_per_split=caps or None)
    raise ValueError(f"unknown data source {source!r}; expected 'embedded' or 'cifar100'")
