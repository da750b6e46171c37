"""Adaptation and realignment methods of the paper's Sec. V, each a function ``method(sc, cfg) -> MethodResult``.

Every method takes the same two inputs:

* :class:`Scenario` — the data (original domain and one local domain), the pre-trained model, the
  baseline-DA model of that domain (for the realignment methods), which AI adapted (``side``), device
  and seed;
* a config object (one dataclass per method, all fields documented there);

and returns a :class:`MethodResult`: PSNRs in dB (peak 1.0, averaged per image), wall time, bytes
exchanged between the Tx and Rx AIs, extra parameters the method adds, and method-specific ``info``.

Adaptation: :func:`pretrain`, :func:`baseline_da` (full fine-tuning), :func:`zfda` (sparse patch).
Realignment of a misaligned pair: :func:`tuning` (Rx-lead joint training), :func:`equalizer`,
:func:`slf` (split learning with layer freezing). ZFDA's realignment is switching its patch off.

Who adapted: ``side="tx"`` pairs the adapted model's encoder with the pre-trained decoder,
``side="rx"`` the pre-trained encoder with the adapted decoder; both are evaluated on original-domain
test data.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .autoencoder import SEMANTIC_DIM, SemanticAutoencoder, make_link, transmit

__all__ = ["Scenario", "MethodResult", "TrainConfig", "ZFDAConfig", "RealignConfig", "SLFConfig",
           "psnr", "evaluate", "pair_outputs", "pretrain", "baseline_da", "zfda", "tuning", "equalizer",
           "slf", "param_bytes", "bits_equal"]

FP32 = 4
EVAL_LINK_SEED = 12345  # the channel noise of every evaluation (see pair_outputs)
IMAGE_BYTES = 3 * 32 * 32  # an image travels as uint8 CHW, as it is stored
SEMANTIC_BYTES = SEMANTIC_DIM * FP32


# ------------------------------------------------------------------------------------- containers
@dataclass
class Scenario:
    """Inputs shared by every method. Images are float ``(N, 3, 32, 32)`` in ``[0, 1]``."""
    orig_train: Tensor
    orig_test: Tensor
    dom_train: Tensor | None = None
    dom_test: Tensor | None = None
    domain: str | None = None
    pretrained: SemanticAutoencoder | None = None
    adapted: SemanticAutoencoder | None = None
    side: str = "tx"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    link: str = "identity"  # the pre-trained model's link: "identity", "awgn:SNR_DB" or "dmc:P[:BITS]"

    def misaligned_pair(self) -> tuple[SemanticAutoencoder, SemanticAutoencoder]:
        """(Tx model, Rx model) after the ``side`` AI adapted (baseline DA)."""
        if self.pretrained is None or self.adapted is None:
            raise ValueError("realignment needs Scenario.pretrained and Scenario.adapted (the baseline-DA model)")
        if self.side == "tx":
            return self.adapted, self.pretrained
        if self.side == "rx":
            return self.pretrained, self.adapted
        raise ValueError(f"Scenario.side must be 'tx' or 'rx', got {self.side!r}")


@dataclass
class MethodResult:
    """What every method returns. ``artifact`` (a model or patch) is not serialised by :meth:`to_dict`."""
    method: str
    domain: str | None
    side: str | None
    psnr: dict[str, float]
    wall_s: float
    bytes_exchanged: int = 0
    extra_params: int = 0
    info: dict = field(default_factory=dict)
    artifact: Any = field(default=None, repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)  # deep-copies fields; drop the artifact afterwards
        d.pop("artifact")
        return d


@dataclass
class TrainConfig:
    """Plain training: ``epochs`` over the data in mini-batches of ``batch_size``, Adam or SGD at ``lr``.

    ``schedule``: ``"constant"`` (``lr`` throughout) or ``"cosine"`` (``lr`` annealed per epoch to
    ``lr * final_lr_ratio`` over the first ``epochs - hold_epochs`` epochs, then held there for the last
    ``hold_epochs``; with ``hold_epochs=1`` the last epoch is "one more epoch" at the final rate, which
    is what the pre-training convergence check measures).
    """
    epochs: int = 10
    lr: float = 1e-4
    batch_size: int = 64
    optimizer: str = "adam"
    schedule: str = "constant"
    final_lr_ratio: float = 0.01
    hold_epochs: int = 0


@dataclass
class ZFDAConfig:
    """ZFDA: a sparse additive modification learned through ``sparse_sam.patch``.

    ``optimizer`` is used for both parameter groups at rates ``lr_scores`` (α_s) and ``lr_delta`` (α_v).
    The paper's literal rule is ``optimizer="sgd", lr_scores=1.0, lr_delta=1e-4, delta_grad="masked",
    score_init_scale=1.0``; with it no mask entry flips (the score steps g ⊙ v are tiny against N(0, 1)
    score gaps while v is still ≈ 0), so the default here is Adam with ``delta_grad="dense"``.
    ``score_init``: ``"random"`` (the patch's N(0, 1) scores) or ``"grad"`` (a warm start: the scores
    become ``|∂L/∂W|`` of the un-patched model, accumulated over the first ``warm_start_batches``
    domain batches and divided by its per-layer standard deviation, so the initial mask picks the
    weights with the largest first gradients). ``score_init_scale`` multiplies the initial scores.
    ``schedule``: ``"constant"`` or ``"cosine"`` (both learning rates annealed to
    ``final_lr_ratio`` of their start by the last epoch), as in :class:`TrainConfig`.
    """
    sparsity: float = 0.01
    allocation: str = "linear"
    learn_mask: bool = True
    delta_grad: str = "dense"
    optimizer: str = "adam"
    lr_scores: float = 0.01
    lr_delta: float = 1e-3
    score_init_scale: float = 1.0
    score_init: str = "random"
    warm_start_batches: int = 4
    schedule: str = "constant"
    final_lr_ratio: float = 0.01
    epochs: int = 30
    batch_size: int = 64
    norm: str = "frozen"
    encodings: tuple[str, ...] = ("fp32", "compact")


@dataclass
class RealignConfig:
    """Tuning / equalizer: ``n_samples`` original-domain images exchanged, ``steps`` optimiser steps
    (tuning: the paper's 8 iterations over 1024 samples, i.e. 128 per step) or ``epochs`` (equalizer:
    30 epochs over 1024 samples), Adam at ``lr``; ``hidden`` is the equalizer's hidden width."""
    n_samples: int = 1024
    steps: int = 8
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    hidden: int = 512


