"""The semantic-communication autoencoder of the ZFDA paper (Sec. V) and the links between its halves.

A transmitter (Tx) encodes a ``(B, 3, 32, 32)`` image in ``[0, 1]`` into semantics of shape
``(B, 8, 8, 8)`` (512 values, bandwidth ratio 512 / 3072 ≈ 0.167); a receiver (Rx) decodes them back to
``(B, 3, 32, 32)`` in ``[0, 1]``. The encoder is 6 ``Conv2d`` layers, the decoder 6 ``ConvTranspose2d``
layers, each but the last of either half followed by ``BatchNorm2d`` and ``ReLU``.

The two halves are separate ``nn.Sequential`` modules so the encoder of one model can be paired with the
decoder of another (that is how misalignment is measured)::

    y = transmit(tx_model, rx_model, x)  # == rx_model.decoder(link(tx_model.encoder(x)))
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["SemanticAutoencoder", "IdentityLink", "AWGNLink", "DMCLink", "make_link", "transmit",
           "SEMANTIC_SHAPE", "SEMANTIC_DIM"]

SEMANTIC_SHAPE = (8, 8, 8)
SEMANTIC_DIM = 512


def _block(layer: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(layer, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class SemanticAutoencoder(nn.Module):
    """6 Conv2d (encoder, Tx) + 6 ConvTranspose2d (decoder, Rx).

    Args:
        width: channel count ``w`` of the first layer; the hidden layers use ``w`` and ``2w`` channels.
            The paper's size is not published; ``w=32`` (≈ 0.25 M parameters) is our paper preset, the
            quick preset uses a narrower net.
        link: what sits between the halves in :meth:`forward` (default: identity, as in the paper).

    Shapes: encoder ``(B, 3, 32, 32) -> (B, 8, 8, 8)``; decoder ``(B, 8, 8, 8) -> (B, 3, 32, 32)``.
    Spatial path: 32 → 16 (stride 2, layer 2) → 8 (stride 2, layer 4) and back.
    """

    def __init__(self, width: int = 32, link: nn.Module | None = None):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w, c = width, SEMANTIC_SHAPE[0]
        self.width = width
        self.encoder = nn.Sequential(
            _block(nn.Conv2d(3, w, 3, 1, 1), w),
            _block(nn.Conv2d(w, w, 3, 2, 1), w),             # 32 -> 16
            _block(nn.Conv2d(w, 2 * w, 3, 1, 1), 2 * w),
            _block(nn.Conv2d(2 * w, 2 * w, 3, 2, 1), 2 * w),  # 16 -> 8
            _block(nn.Conv2d(2 * w, 2 * w, 3, 1, 1), 2 * w),
            nn.Conv2d(2 * w, c, 3, 1, 1),                     # semantics: unbounded, 8 x 8 x 8
        )
        self.decoder = nn.Sequential(
            _block(nn.ConvTranspose2d(c, 2 * w, 3, 1, 1), 2 * w),
            _block(nn.ConvTranspose2d(2 * w, 2 * w, 3, 1, 1), 2 * w),
            _block(nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), 2 * w),  # 8 -> 16
            _block(nn.ConvTranspose2d(2 * w, w, 3, 1, 1), w),
            _block(nn.ConvTranspose2d(w, w, 4, 2, 1), w),              # 16 -> 32
            nn.ConvTranspose2d(w, 3, 3, 1, 1),
            nn.Sigmoid(),
        )
        self.link = link if link is not None else IdentityLink()

    def encode(self, x: Tensor) -> Tensor:
        """``(B, 3, 32, 32)`` in [0, 1] -> semantics ``(B, 8, 8, 8)``."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Semantics ``(B, 8, 8, 8)`` -> image ``(B, 3, 32, 32)`` in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.link(self.encoder(x)))

    def tx_layers(self) -> list[nn.Module]:
        """The 6 encoder convolutions, first to last."""
        return [m for m in self.encoder.modules() if isinstance(m, nn.Conv2d)]

    def rx_blocks(self) -> list[nn.Module]:
        """The 6 decoder stages (ConvTranspose2d with its BatchNorm), first to last."""
        return [self.decoder[i] for i in range(6)]


