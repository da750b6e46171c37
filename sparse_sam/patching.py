"""``patch(model, ...)``: make a model's weights sparse-adaptable in place; ``unpatch(model)``: undo it.

Zero-forget contract: after ``patch → train → export → unpatch`` every tensor of ``model.state_dict()``
is bit-identical to before the patch, buffers included, and every module has its class, flags and hooks
back. Base parameters are frozen while patched and normalisation layers keep their running statistics
(see ``norm``), so nothing the adaptation touches lives outside the added ``scores``/``delta`` tensors,
which leave with :func:`unpatch`. How a patched weight is computed: :mod:`sparse_sam.modules`.

:func:`patch` is transactional: it checks everything it can before the first change, and if anything
raises after a change, every change is rolled back before the exception propagates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import backends, ops
from .budget import ALLOCATIONS, _check_sparsity, budgets_for, find_targets
from .modules import PatchedWeight, SAMLayer, delta_dtype, sam_class
from .patchfile import index_dtype
from .reference import DELTA_GRAD_MODES, bits_view

__all__ = ["SAMConfig", "SAMHandle", "patch", "unpatch", "patched", "resume", "NORM_MODES"]

NORM_MODES = ("frozen", "batch")
_HANDLE_ATTR = "_sparse_sam_handle"
STATE_FORMAT, STATE_VERSION = "sparse_sam.handle", 1


@dataclass
class SAMConfig:
    """Every option of :func:`patch`; stored in exported patch files (``SparsePatch.config``).

    Attributes:
        sparsity: ``γ`` in (0, 1]: the fraction of the selected weights the patch may modify.
        allocation: per-weight budgets, "linear" (paper eq. 11) or "uniform".
        learn_mask: learn the mask through the scores (True) or keep the initial random mask (False).
        delta_grad: "masked" (``grad_v = m ⊙ g``, paper eq. 8) or "dense" (``grad_v = g``: every delta
            learns, so scores of unmasked weights get a gradient too).
        norm: "frozen" (normalisation layers use their running statistics, also in train mode) or "batch"
            (batch statistics in train mode). Either way their buffers never change.
        layers: module types whose weights are patched (default: every supported kind, see
            :mod:`sparse_sam.budget`).
        target_parameters: glob patterns over qualified parameter names, e.g. ``["*.weight", "encoder.*"]``;
            replaces the default selection when given.
        filter_fn: ``filter_fn(module_name, module) -> bool``, asked for the module owning each weight.
        seed: seed of the initial scores ~ N(0, 1) (drawn on the CPU; the same on every device).
        backend: force a backend for every op (see :mod:`sparse_sam.backends`).
        stack: allow patching a model that has a :class:`~sparse_sam.SparsePatch` applied (the new
            patch then adapts the patched weights; remove the two in reverse order).
    """

    sparsity: float = 0.01
    allocation: str = "linear"
    learn_mask: bool = True
    delta_grad: str = "masked"
    norm: str = "frozen"
    layers: tuple[type, ...] | None = None
    target_parameters: tuple[str, ...] | None = None
    filter_fn: Callable[[str, nn.Module], bool] | None = field(default=None, compare=False)
    seed: int | None = None
    backend: str | None = None
    stack: bool = False

    def validate(self) -> "SAMConfig":
        """Check every value (environment included); returns a normalised copy. Raises ValueError/TypeError."""
        _check_sparsity(self.sparsity)
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.delta_grad not in DELTA_GRAD_MODES:
            raise ValueError(f"delta_grad must be one of {DELTA_GRAD_MODES}, got {self.delta_grad!r}")
        if self.norm not in NORM_MODES:
            raise ValueError(f"norm must be one of {NORM_MODES}, got {self.norm!r}")
        backends._forced(self.backend)  # unknown names, also from SPARSE_SAM_BACKEND, raise here
        layers = None if self.layers is None else tuple(self.layers)
        if layers is not None and not all(isinstance(t, type) and issubclass(t, nn.Module) for t in layers):
            raise TypeError(f"layers must be nn.Module subclasses, got {self.layers!r}")
        tp = self.target_parameters
        if isinstance(tp, str):
            tp = (tp,)
        if tp is not None and not all(isinstance(p, str) for p in tp):
            raise TypeError(f"target_parameters must be glob strings, got {self.target_parameters!r}")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn must be callable, got {self.filter_fn!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or int(self.seed) != self.seed):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        return dataclasses.replace(self, sparsity=float(self.sparsity), layers=layers,
                                   target_parameters=None if tp is None else tuple(tp),
                                   learn_mask=bool(self.learn_mask), stack=bool(self.stack))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (module types by qualified name; ``filter_fn`` by its repr only)."""
        d = dataclasses.asdict(dataclasses.replace(self, filter_fn=None))
        d["layers"] = None if self.layers is None else [f"{t.__module__}.{t.__qualname__}" for t in self.layers]
        d["target_parameters"] = None if self.target_parameters is None else list(self.target_parameters)
        d["filter_fn"] = None if self.filter_fn is None else repr(self.filter_fn)
        return d

    @classmethod
    def from_dict(cls, d: dict, filter_fn: Callable | None = None) -> "SAMConfig":
        """Inverse of :meth:`to_dict`. A stored ``filter_fn`` cannot be rebuilt: pass it again."""
        d = dict(d)
        if d.get("filter_fn") is not None and filter_fn is None:
            raise ValueError(f"this config was made with filter_fn={d['filter_fn']}; pass filter_fn= again")
        d["filter_fn"] = filter_fn
        if d.get("layers") is not None:
            types = []
            for qual in d["layers"]:
                mod, _, name = qual.rpartition(".")
                types.append(getattr(importlib.import_module(mod), name))
            d["layers"] = tuple(types)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class SAMHandle:
    """What :func:`patch` returns: the patched weights of one model and the operations on them.

    Attributes:
        model: the patched model.
        layers: qualified parameter name → :class:`~sparse_sam.modules.PatchedWeight`, in model order
            (one entry per unique Parameter; a tied weight appears once).
        config: the :class:`SAMConfig` it was patched with (``sparsity``, ``allocation``, ... are also
            attributes of the handle).
        skipped: floating parameters of ≥ 2 dimensions that the default selection could not patch.
    """

    def __init__(self, model: nn.Module, layers: dict[str, PatchedWeight], config: SAMConfig,
                 skipped: list[str]):
        self.model, self.layers, self.config, self.skipped = model, layers, config, skipped
        self._restore: list[Callable[[], None]] = []
        self._disabled = 0
        self._step_hook = None
        self._initial_masks: list[torch.Tensor] = []

    def __getattr__(self, name):  # sparsity, allocation, learn_mask, delta_grad, backend, norm, ...
        config = self.__dict__.get("config")
        if config is not None and name in {f.name for f in dataclasses.fields(SAMConfig)}:
            return getattr(config, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _activate(self) -> None:
        """Wire the patched weights to this handle and compute the first masks."""
        for pw in self.layers.values():
            pw._refresh = self.refresh_masks
            pw._off = self._is_disabled
        self.refresh_masks()
        self._initial_masks = [pw.mask.clone() for pw in self.layers.values()]

    def _is_disabled(self) -> bool:
        return self._disabled > 0

    # -- masks ------------------------------------------------------------------------------------
    def refresh_masks(self) -> None:
        """Recompute every mask from its scores: one ``topk_mask`` call per device."""
        by_device: dict[torch.device, list[tuple[str, PatchedWeight]]] = {}
        for name, pw in self.layers.items():
            by_device.setdefault(pw.scores.device, []).append((name, pw))
        for group in by_device.values():
            pws = [pw for _, pw in group]
            masks = ops.topk_mask([pw.scores for pw in pws], [pw.k for pw in pws], backend=self.config.backend,
                                  names=[n for n, _ in group])
            for pw, mask in zip(pws, masks):
                pw.mask.copy_(mask)
                pw._mask_version = pw.scores._version

    def refresh_stale_masks(self) -> None:
        """Recompute the masks if any scores changed since they were last computed."""
        if any(pw.mask_stale() for pw in self.layers.values()):
            self.refresh_masks()

    def flipped_fraction(self) -> float:
        """Fraction of mask entries (over all weights) that differ from the mask at patch time."""
        self.refresh_stale_masks()
        changed = sum(int((pw.mask != m0).sum()) for pw, m0 in zip(self.layers.values(), self._initial_masks))
        return changed / sum(m0.numel() for m0 in self._initial_masks)

    # -- switching off ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def disabled(self):
        """``with handle.disabled():`` the model computes the base function bit for bit (every patched
        attribute reads the base Parameter), without unpatching: evaluate the base mid-training."""
        self._disabled += 1
        try:
            yield self.model
        finally:
            self._disabled -= 1

    # -- training -----------------------------------------------------------------------------------
    def param_groups(self, lr_scores: float = 1.0, lr_delta: float = 1e-4) -> list[dict]:
        """Parameter groups for any ``torch.optim`` optimiser: scores (when learned) and deltas."""
        groups = [{"params": [pw.delta for pw in self.layers.values()], "lr": lr_delta, "name": "delta"}]
        if self.config.learn_mask:
            groups.insert(0, {"params": [pw.scores for pw in self.layers.values()], "lr": lr_scores,
                              "name": "scores"})
        return groups

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (scores when learned, then deltas)."""
        return [p for g in self.param_groups() for p in g["params"]]

    # -- resuming -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume training bit-identically in another process (with the
        optimiser's own ``state_dict``): config, and per weight its scores, deltas, initial mask.
        Tensors are CPU copies; save it with ``torch.save``."""
        self.refresh_stale_masks()
        layers = {name: {"scores": pw.scores.detach().cpu().clone(), "delta": pw.delta.detach().cpu().clone(),
                         "initial_mask": m0.cpu().clone(), "k": pw.k}
                  for (name, pw), m0 in zip(self.layers.items(), self._initial_masks)}
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "config": self.config.to_dict(), "layers": layers}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output into this handle (same model and config). Checks everything
        before the first write; then copies scores and deltas in place and recomputes the masks."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a sparse_sam handle state (missing format tag)")
        layers = state["layers"]
        if list(layers) != list(self.layers):
            raise ValueError(f"handle state is for weights {list(layers)[:4]}..., this handle has "
                             f"{list(self.layers)[:4]}...")
        for name, pw in self.layers.items():
            s = layers[name]
            if int(s["k"]) != pw.k:
                raise ValueError(f"'{name}': state has budget k={s['k']}, the handle {pw.k}")
            for key, t in (("scores", pw.scores), ("delta", pw.delta), ("initial_mask", pw.mask)):
                if s[key].shape != t.shape or s[key].dtype != t.dtype:
                    raise ValueError(f"'{name}': state's {key} is {s[key].dtype} {tuple(s[key].shape)}, "
                                     f"expected {t.dtype} {tuple(t.shape)}")
        with torch.no_grad():
            for name, pw in self.layers.items():
                pw.scores.copy_(layers[name]["scores"])
                pw.delta.copy_(layers[name]["delta"])
        self._initial_masks = [layers[n]["initial_mask"].to(pw.mask.device) for n, pw in self.layers.items()]
        self.refresh_masks()

    # -- reporting ----------------------------------------------------------------------------------
    def summary(self) -> list[dict]:
        """Per weight: name, type, d_in, d_out, k, p, γ_k = k/p, the patch bytes (lossless encoding), and
        how many places share it (``tied``)."""
        rows = []
        for name, pw in self.layers.items():
            p = pw.weight.numel()
            owner_cls = pw.owner._sam_base if isinstance(pw.owner, SAMLayer) else type(pw.owner)
            rows.append({"name": name, "type": owner_cls.__name__, "d_in": pw.d_in, "d_out": pw.d_out, "k": pw.k, "p": p, "gamma_k": pw.k / p,
                         "bytes": pw.k * (index_dtype(p).itemsize + pw.delta.element_size()),
                         "tied": len(pw.names)})
        return rows

    def __repr__(self) -> str:
        rows = self.summary()
        w = max([len(r["name"]) for r in rows] + [5])
        c = self.config
        lines = [f"SAMHandle(sparsity={c.sparsity}, allocation={c.allocation!r}, learn_mask={c.learn_mask}, "
                 f"delta_grad={c.delta_grad!r})",
                 f"{'weight':<{w}}  {'type':<18} {'k':>9} {'p':>11} {'gamma_k':>9} {'bytes':>9}"]
        for r in rows:
            tied = f"  (tied x{r['tied']})" if r["tied"] > 1 else ""
            lines.append(f"{r['name']:<{w}}  {r['type']:<18} {r['k']:>9} {r['p']:>11} "
                         f"{r['gamma_k']:>9.4%} {r['bytes']:>9}{tied}")
        k, p = sum(r["k"] for r in rows), sum(r["p"] for r in rows)
        lines.append(f"{'total':<{w}}  {'':<18} {k:>9} {p:>11} {k / p:>9.4%} {sum(r['bytes'] for r in rows):>9}")
        return "\n".join(lines)

    # -- export / undo ------------------------------------------------------------------------------
    def export(self, encoding: str = "fp32"):
        """The learned modification as a :class:`~sparse_sam.SparsePatch` (indices where the mask is set,
        the deltas there, a fingerprint of the base weights, and the config)."""
        from .patchfile import SparsePatch

        return SparsePatch.from_handle(self, encoding=encoding)

    def unpatch(self) -> nn.Module:
        """Put everything back (same as :func:`unpatch`)."""
        return unpatch(self.model)