@dataclass
class SLFConfig:
    """SLF: the Tx downloads the Rx decoder, freezes its last ``frozen`` of 6 stages, fine-tunes the
    others on ``n_samples`` of its images for ``epochs`` (Adam, ``lr``), uploads the fine-tuned stages."""
    frozen: int = 2
    n_samples: int = 1024
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3


# ------------------------------------------------------------------------------------- helpers
def psnr(y: Tensor, x: Tensor) -> Tensor:
    """Per-image PSNR in dB, peak 1.0: ``10 log10(1 / mean((y - x)^2))`` over C, H, W; ``(N,)``.

    MSE is floored at 1e-10 (100 dB) so a perfect reconstruction does not give infinity.
    """
    mse = (y.float() - x.float()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10.0 * torch.log10(mse)


@torch.no_grad()
def pair_outputs(tx: SemanticAutoencoder, rx: SemanticAutoencoder, x: Tensor, device: str = "cpu",
                 batch_size: int = 512, eq: nn.Module | None = None) -> Tensor:
    """Reconstructions ``rx.decoder(eq(tx.link(tx.encoder(x))))`` in eval mode, on the CPU;
    ``(N, 3, 32, 32)``.

    A noisy link draws its noise from a fixed seed here (the global RNG is left as it was), so every
    method and every switched-on/off comparison sees the same channel realisation.
    """
    mods = [tx, rx] + ([eq] if eq is not None else [])
    modes = [m.training for m in mods]
    for m in mods:
        m.eval()
    outs = []
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(EVAL_LINK_SEED)
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(device)
                z = tx.link(tx.encoder(xb))
                outs.append(rx.decoder(eq(z) if eq is not None else z).cpu())
    finally:
        for m, t in zip(mods, modes):
            m.train(t)
    return torch.cat(outs)


def evaluate(tx: SemanticAutoencoder, rx: SemanticAutoencoder, x: Tensor, device: str = "cpu",
             eq: nn.Module | None = None) -> float:
    """Mean per-image PSNR (dB) of the pair (``tx`` encoder, ``rx`` decoder) on ``x``."""
    return float(psnr(pair_outputs(tx, rx, x, device, eq=eq), x).mean())


def param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def bits_equal(a: Tensor, b: Tensor) -> bool:
    """Raw-bit equality of two float32 tensors (NaN payloads and -0.0 included)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _state_bits_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False
    for k in sa:
        ta, tb = sa[k], sb[k]
        if ta.is_floating_point():
            if not bits_equal(ta.float(), tb.float()) or ta.dtype != tb.dtype:
                return False
        elif not torch.equal(ta, tb):
            return False
    return True


def _make_optimizer(name: str, params, lr: float | None = None) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr) if lr is not None else torch.optim.Adam(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr) if lr is not None else torch.optim.SGD(params, lr=1.0)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, mininterval=0.5)


def _batches(n: int, batch_size: int, g: torch.Generator):
    perm = torch.randperm(n, generator=g)
    for i in range(0, n, batch_size):
        yield perm[i:i + batch_size]


SCHEDULES = ("constant", "cosine")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, epochs: int, final_lr_ratio: float, hold_epochs: int = 0):
    """Per-epoch learning-rate schedule of ``opt`` (``None`` for a constant rate); see :class:`TrainConfig`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 <= hold_epochs < max(epochs, 1):
        raise ValueError(f"hold_epochs must be in [0, epochs), got {hold_epochs} for {epochs} epochs")
    n = epochs - hold_epochs  # annealing epochs
    if schedule == "constant" or n <= 1:
        return None
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1], got {final_lr_ratio}")
    # Epoch e (0-based) runs at lr * (r + (1 - r) * (1 + cos(pi e / (n - 1))) / 2), epochs n-1 .. E-1 at lr * r.
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(e, n - 1) / (n - 1))))


