"""The four local-domain variations of the paper's Fig. 2, in pure torch tensor ops (no torchvision).

Every image gets its own parameter drawn uniformly from a fixed range, from a generator seeded with
``seed`` (the same seed gives the same images). Ranges:

====  ===================  ===========================================================================
Code  Variation            Parameter (per image)
====  ===================  ===========================================================================
VA    varied angle         rotation by θ, |θ| ~ U[20°, 60°], random sign; zero (black) fill outside
VP    varied perspective   homography moving each corner inward by U[0.05, 0.20] of the side, per axis
VC    varied contrast      x' = μ + c (x − μ), c ~ U[1.8, 2.6], μ = per-image mean gray; clamped to [0, 1]
VH    varied hue           rotation of the YIQ chroma plane by h ~ U[90°, 270°]; clamped to [0, 1]
====  ===================  ===========================================================================

All functions take and return float tensors ``(N, 3, H, W)`` in ``[0, 1]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DOMAINS", "DOMAIN_RANGES", "apply_domain", "rotate", "perspective", "contrast", "hue_rotate",
           "save_domain_grid"]

DOMAIN_RANGES = {
    "VA": {"abs_angle_deg": (20.0, 60.0)},
    "VP": {"corner_shift": (0.05, 0.20)},
    "VC": {"contrast_factor": (1.8, 2.6)},
    "VH": {"hue_deg": (90.0, 270.0)},
}
DOMAINS = tuple(DOMAIN_RANGES)

_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def _check(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected float images of shape (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")


def rotate(x: Tensor, angle_deg: Tensor) -> Tensor:
    """Rotate each image about its centre by ``angle_deg`` ``(N,)``; zero fill.

    Equivalent: ``grid_sample(x, affine_grid([[cos, -sin, 0], [sin, cos, 0]]))``.
    """
    a = angle_deg.to(torch.float64) * math.pi / 180
    theta = torch.zeros(x.shape[0], 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
    theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _homography(src: Tensor, dst: Tensor) -> Tensor:
    """Per-sample 3x3 H with H·src_i ∝ dst_i for 4 point pairs; src, dst ``(N, 4, 2)`` -> ``(N, 3, 3)``."""
    n = src.shape[0]
    a = torch.zeros(n, 8, 8, dtype=torch.float64)
    b = torch.zeros(n, 8, dtype=torch.float64)
    for i in range(4):
        x, y = src[:, i, 0], src[:, i, 1]
        u, v = dst[:, i, 0], dst[:, i, 1]
        a[:, 2 * i, 0], a[:, 2 * i, 1], a[:, 2 * i, 2] = x, y, 1
        a[:, 2 * i, 6], a[:, 2 * i, 7] = -u * x, -u * y
        a[:, 2 * i + 1, 3], a[:, 2 * i + 1, 4], a[:, 2 * i + 1, 5] = x, y, 1
        a[:, 2 * i + 1, 6], a[:, 2 * i + 1, 7] = -v * x, -v * y
        b[:, 2 * i], b[:, 2 * i + 1] = u, v
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=torch.float64)], dim=1).view(n, 3, 3)


def perspective(x: Tensor, corners: Tensor) -> Tensor:
    """Warp so that the image corners land on ``corners`` ``(N, 4, 2)`` (normalised [-1, 1] coords,
    order TL, TR, BR, BL); zero fill. The sampling grid is the inverse homography of every output pixel.
    """
    n, _, h, w = x.shape
    unit = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    # Map output coordinates back to input coordinates: H sends the warped corners to the unit square.
    hmat = _homography(corners.to(torch.float64), unit.expand(n, 4, 2))
    ys = (torch.arange(h, dtype=torch.float64) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float64) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, -1, 3)
    mapped = pts @ hmat.transpose(1, 2)
    grid = (mapped[..., :2] / mapped[..., 2:]).view(n, h, w, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``clamp(μ + c (x − μ), 0, 1)`` with μ the per-image mean gray and ``c = factor`` ``(N,)``."""
    mu = (x * _RGB2YIQ[0].to(x).view(1, 3, 1, 1)).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    return (mu + factor.to(x).view(-1, 1, 1, 1) * (x - mu)).clamp(0, 1)


def hue_rotate(x: Tensor, hue_deg: Tensor) -> Tensor:
    """Rotate the chroma (I, Q) of YIQ by ``hue_deg`` ``(N,)`` keeping luma Y; clamp to [0, 1]."""
    m = _RGB2YIQ.to(torch.float64)
    h = hue_deg.to(torch.float64) * math.pi / 180
    rot = torch.zeros(x.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = h.cos(), -h.sin(), h.sin(), h.cos()
    full = (torch.linalg.inv(m) @ rot @ m).to(x.dtype)  # (N, 3, 3) acting on RGB
    return torch.einsum("nij,njhw->nihw", full, x).clamp(0, 1)


def apply_domain(x: Tensor, code: str, seed: int = 0) -> Tensor:
    """Apply variation ``code`` (``"VA"``, ``"VP"``, ``"VC"``, ``"VH"``, or ``"orig"`` for none) to
    ``x`` ``(N, 3, H, W)``, one parameter per image drawn from :data:`DOMAIN_RANGES` with ``seed``."""
    _check(x)
    if code == "orig":
        return x.clone()
    if code not in DOMAIN_RANGES:
        raise ValueError(f"unknown domain {code!r}; expected one of {DOMAINS} or 'orig'")
    g = torch.Generator().manual_seed(int(seed))
    n = x.shape[0]
    if code == "VA":
        lo, hi = DOMAIN_RANGES["VA"]["abs_angle_deg"]
        sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
        return rotate(x, sign * _uniform(n, lo, hi, g))
    if code == "VP":
        lo, hi = DOMAIN_RANGES["VP"]["corner_shift"]
        unit = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
        # Each corner moves towards the centre by a fraction of the full side (2 in normalised units).
        shift = 2 * _uniform(n * 8, lo, hi, g).view(n, 4, 2)
        return perspective(x, unit - unit.sign() * shift)
    if code == "VC":
        return contrast(x, _uniform(n, *DOMAIN_RANGES["VC"]["contrast_factor"], g))
    return hue_rotate(x, _uniform(n, *DOMAIN_RANGES["VH"]["hue_deg"], g))


def save_domain_grid(x: Tensor, path: str, seed: int = 0, n: int = 8) -> None:
    """PNG like the paper's Fig. 2: one row per domain (original, VA, VP, VC, VH), ``n`` images each."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plots need matplotlib (pip install 'sparse_sam[experiments]')") from e
    x = x[:n]
    rows = ["orig", *DOMAINS]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n, 1.3 * len(rows)), squeeze=False)
    for r, code in enumerate(rows):
        imgs = apply_domain(x, code, seed)
        for c in range(x.shape[0]):
            ax = axes[r][c]
            ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel("original" if code == "orig" else code)
    fig.suptitle("Original domain and the four local domains")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