def _refresh_after_step(handle: SAMHandle):
    """An optimiser step post-hook that refreshes ``handle``'s masks; holds the handle weakly."""
    ref = weakref.ref(handle)

    def hook(optimizer, args, kwargs) -> None:
        h = ref()
        if h is not None:
            h.refresh_stale_masks()

    return hook


# ------------------------------------------------------------------------------------- transactions
# Tests set this to a callable(label) that raises, to inject a failure before any step of patch().
_before_step: Callable[[str], None] | None = None


class _Transaction:
    """Changes with their undo steps. Each undo is recorded *before* its change runs and tolerates a
    change that did not (fully) happen, so a failure anywhere rolls back cleanly."""

    def __init__(self):
        self.undo: list[Callable[[], None]] = []

    def step(self, label: str, do: Callable[[], object], undo: Callable[[], None]):
        if _before_step is not None:
            _before_step(label)
        self.undo.append(undo)
        return do()

    def rollback(self) -> None:
        errors = []
        for u in reversed(self.undo):
            try:
                u()
            except Exception as e:  # keep undoing; report after
                errors.append(e)
        self.undo.clear()
        if errors:
            raise RuntimeError(f"rollback of a failed patch() hit {len(errors)} error(s): {errors!r}")


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _freeze_norm(tx: _Transaction, m: nn.Module, norm: str) -> None:
    """Keep one normalisation layer's buffers bit-identical while patched."""
    if norm == "batch":  # batch statistics in training, running statistics never updated
        tx.step("norm", lambda: setattr(m, "track_running_stats", False),
                lambda: setattr(m, "track_running_stats", True))
        return
    # "frozen": normalise with the running statistics even in train mode, as at deployment

    def pre(mod, args):
        mod._sparse_sam_training = mod.training
        mod.training = False

    def post(mod, args, out):
        mod.training = mod.__dict__.pop("_sparse_sam_training")

    hooks = []
    tx.step("norm", lambda: hooks.extend((m.register_forward_pre_hook(pre), m.register_forward_hook(post))),
            lambda: [h.remove() for h in hooks])