def _fit(loss_fn, x: Tensor, opt: torch.optim.Optimizer, epochs: int, batch_size: int, seed: int,
         desc: str, progress: bool, device: str, on_epoch=None, scheduler=None) -> list[float]:
    """Mini-batch training of ``loss_fn(x_batch) -> scalar``; returns the mean loss of every epoch.

    ``scheduler`` (optional) steps once after every epoch; ``on_epoch()`` runs after every epoch."""
    g = torch.Generator().manual_seed(seed)
    x = x.to(device)
    losses = []
    for _ in _progress(range(epochs), epochs, desc, progress):
        tot, cnt = 0.0, 0
        for idx in _batches(x.shape[0], batch_size, g):
            xb = x[idx.to(x.device)]
            loss = loss_fn(xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, cnt = tot + float(loss.detach()) * xb.shape[0], cnt + xb.shape[0]
        losses.append(tot / max(cnt, 1))
        if scheduler is not None:
            scheduler.step()
        if on_epoch is not None:
            on_epoch()
    return losses


# ------------------------------------------------------------------------------------- adaptation
def pretrain(sc: Scenario, cfg: TrainConfig, width: int = 32) -> MethodResult:
    """Train a fresh :class:`SemanticAutoencoder` (seeded) on ``sc.orig_train`` with MSE.

    ``psnr["aligned"]``: the model's own encoder + decoder on ``sc.orig_test``. ``info``:
    ``psnr_per_epoch`` (aligned test PSNR after every epoch) and ``last_epoch_gain_db`` (what the last
    epoch added; the convergence check). ``artifact``: the model.
    """
    t0 = time.perf_counter()
    torch.manual_seed(sc.seed)
    model = SemanticAutoencoder(width, link=make_link(sc.link)).to(sc.device)
    model.train()
    opt = _make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    per_epoch: list[float] = []
    losses = _fit(lambda xb: F.mse_loss(model(xb), xb), sc.orig_train, opt, cfg.epochs, cfg.batch_size,
                  sc.seed, "pre-training", sc.progress, sc.device,
                  on_epoch=lambda: per_epoch.append(evaluate(model, model, sc.orig_test, sc.device)),
                  scheduler=_scheduler(opt, cfg.schedule, cfg.epochs, cfg.final_lr_ratio, cfg.hold_epochs))
    model.eval()
    aligned = evaluate(model, model, sc.orig_test, sc.device)
    gain = per_epoch[-1] - per_epoch[-2] if len(per_epoch) >= 2 else float("nan")
    return MethodResult("pretrain", None, None, {"aligned": aligned}, time.perf_counter() - t0,
                        info={"losses": losses, "params": sum(p.numel() for p in model.parameters()),
                              "config": asdict(cfg), "psnr_per_epoch": per_epoch, "last_epoch_gain_db": gain},
                        artifact=model)


def _domain_psnrs(sc: Scenario, adapted: SemanticAutoencoder) -> dict[str, float]:
    pre = sc.pretrained
    return {"domain": evaluate(adapted, adapted, sc.dom_test, sc.device),
            "domain_pretrained": evaluate(pre, pre, sc.dom_test, sc.device),
            "aligned": evaluate(pre, pre, sc.orig_test, sc.device),
            "tx_adapted": evaluate(adapted, pre, sc.orig_test, sc.device),
            "rx_adapted": evaluate(pre, adapted, sc.orig_test, sc.device)}


def baseline_da(sc: Scenario, cfg: TrainConfig) -> MethodResult:
    """Full fine-tuning of a copy of the pre-trained model on ``sc.dom_train`` (BatchNorm in train mode,
    as ordinary fine-tuning does).

    ``psnr``: ``domain`` (adapted model on the domain), ``domain_pretrained`` (un-adapted model on the
    domain), ``aligned`` (pre-trained pair on original data), ``tx_adapted`` / ``rx_adapted``
    (misaligned pairs on original data). ``artifact``: the adapted model.
    """
    t0 = time.perf_counter()
    torch.manual_seed(sc.seed)
    model = copy.deepcopy(sc.pretrained)
    model.train()
    opt = _make_optimizer(cfg.optimizer, model.parameters(), cfg.lr)
    losses = _fit(lambda xb: F.mse_loss(model(xb), xb), sc.dom_train, opt, cfg.epochs, cfg.batch_size,
                  sc.seed, f"baseline DA {sc.domain}", sc.progress, sc.device,
                  scheduler=_scheduler(opt, cfg.schedule, cfg.epochs, cfg.final_lr_ratio, cfg.hold_epochs))
    train_s = time.perf_counter() - t0
    model.eval()
    res = MethodResult("baseline_da", sc.domain, None, _domain_psnrs(sc, model), train_s,
                       info={"losses": losses, "stored_bytes": param_bytes(model.parameters()),
                             "config": asdict(cfg)}, artifact=model)
    return res


SCORE_INITS = ("random", "grad")


def _first_gradients(model: nn.Module, sc: Scenario, cfg: ZFDAConfig) -> dict[str, Tensor]:
    """``|∂L/∂W|`` summed over the first ``cfg.warm_start_batches`` domain batches, per weight that
    ``sparse_sam.patch`` selects by default (keyed by qualified parameter name, shaped like the weight).

    Normalisation layers run on their running statistics (as ZFDA's ``norm="frozen"`` does), and the
    model's weights, buffers, ``requires_grad`` flags and the global RNG are left as they were.
    """
    from ..budget import find_targets

    weights = {n: t.param for n, t in find_targets(model)[0].items()}
    acc = {n: torch.zeros_like(w) for n, w in weights.items()}
    g = torch.Generator().manual_seed(sc.seed)
    x = sc.dom_train.to(sc.device)
    mode = model.training
    model.eval()
    try:
        for i, idx in enumerate(_batches(x.shape[0], cfg.batch_size, g)):
            if i >= cfg.warm_start_batches:
                break
            xb = x[idx.to(x.device)]
            grads = torch.autograd.grad(F.mse_loss(model(xb), xb), list(weights.values()))
            for n, gr in zip(weights, grads):
                acc[n] += gr.abs()
    finally:
        model.train(mode)
    return acc


def zfda(sc: Scenario, cfg: ZFDAConfig) -> MethodResult:
    """Zero-forget DA: patch a working copy of the pre-trained model, train scores and deltas on the
    domain, export the patch (``cfg.encodings``), unpatch.

    Checks, recorded in ``info`` (and asserted, since they are the method's guarantee):
    ``state_bit_identical`` (after unpatch every state_dict tensor, BatchNorm buffers included, has the
    pre-trained bits) and ``outputs_bit_identical`` (with the patch switched off, both cross pairs
    produce the pre-trained pair's outputs bit for bit, also after an apply/remove cycle).

    ``psnr``: ``domain`` (patch on), ``domain_<encoding>`` (exported patch applied), ``aligned``,
    ``tx_adapted`` / ``rx_adapted`` (patch off: identical to aligned). ``info``: flipped mask fraction,
    patch bytes per encoding, model bytes, ratio, modified weights, losses. ``artifact``: fp32 patch.
    """
    import sparse_sam

    if cfg.score_init not in SCORE_INITS:
        raise ValueError(f"ZFDAConfig.score_init must be one of {SCORE_INITS}, got {cfg.score_init!r}")
    t0 = time.perf_counter()
    pre = sc.pretrained
    model = copy.deepcopy(pre)
    warm = _first_gradients(model, sc, cfg) if cfg.score_init == "grad" else None
    torch.manual_seed(sc.seed)
    handle = sparse_sam.patch(model, cfg.sparsity, allocation=cfg.allocation, learn_mask=cfg.learn_mask,
                              delta_grad=cfg.delta_grad, seed=sc.seed, norm=cfg.norm)
    if cfg.score_init == "grad":
        with torch.no_grad():
            for name, m in handle.layers.items():
                g = warm[name]
                m.scores.copy_(g / g.std().clamp_min(1e-30))
    if cfg.score_init_scale != 1.0:
        with torch.no_grad():
            for m in handle.layers.values():
                m.scores.mul_(cfg.score_init_scale)
    if cfg.score_init != "random" or cfg.score_init_scale != 1.0:
        handle.refresh_masks()
    opt = _make_optimizer(cfg.optimizer, handle.param_groups(lr_scores=cfg.lr_scores, lr_delta=cfg.lr_delta))
    model.train()
    flips = []  # fraction of mask entries differing from the initial (post-warm-start) mask, after every epoch
    init_masks = [m.mask.clone() for m in handle.layers.values()]
    n_mask = sum(m0.numel() for m0 in init_masks)

    def count_flips():
        handle.refresh_masks()
        flips.append(sum(int((m.mask != m0).sum()) for m, m0 in zip(handle.layers.values(), init_masks)) / n_mask)

    losses = _fit(lambda xb: F.mse_loss(model(xb), xb), sc.dom_train, opt, cfg.epochs, cfg.batch_size,
                  sc.seed, f"ZFDA {sc.domain} γ={cfg.sparsity:g}", sc.progress, sc.device, on_epoch=count_flips,
                  scheduler=_scheduler(opt, cfg.schedule, cfg.epochs, cfg.final_lr_ratio))
    train_s = time.perf_counter() - t0
    model.eval()
    domain_live = evaluate(model, model, sc.dom_test, sc.device)
    summary = handle.summary()
    patches = {enc: handle.export(encoding=enc) for enc in cfg.encodings}
    sparse_sam.unpatch(model)

    state_ok = _state_bits_equal(model, pre)
    ref = pair_outputs(pre, pre, sc.orig_test, sc.device)
    outs_ok = bits_equal(pair_outputs(model, pre, sc.orig_test, sc.device), ref) and \
        bits_equal(pair_outputs(pre, model, sc.orig_test, sc.device), ref)
    psnrs = {"domain": domain_live}
    for enc, p in patches.items():
        with p.applied(model):
            psnrs[f"domain_{enc}"] = evaluate(model, model, sc.dom_test, sc.device)
    # Switching off after an on/off cycle must land on the same bits again.
    outs_ok = outs_ok and bits_equal(pair_outputs(model, pre, sc.orig_test, sc.device), ref) and \
        _state_bits_equal(model, pre)
    if not (state_ok and outs_ok):
        raise AssertionError(f"ZFDA switched off is not bit-identical to the pre-trained model "
                             f"(state {state_ok}, outputs {outs_ok})")
    aligned = float(psnr(ref, sc.orig_test).mean())
    psnrs.update(aligned=aligned,
                 tx_adapted=evaluate(model, pre, sc.orig_test, sc.device),
                 rx_adapted=evaluate(pre, model, sc.orig_test, sc.device))
    model_bytes = param_bytes(pre.parameters())
    info = {"config": {**asdict(cfg), "encodings": list(cfg.encodings)},
            "flipped_fraction": flips[-1] if flips else 0.0, "flipped_per_epoch": flips, "losses": losses,
            "num_modified": patches[cfg.encodings[0]].num_modified,
            "patch_bytes": {enc: p.nbytes for enc, p in patches.items()},
            "model_bytes": model_bytes,
            "patch_ratio": {enc: p.nbytes / model_bytes for enc, p in patches.items()},
            "state_bit_identical": state_ok, "outputs_bit_identical": outs_ok,
            "layers": [{k: r[k] for k in ("name", "k", "p")} for r in summary]}
    return MethodResult("zfda", sc.domain, None, psnrs, train_s, 0, 0, info, artifact=patches[cfg.encodings[0]])


# ------------------------------------------------------------------------------------- realignment
def tuning(sc: Scenario, cfg: RealignConfig) -> MethodResult:
    """Rx-lead joint training of the misaligned pair on ``cfg.n_samples`` original-domain images.

    Per step the Tx sends semantics (fp32) and the images (uint8, the Rx needs them for the loss);
    the Rx updates its decoder and returns ∂L/∂semantics (fp32) so the Tx can update its encoder.
    ``cfg.steps`` steps over ``n_samples`` images in total. Both AIs end up with changed weights.
    """
    t0 = time.perf_counter()
    tx0, rx0 = sc.misaligned_pair()
    tx, rx = copy.deepcopy(tx0), copy.deepcopy(rx0)
    before = evaluate(tx0, rx0, sc.orig_test, sc.device)
    g = torch.Generator().manual_seed(sc.seed)
    data = sc.orig_train[torch.randperm(sc.orig_train.shape[0], generator=g)[:cfg.n_samples]].to(sc.device)
    per_step = max(1, data.shape[0] // cfg.steps)
    tx.train(), rx.train()
    opt_tx = torch.optim.Adam(tx.encoder.parameters(), lr=cfg.lr)
    opt_rx = torch.optim.Adam(rx.decoder.parameters(), lr=cfg.lr)
    sent = 0
    for s in _progress(range(cfg.steps), cfg.steps, f"tuning {sc.domain}/{sc.side}", sc.progress):
        xb = data[s * per_step:(s + 1) * per_step]
        z = tx.link(tx.encoder(xb))
        z_rx = z.detach().requires_grad_(True)          # what crosses the link
        loss = F.mse_loss(rx.decoder(z_rx), xb)
        opt_rx.zero_grad(set_to_none=True)
        loss.backward()
        opt_rx.step()
        opt_tx.zero_grad(set_to_none=True)
        z.backward(z_rx.grad)                           # gradient returned to the Tx
        opt_tx.step()
        sent += xb.shape[0] * (SEMANTIC_BYTES + IMAGE_BYTES + SEMANTIC_BYTES)
    wall = time.perf_counter() - t0
    after = evaluate(tx, rx, sc.orig_test, sc.device)
    return MethodResult("tuning", sc.domain, sc.side, {"misaligned": before, "realigned": after}, wall,
                        sent, 0, {"config": asdict(cfg)}, artifact=(tx, rx))


class Equalizer(nn.Module):
    """Two dense layers on the flattened semantics, residual: ``z + W2 relu(W1 z + b1) + b2``.

    ``W2`` starts at zero so training starts from the misaligned pair rather than from noise.
    Shapes ``(B, 8, 8, 8) -> (B, 8, 8, 8)``.
    """

    def __init__(self, hidden: int = 512):
        super().__init__()
        self.fc1 = nn.Linear(SEMANTIC_DIM, hidden)
        self.fc2 = nn.Linear(hidden, SEMANTIC_DIM)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: Tensor) -> Tensor:
        f = z.flatten(1)
        return (f + self.fc2(F.relu(self.fc1(f)))).view_as(z)


def equalizer(sc: Scenario, cfg: RealignConfig) -> MethodResult:
    """A 2-layer dense :class:`Equalizer` between the Tx encoder and the Rx decoder, trained by the Rx
    on ``cfg.n_samples`` images the Tx sends (semantics fp32 + image uint8), ``cfg.epochs`` epochs.
    Tx and Rx weights stay as they are; the equalizer's parameters are the extra cost."""
    t0 = time.perf_counter()
    tx, rx = sc.misaligned_pair()
    before = evaluate(tx, rx, sc.orig_test, sc.device)
    g = torch.Generator().manual_seed(sc.seed)
    data = sc.orig_train[torch.randperm(sc.orig_train.shape[0], generator=g)[:cfg.n_samples]].to(sc.device)
    torch.manual_seed(sc.seed)
    eq = Equalizer(cfg.hidden).to(sc.device)
    tx.eval(), rx.eval()
    with torch.no_grad():
        z = tx.link(tx.encoder(data))
    pairs = torch.cat([z.flatten(1), data.flatten(1)], 1)  # one tensor so _fit shuffles both together
    nz = z[0].numel()
    frozen = [(p, p.requires_grad) for p in rx.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        opt = torch.optim.Adam(eq.parameters(), lr=cfg.lr)
        _fit(lambda b: F.mse_loss(rx.decoder(eq(b[:, :nz].view(-1, *z.shape[1:]))), b[:, nz:].view(-1, 3, 32, 32)),
             pairs, opt, cfg.epochs, cfg.batch_size, sc.seed, f"equalizer {sc.domain}/{sc.side}", sc.progress,
             sc.device)
    finally:
        for p, rg in frozen:
            p.requires_grad_(rg)
    wall = time.perf_counter() - t0
    after = evaluate(tx, rx, sc.orig_test, sc.device, eq=eq)
    n_extra = sum(p.numel() for p in eq.parameters())
    return MethodResult("equalizer", sc.domain, sc.side, {"misaligned": before, "realigned": after}, wall,
                        data.shape[0] * (SEMANTIC_BYTES + IMAGE_BYTES), n_extra, {"config": asdict(cfg)},
                        artifact=eq)


def slf(sc: Scenario, cfg: SLFConfig) -> MethodResult:
    """Split learning with layer freezing (SLF).

    The Tx downloads the Rx decoder (all its parameters and BatchNorm buffers), freezes its last
    ``cfg.frozen`` of 6 stages, fine-tunes the remaining stages behind its own (frozen) encoder on
    ``cfg.n_samples`` original-domain images, and uploads the fine-tuned stages (parameters and
    buffers). Bytes = download + upload. The Tx encoder is kept so its domain adaptation survives.
    """
    if not 0 <= cfg.frozen <= 6:
        raise ValueError(f"SLF frozen must be in [0, 6] decoder stages, got {cfg.frozen}")
    t0 = time.perf_counter()
    tx, rx0 = sc.misaligned_pair()
    before = evaluate(tx, rx0, sc.orig_test, sc.device)
    rx = copy.deepcopy(rx0)
    stages = rx.rx_blocks()
    trainable = stages[:6 - cfg.frozen]
    download = param_bytes(list(rx.decoder.parameters()) + list(rx.decoder.buffers()))
    upload = param_bytes([t for s in trainable for t in list(s.parameters()) + list(s.buffers())])
    g = torch.Generator().manual_seed(sc.seed)
    data = sc.orig_train[torch.randperm(sc.orig_train.shape[0], generator=g)[:cfg.n_samples]].to(sc.device)
    tx.eval()
    with torch.no_grad():
        z = tx.link(tx.encoder(data))
    rx.eval()
    for s in trainable:
        s.train()
    params = [p for s in trainable for p in s.parameters()]
    for p in rx.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    losses = []
    if params:
        pairs = torch.cat([z.flatten(1), data.flatten(1)], 1)
        nz = z[0].numel()
        opt = torch.optim.Adam(params, lr=cfg.lr)
        losses = _fit(lambda b: F.mse_loss(rx.decoder(b[:, :nz].view(-1, *z.shape[1:])),
                                           b[:, nz:].view(-1, 3, 32, 32)),
                      pairs, opt, cfg.epochs, cfg.batch_size, sc.seed, f"SLF F={cfg.frozen} {sc.domain}/{sc.side}",
                      sc.progress, sc.device)
    for p in rx.parameters():
        p.requires_grad_(True)
    wall = time.perf_counter() - t0
    after = evaluate(tx, rx, sc.orig_test, sc.device)
    return MethodResult(f"slf_F{cfg.frozen}", sc.domain, sc.side, {"misaligned": before, "realigned": after},
                        wall, download + upload, 0,
                        {"config": asdict(cfg), "download_bytes": download, "upload_bytes": upload,
                         "losses": losses}, artifact=rx)