def transmit(tx: SemanticAutoencoder, rx: SemanticAutoencoder, x: Tensor, link: nn.Module | None = None) -> Tensor:
    """Tx of one model talking to the Rx of another: ``rx.decoder(link(tx.encoder(x)))``.

    ``link`` defaults to ``tx.link``. Shapes ``(B, 3, 32, 32) -> (B, 3, 32, 32)``.
    """
    link = tx.link if link is None else link
    return rx.decoder(link(tx.encoder(x)))


class IdentityLink(nn.Module):
    """Error-free link (the paper's setting)."""

    def forward(self, z: Tensor) -> Tensor:
        return z


def _power_normalise(z: Tensor) -> Tensor:
    # Unit average power per sample, the usual DeepJSCC transmit constraint.
    flat = z.flatten(1)
    scale = math.sqrt(flat.shape[1]) / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (flat * scale).view_as(z)


class AWGNLink(nn.Module):
    """Power-normalised semantics plus white Gaussian noise at ``snr_db``.

    ``y = z_n + n``, ``z_n = z * sqrt(D) / ||z||`` per sample (D = 512), ``n ~ N(0, 10^(-snr_db/10))``.
    """

    def __init__(self, snr_db: float):
        super().__init__()
        self.snr_db = float(snr_db)

    def forward(self, z: Tensor) -> Tensor:
        zn = _power_normalise(z)
        sigma = 10.0 ** (-self.snr_db / 20.0)
        return zn + sigma * torch.randn_like(zn)


class DMCLink(nn.Module):
    """Symmetric discrete memoryless channel on uniformly quantised semantics (as in SLF).

    Each semantic value is clamped to ``[-clip, clip]`` and quantised to one of ``Q = 2**bits`` levels;
    each symbol arrives unchanged with probability ``1 - p`` and otherwise as one of the other ``Q - 1``
    levels, uniformly. The quantiser passes gradients straight through (``d y / d z = 1`` inside the
    clip range), so the link can sit inside training.
    """

    def __init__(self, p: float, bits: int = 4, clip: float = 3.0):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"DMC crossover probability p must be in [0, 1], got {p}")
        if not 1 <= bits <= 16:
            raise ValueError(f"DMC bits must be in [1, 16], got {bits}")
        self.p, self.bits, self.clip = float(p), int(bits), float(clip)

    def forward(self, z: Tensor) -> Tensor:
        q = 2 ** self.bits
        step = 2 * self.clip / (q - 1)
        zc = z.clamp(-self.clip, self.clip)
        sym = torch.round((zc + self.clip) / step)
        flip = torch.rand_like(sym) < self.p
        # A uniform draw among the Q-1 *other* levels: offset by 1..Q-1 modulo Q.
        other = torch.remainder(sym + torch.randint_like(sym, 1, q), q)
        sym = torch.where(flip, other, sym)
        y = sym * step - self.clip
        return zc + (y - zc).detach()


def make_link(spec: str | None) -> nn.Module:
    """Parse ``"identity"``, ``"awgn:SNR_DB"`` or ``"dmc:P[:BITS]"`` into a link module."""
    if spec is None or spec == "identity":
        return IdentityLink()
    kind, _, rest = spec.partition(":")
    try:
        if kind == "awgn":
            return AWGNLink(float(rest))
        if kind == "dmc":
            parts = rest.split(":")
            return DMCLink(float(parts[0]), int(parts[1]) if len(parts) > 1 else 4)
    except ValueError as e:
        raise ValueError(f"bad link spec {spec!r}: {e}") from None
    raise ValueError(f"unknown link {spec!r}; expected 'identity', 'awgn:SNR_DB' or 'dmc:P[:BITS]'")