def _frozen_matrices(model: nn.Module, targets: dict, flags: list) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module, its Parameters) for every module that directly holds a 2-D floating Parameter which was
    trainable before patch() froze it and which is not a selected weight."""
    selected = {id(t.param) for t in targets.values()}
    trainable = {id(p) for p, rg in flags if rg}
    out = []
    for m in model.modules():
        ps = [p for p in m._parameters.values() if p is not None and p.dim() == 2 and p.is_floating_point()
              and id(p) in trainable and id(p) not in selected]
        if ps:
            out.append((m, ps))
    return out


def _mirror_flags(tx: _Transaction, frozen: list[tuple[nn.Module, list[nn.Parameter]]]) -> None:
    """Outside autograd, give the frozen weights of ``frozen`` their ``requires_grad=True`` back for the
    duration of their module's forward.

    PyTorch's ``matmul`` folds a 3-D input into one matrix product or not depending on whether the 2-D
    operand requires grad, even under ``torch.no_grad`` (a non-contiguous input, e.g. a batch-first LSTM
    output, through ``nn.Linear``, gives other last bits). A weight the selection left out is frozen
    while patched, so without this a patched model under ``no_grad`` would compute other bits than the
    applied patch (and :meth:`SAMHandle.disabled` other bits than the base) in such a layer. Selected
    weights mirror their flag themselves (:meth:`PatchedWeight.effective`). In a grad-mode forward the
    weights stay frozen, so that no gradient reaches them; there the last bits of such a layer may
    differ from the unpatched model's. A per-Parameter count keeps the flag on while any module using it
    runs (tied or nested), and the forward hook runs even when the forward raises, so the weights are
    frozen again whatever happens.
    """
    lock = threading.Lock()
    depth: dict[int, int] = {}  # id(Parameter) -> forwards now running with its flag given back

    def hooks(ps: list[nn.Parameter]):
        entered: list[bool] = []  # per call of this module, outermost first: whether it gave the flags back

        def pre(mod, args):
            on = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            with lock:
                entered.append(on)
                if on:
                    for p in ps:
                        depth[id(p)] = depth.get(id(p), 0) + 1
                        if depth[id(p)] == 1:
                            p.requires_grad_(True)

        def post(mod, args, out):
            with lock:
                if not entered or not entered.pop():
                    return
                for p in ps:
                    depth[id(p)] -= 1
                    if depth[id(p)] == 0:
                        del depth[id(p)]
                        p.requires_grad_(False)

        return pre, post

    for m, ps in frozen:
        pre, post = hooks(ps)
        handles = []

        def add(m=m, pre=pre, post=post, handles=handles):
            handles.extend((m.register_forward_pre_hook(pre), m.register_forward_hook(post, always_call=True)))

        tx.step("flags", add, lambda handles=handles: [h.remove() for h in handles])


def _as_config(config, kwargs) -> SAMConfig:
    if isinstance(config, SAMConfig):
        cfg = dataclasses.replace(config, **kwargs) if kwargs else config
    else:
        if config is not None:
            if "sparsity" in kwargs:
                raise TypeError("sparsity given twice (positionally and as a keyword)")
            kwargs = {**kwargs, "sparsity": config}
        unknown = set(kwargs) - {f.name for f in dataclasses.fields(SAMConfig)}
        if unknown:
            raise TypeError(f"patch() got unknown option(s) {sorted(unknown)}; options are the fields of "
                            f"SAMConfig: {[f.name for f in dataclasses.fields(SAMConfig)]}")
        if "sparsity" not in kwargs:
            raise TypeError("patch() needs a sparsity (e.g. patch(model, 0.01)) or a SAMConfig")
        cfg = SAMConfig(**kwargs)
    return cfg.validate()


def _check_model(model: nn.Module, cfg: SAMConfig):
    """Every check that needs the model, before anything changes; returns the targets and budgets."""
    from .patchfile import applied_patch

    if getattr(model, _HANDLE_ATTR, None) is not None or any(isinstance(m, SAMLayer) for m in model.modules()):
        raise ValueError("model is already patched; call sparse_sam.unpatch(model) first")
    if applied_patch(model) is not None and not cfg.stack:
        raise ValueError("model has a SparsePatch applied; remove it first, or pass stack=True to adapt the "
                         "patched weights (then unpatch and remove in reverse order)")
    targets, skipped = find_targets(model, cfg.layers, cfg.filter_fn, cfg.target_parameters)
    if not targets:
        what = (f"parameter matches {list(cfg.target_parameters)}" if cfg.target_parameters is not None
                else "supported weight" + (f" of types {[t.__name__ for t in cfg.layers]}" if cfg.layers else ""))
        raise ValueError(f"no layer selected: the model has no {what} passing filter_fn")
    for name, t in targets.items():
        p = t.param
        try:
            bits_view(p.detach())
        except TypeError:
            raise ValueError(f"weight '{name}' has dtype {p.dtype}; sparse_sam patches float64/32/16 and "
                             "bfloat16 weights") from None
        if not p.is_contiguous():
            raise ValueError(f"weight '{name}' is not contiguous; patches address weights by flat index")
        if p.is_meta:
            raise ValueError(f"weight '{name}' is on the meta device; materialise the model first")
        for _, m, attr in t.users:
            if isinstance(type(m).__dict__.get(attr), property) or any(
                    isinstance(c.__dict__.get(attr), property) for c in type(m).__mro__):
                raise ValueError(f"'{name}' is already a computed attribute of {type(m).__name__} "
                                 "(a parametrization?); remove it first")
    for dev, probe in {t.param.device: t.param for t in targets.values()}.items():
        for op in ("topk_mask", "sam_weight"):
            backends.resolve(op, probe, cfg.backend)  # a forced backend that cannot run raises here
    ks = budgets_for(targets, cfg.sparsity, cfg.allocation)
    if sum(ks.values()) == 0:
        raise ValueError(f"sparsity {cfg.sparsity} of {sum(t.numel for t in targets.values())} weights rounds "
                         "to a budget of 0")
    return targets, skipped, ks


def patch(model: nn.Module, config: SAMConfig | float | None = None, /, **options) -> SAMHandle:
    """Make the selected weights of ``model`` adaptable in place as ``W + m ⊙ v``; returns a :class:`SAMHandle`.

    ``patch(model, 0.01)``, ``patch(model, sparsity=0.01, allocation="uniform")`` and
    ``patch(model, SAMConfig(sparsity=0.01))`` all work; options are the fields of :class:`SAMConfig`.

    What changes while patched (all undone by :func:`unpatch`):

    * every module holding a selected weight gets a subclass of its own class in which that attribute
      is computed as ``W + m ⊙ v`` (:mod:`sparse_sam.modules`); it gains ``<attr>_sam_scores``,
      ``<attr>_sam_delta`` Parameters and a ``<attr>_sam_mask`` buffer (one set per unique weight);
    * every base parameter is frozen (``requires_grad=False``); outside autograd, a 2-D weight left out
      of the selection gets its flag back while its module runs, so that PyTorch picks the kernels it
      would pick unpatched (``_mirror_flags``);
    * normalisation layers never update their running statistics (``norm``).

    Unsupported weights (floating, ≥ 2-D, of no kind in :mod:`sparse_sam.budget`'s table) are skipped
    with one warning listing them; name them in ``target_parameters`` to patch them anyway.

    Raises:
        ValueError / TypeError: already patched, a patch applied (without ``stack=True``), empty
            selection, a bad option or environment value, an unsupported dtype, a budget that rounds to
            zero. :class:`~sparse_sam.backends.BackendUnavailable`: a forced backend cannot run.
            Nothing is changed when it raises, whatever the error: a failure after the first change rolls
            every change back.
    """
    cfg = _as_config(config, options)
    targets, skipped, ks = _check_model(model, cfg)
    generator = torch.Generator().manual_seed(int(cfg.seed)) if cfg.seed is not None else None
    # Draw on the CPU so that a seed gives the same scores on every device.
    fresh = {n: (torch.randn(t.param.shape, generator=generator, dtype=torch.float32).to(t.param.device),
                 torch.zeros(t.param.shape, dtype=delta_dtype(t.param.dtype), device=t.param.device))
             for n, t in targets.items()}

    flags0 = {n: t.param.requires_grad for n, t in targets.items()}
    tx = _Transaction()
    try:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        tx.step("freeze", lambda: [p.requires_grad_(False) for p, _ in flags],
                lambda: [p.requires_grad_(rg) for p, rg in flags])
        _mirror_flags(tx, _frozen_matrices(model, targets, flags))
        for m in _norm_layers(model):
            _freeze_norm(tx, m, cfg.norm)
        layers: dict[str, PatchedWeight] = {}
        per_module: dict[int, tuple[nn.Module, dict[str, PatchedWeight]]] = {}
        for name, t in targets.items():
            _, owner, attr = t.users[0]
            pw = PatchedWeight(name, t.names, owner, attr, t.kind or "param", t.d_in, t.d_out, ks[name],
                               cfg.delta_grad, cfg.backend)
            pw.requires_grad0 = flags0[name]
            scores, delta = fresh[name]
            tx.step("register", lambda pw=pw, s=scores, d=delta: pw.register(s, d), pw.unregister)
            if not cfg.learn_mask:
                pw.scores.requires_grad_(False)
            layers[name] = pw
            for _, m, a in t.users:
                pw.users.append((m, a))
                per_module.setdefault(id(m), (m, {}))[1][a] = pw
        for m, params in per_module.values():
            old_cls = type(m)

            def swap(m=m, params=params, old_cls=old_cls):
                m.__dict__["_sam_params"] = params
                m.__class__ = sam_class(old_cls, tuple(params))

            def unswap(m=m, old_cls=old_cls):
                m.__class__ = old_cls
                m.__dict__.pop("_sam_params", None)

            tx.step("class", swap, unswap)
        handle = SAMHandle(model, layers, cfg, skipped)
        tx.step("masks", handle._activate, lambda: [setattr(pw, "_refresh", None) for pw in layers.values()])
        # Masks follow the scores after every optimiser step, so a torch.compile'd forward (which cannot
        # check the scores' versions) always reads current masks; eager forwards check again.
        hook_box = []
        tx.step("hook", lambda: hook_box.append(register_optimizer_step_post_hook(_refresh_after_step(handle))),
                lambda: [h.remove() for h in hook_box])
        handle._step_hook = hook_box[0]
        weakref.finalize(handle, handle._step_hook.remove)  # a handle dropped without unpatch leaves no hook
        tx.step("attach", lambda: object.__setattr__(model, _HANDLE_ATTR, handle),
                lambda: model.__dict__.pop(_HANDLE_ATTR, None))
    except BaseException:
        tx.rollback()
        raise
    handle._restore = tx.undo
    if skipped:
        warnings.warn(f"sparse_sam.patch: {len(skipped)} floating weight(s) of no supported kind were skipped: "
                      f"{', '.join(skipped)}. Name them in target_parameters=[...] to patch them.", stacklevel=2)
    return handle


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: classes, flags, hooks and norm layers back; added tensors removed.

    Every tensor of ``model.state_dict()`` is then bit-identical to before the patch.
    """
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError("model is not patched (no sparse_sam.patch handle on it)")
    for undo in reversed(handle._restore):
        undo()
    handle._restore = []
    for pw in handle.layers.values():
        pw._refresh = None
        pw._off = None
    return model


def resume(model: nn.Module, state: dict, filter_fn: Callable | None = None) -> SAMHandle:
    """Patch ``model`` with the config stored in ``state`` (:meth:`SAMHandle.state_dict`) and load it.

    With the optimiser's own ``state_dict`` restored too, training continues bit-identically.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError("not a sparse_sam handle state (missing format tag)")
    cfg = SAMConfig.from_dict(state["config"], filter_fn=filter_fn)
    handle = patch(model, cfg)
    try:
        handle.load_state_dict(state)
    except BaseException:
        unpatch(model)
        raise
    return handle


@contextlib.contextmanager
def patched(model: nn.Module, config: SAMConfig | float | None = None, /, **options):
    """``with patched(model, γ) as handle:`` patch for the duration of the block, unpatch after."""
    handle = patch(model, config, **options)
    try:
        yield handle
    finally:
        unpatch(model)
