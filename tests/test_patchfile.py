"""Patch files: round trips, both encodings, every bad-file case, wrong base, atomic saves."""
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import sparse_sam
from sparse_sam import PatchFileError, PatchMismatchError
from conftest import PaperAutoEncoder, assert_same_bits, raw_bits, state_bits


@pytest.fixture
def trained():
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    handle = sparse_sam.patch(model, 0.05, seed=0)
    with torch.no_grad():
        for m in handle.layers.values():
            m.delta.normal_(0, 0.1)
    fp32, compact = handle.export("fp32"), handle.export("compact")
    sparse_sam.unpatch(model)
    return model, fp32, compact


def test_round_trip_fp32_is_exact(trained, tmp_path):
    model, patch, _ = trained
    path = tmp_path / "p.sam"
    patch.save(path)
    loaded = sparse_sam.load_patch(path)
    assert loaded.fingerprint == patch.fingerprint and loaded.num_modified == patch.num_modified
    for a, b in zip(patch.layers, loaded.layers):
        assert a.name == b.name and a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a.indices, b.indices) and torch.equal(a.deltas.view(torch.int32), b.deltas.view(torch.int32))
    assert patch.nbytes == 8 * patch.num_modified
    with patch.applied(model):
        on_a = state_bits(model)
    with loaded.applied(model):
        assert_same_bits(on_a, state_bits(model))
    assert not list(tmp_path.glob(".sam-*")), "temporary file left behind"


def test_compact_round_trip_and_size(trained, tmp_path):
    model, fp32, compact = trained
    assert compact.nbytes <= 4 * compact.num_modified
    compact.save(tmp_path / "c.sam")
    loaded = sparse_sam.load_patch(tmp_path / "c.sam")
    for a, b, f in zip(compact.layers, loaded.layers, fp32.layers):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, f.indices)
        assert torch.equal(a.deltas, b.deltas)
        torch.testing.assert_close(b.deltas, f.deltas, rtol=1e-3, atol=1e-4)
    before = state_bits(model)
    with loaded.applied(model):
        pass
    assert_same_bits(before, state_bits(model))


def test_compact_gap_escapes_for_long_gaps():
    model = nn.Sequential(nn.Linear(1000, 300))  # 300k weights, k=3: gaps far above 65535
    handle = sparse_sam.patch(model, 1e-5, seed=1)
    with torch.no_grad():
        handle.layers["0.weight"].scores.view(-1)[[5, 140000, 299999]] = 100.0
    handle.refresh_masks()
    patch = handle.export("compact")
    sparse_sam.unpatch(model)
    assert patch.layers[0].indices.tolist() == [5, 140000, 299999]
    tensors = patch._tensors()
    assert (tensors["0.gaps"] == 0).sum() > 0  # escapes were needed
    from sparse_sam.patchfile import _decode_gaps
    assert _decode_gaps(tensors["0.gaps"], 300000).tolist() == [5, 140000, 299999]


def rewrite(path, out, tensors=None, meta=None):
    t = load_file(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        m = json.loads(f.metadata()["sparse_sam"])
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, out, metadata={"sparse_sam": json.dumps(m)})
    return out


def _set(t, key, value):
    t[key] = value


BAD = {
    "out_of_range": (lambda t: _set(t, "0.indices", torch.tensor(list(range(len(t["0.indices"]) - 1)) + [10**6],
                                                                 dtype=torch.int32)), None, "outside"),
    "duplicate": (lambda t: _set(t, "0.indices", torch.cat([t["0.indices"][:1], t["0.indices"][:-1]])), None,
                  "strictly increasing"),
    "unsorted": (lambda t: _set(t, "0.indices", t["0.indices"].flip(0)), None, "strictly increasing"),
    "wrong_index_dtype": (lambda t: _set(t, "0.indices", t["0.indices"].long()), None, "int32"),
    "wrong_delta_dtype": (lambda t: _set(t, "0.deltas", t["0.deltas"].double()), None, "float32"),
    "wrong_count": (lambda t: _set(t, "0.deltas", t["0.deltas"][:-1]), None, "declares k="),
    "missing_tensor": (lambda t: t.pop("1.deltas"), None, "missing"),
    "extra_tensor": (lambda t: _set(t, "evil", torch.zeros(1)), None, "unexpected"),
    "bad_format": (None, lambda m: m.update(format="other"), "format"),
    "future_version": (None, lambda m: m.update(version=99), "newer"),
    "bad_layer_spec": (None, lambda m: m["layers"][0].pop("shape"), "malformed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_raise_clear_errors(trained, tmp_path, case):
    model, patch, _ = trained
    path = str(tmp_path / "good.sam")
    patch.save(path)
    tens, meta, match = BAD[case]
    bad = rewrite(path, str(tmp_path / "bad.sam"), tens, meta)
    before = state_bits(model)
    with pytest.raises(PatchFileError, match=match):
        sparse_sam.load_patch(bad)
    assert_same_bits(before, state_bits(model))


def test_truncated_and_garbage_files(trained, tmp_path):
    _, patch, _ = trained
    path = tmp_path / "p.sam"
    patch.save(path)
    data = path.read_bytes()
    for i, blob in enumerate([data[: len(data) // 2], data[:7], b"not a patch at all", b""]):
        p = tmp_path / f"bad{i}.sam"
        p.write_bytes(blob)
        with pytest.raises(PatchFileError, match="truncated or corrupt"):
            sparse_sam.load_patch(p)


def test_mismatched_models_raise_and_stay_untouched(trained):
    model, patch, _ = trained
    other = PaperAutoEncoder(w=4)  # same architecture, different base weights
    before = state_bits(other)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        patch.apply(other)
    assert_same_bits(before, state_bits(other))
    patch.apply(other, strict=False)
    assert any(not torch.equal(before[k], v) for k, v in state_bits(other).items())
    patch.remove(other)
    assert_same_bits(before, state_bits(other))
    wider = PaperAutoEncoder(w=5)
    with pytest.raises(PatchMismatchError, match="shape"):
        patch.apply(wider)
    with pytest.raises(PatchMismatchError, match="does not exist"):
        patch.apply(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(PatchMismatchError, match="float64"):
        patch.apply(PaperAutoEncoder(w=4).double())


def test_double_apply_and_remove_without_apply(trained):
    model, patch, compact = trained
    with pytest.raises(PatchMismatchError, match="not applied"):
        patch.remove(model)
    patch.apply(model)
    with pytest.raises(PatchMismatchError, match="already applied"):
        patch.apply(model)
    with pytest.raises(PatchMismatchError, match="another patch"):
        compact.apply(model)
    with pytest.raises(PatchMismatchError, match="not applied"):
        compact.remove(model)
    patch.remove(model)


def test_failed_save_keeps_previous_file(trained, tmp_path, monkeypatch):
    _, patch, compact = trained
    path = tmp_path / "p.sam"
    patch.save(path)
    old = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        compact.save(path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.sam"]


def test_sizes_and_ratio(trained):
    model, patch, compact = trained
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert patch.ratio(model) == pytest.approx(patch.nbytes / model_bytes)
    assert compact.nbytes < patch.nbytes


# ------------------------------------------------------------------ the prepared CPU switch (SwapPlan)
def _plan(patch, model):
    return patch._bindings[model].plan


def _same_bits(xs, ys) -> bool:
    """Each tensor of ``xs`` has the raw bits of its partner in ``ys``."""
    return all(torch.equal(raw_bits(x), raw_bits(y)) for x, y in zip(xs, ys, strict=True))


def _on_and_base(model, patch):
    """The model's state bits with ``patch`` applied, then after it is removed."""
    with patch.applied(model):
        on = state_bits(model)
    return on, state_bits(model)


def test_switching_uses_one_prepared_plan_and_bumps_versions(trained):
    model, patch, _ = trained
    on, base = _on_and_base(model, patch)
    plan = _plan(patch, model)
    if plan is None:
        pytest.skip("the compiled extension is not loaded: switching runs on the torch backend")
    w = model.get_parameter(patch.layers[0].name)
    for _ in range(3):  # later cycles reuse the plan, exactly
        v0 = w._version
        patch.apply(model)
        assert _plan(patch, model) is plan and w._version > v0
        assert_same_bits(on, state_bits(model))
        patch.remove(model)
        assert_same_bits(base, state_bits(model))


def test_a_switch_invalidates_what_autograd_saved(trained):
    """Switching is an in-place write: a graph that saved the old weights must not backprop silently."""
    model, patch, _ = trained
    patch.apply(model)
    patch.remove(model)
    x = torch.rand(2, 3, 32, 32)
    y = model(x).sum()
    patch.apply(model)
    try:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    finally:
        patch.remove(model)


def test_reallocated_weight_is_rebound_not_written_blind(trained):
    model, patch, _ = trained
    on, base = _on_and_base(model, patch)
    w = model.get_parameter(patch.layers[0].name)
    old_plan = _plan(patch, model)
    w.data = w.data.clone()  # new storage, same bits, no version bump on the old alias
    with patch.applied(model):
        assert_same_bits(on, state_bits(model))
        if old_plan is not None:
            assert _plan(patch, model) is not old_plan
    assert_same_bits(base, state_bits(model))


def test_remove_restores_a_weight_the_model_no_longer_holds(trained):
    model, patch, _ = trained
    on, base = _on_and_base(model, patch)
    owner_name, _, attr = patch.layers[0].name.rpartition(".")
    owner = model.get_submodule(owner_name)
    old = owner._parameters[attr]
    base_bits = old.detach().clone().view(torch.int32)
    patch.apply(model)
    setattr(owner, attr, nn.Parameter(old.detach().clone()))  # replaced while applied
    patch.remove(model)
    assert torch.equal(old.detach().view(torch.int32), base_bits)  # its holder gets the base back
    assert sparse_sam.applied_patch(model) is None
    setattr(owner, attr, old)
    again_on, again_base = _on_and_base(model, patch)  # the old weight back in place: as before
    assert_same_bits(on, again_on)
    assert_same_bits(base, again_base)


@pytest.mark.parametrize("plan", [True, False], ids=["native-plan", "exchange"])
def test_remove_after_a_weight_got_new_storage_restores_the_rest(trained, monkeypatch, plan):
    from sparse_sam import patchfile

    model, patch, _ = trained
    if not plan:
        monkeypatch.setattr(patchfile, "_has_swap_plan", lambda: False)
    on, base = _on_and_base(model, patch)
    assert (_plan(patch, model) is not None) == (plan and patchfile._has_swap_plan())
    moved_name = patch.layers[1].name
    patch.apply(model)
    w = model.get_parameter(moved_name)
    w.data = w.data.clone() + 1.0  # new storage, new contents, while applied
    new_bits = raw_bits(w.detach().clone())
    with pytest.warns(UserWarning, match=moved_name):
        patch.remove(model)
    assert sparse_sam.applied_patch(model) is None
    now = state_bits(model)
    for key in base:
        if key == moved_name:
            assert torch.equal(now[key], new_bits)  # its new contents are left alone
        else:
            assert torch.equal(now[key], base[key]), key


def test_editing_patch_indices_after_preparing_cannot_reach_the_weights(trained):
    model, patch, _ = trained
    on, _ = _on_and_base(model, patch)
    if _plan(patch, model) is None:
        pytest.skip("the compiled extension is not loaded")
    patch.layers[0].indices[0] = 10**9  # out of range; the prepared plan holds its own checked copy
    with patch.applied(model):
        assert_same_bits(on, state_bits(model))


def test_swap_plan_validates_before_writing():
    if not hasattr(torch.ops.sparse_sam, "swap_"):
        pytest.skip("the compiled extension is not loaded")
    from sparse_sam import _ext

    _ext.load()
    g = torch.Generator().manual_seed(3)
    ws = [torch.randn(37, generator=g), torch.randn(5, 7, generator=g)]
    before = [w.clone() for w in ws]
    good = [torch.tensor([0, 9, 36], dtype=torch.int32), torch.tensor([2, 34], dtype=torch.int64)]
    vals = [torch.randn(3, generator=g), torch.randn(2, generator=g)]
    with pytest.raises(ValueError, match="base-bits"):
        torch.classes.sparse_sam.SwapPlan(ws, good, vals, [], True)
    for bad in ([torch.tensor([0, 9, 37], dtype=torch.int32), good[1]],   # out of range
                [good[0], torch.tensor([34, 2], dtype=torch.int64)]):    # unsorted
        with pytest.raises(ValueError, match="layer #"):
            torch.classes.sparse_sam.SwapPlan(ws, bad, vals, [v.clone() for v in vals], True)
        assert all(torch.equal(a, b) for a, b in zip(ws, before))
    base = [w.reshape(-1)[i].clone() for w, i in zip(ws, good)]
    plan = torch.classes.sparse_sam.SwapPlan(ws, good, vals, base, True)
    unchanged, matched = 1, 2
    assert plan.swap(True) == unchanged | matched and plan.on()
    assert _same_bits([w.reshape(-1)[i] for w, i in zip(ws, good)], vals)
    assert plan.swap(True) == unchanged | matched and not plan.on()
    assert _same_bits(ws, before)
    ws[1].view(-1)[34] += 1.0  # a versioned write of the base under the patch
    assert not plan.unchanged()
    edited = [w.clone() for w in ws]
    assert plan.swap(True) == -1 and _same_bits(ws, edited)  # skipped: nothing written
    # Forced, switching on finds an entry that is not the base bits: every entry it wrote goes back.
    assert plan.swap(False) == 0 and not plan.on() and _same_bits(ws, edited)
    ws[1].view(-1)[34] = base[1][1]  # the base again (the version moves; the plan re-reads it)
    assert plan.swap(False) == matched and plan.on()
    assert plan.swap(True) == unchanged | matched and _same_bits(ws, before)


def test_swap_plan_catches_an_unversioned_edit_at_any_entry():
    """An edit through .data bypasses the version counter: switching on compares every entry and, at a
    mismatch in any layer or block, leaves the weights exactly as they were."""
    if not hasattr(torch.ops.sparse_sam, "swap_"):
        pytest.skip("the compiled extension is not loaded")
    from sparse_sam import _ext

    _ext.load()
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(n, generator=g) for n in (40_001, 33_333, 70_007)]  # several blocks of 16384 entries
    idx = [torch.sort(torch.randperm(w.numel(), generator=g)[: w.numel() // 2]).values.to(torch.int32) for w in ws]
    vals = [torch.randn(i.numel(), generator=g) for i in idx]
    base = [w.reshape(-1)[i].clone() for w, i in zip(ws, idx)]
    plan = torch.classes.sparse_sam.SwapPlan(ws, idx, vals, base, True)
    for layer, entry in ((0, 0), (1, 16_000), (2, idx[2].numel() - 1)):
        w = ws[layer]
        w.data.view(-1)[idx[layer][entry]] = 7.0  # no version bump
        before = [x.clone() for x in ws]
        assert plan.swap(True) == 1 and not plan.on()  # unchanged by its counters, but not matched
        assert _same_bits(ws, before)
        w.data.view(-1)[idx[layer][entry]] = base[layer][entry]
    assert plan.swap(True) == 3 and plan.on()


def test_copies_of_a_prepared_patch_switch_on_their_own(trained):
    import copy

    model, patch, _ = trained
    on, base = _on_and_base(model, patch)
    for twin in (copy.copy(patch), copy.deepcopy(patch)):
        assert not twin._bindings
        with twin.applied(model):
            assert_same_bits(on, state_bits(model))
        assert_same_bits(base, state_bits(model))


# ----------------------------------------------------------- the digest cache behind strict checks
def _count_hashes(monkeypatch):
    from sparse_sam import patchfile

    calls = []
    real = patchfile.hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(*args):
            calls.append(args)
            return real(*args)

    monkeypatch.setattr(patchfile, "hashlib", Counting)
    return calls


def test_cycles_keep_the_base_digests_without_rehashing(trained, monkeypatch):
    model, patch, compact = trained
    _on_and_base(model, patch)
    for _ in range(3):
        _on_and_base(model, patch)  # each switch bumps the version counters
    calls = _count_hashes(monkeypatch)
    patch.verify(model)  # strict: the base fingerprint, from the binding's digests
    compact.apply(model)  # another patch of the same base: its first, strict apply
    compact.remove(model)
    per_weight = [c for c in calls if c]  # sha256(raw) of a weight; sha256() is the combined digest
    assert per_weight == []


def test_a_fingerprint_taken_while_applied_does_not_leak_into_base_checks(trained):
    from sparse_sam.patchfile import fingerprint

    model, patch, _ = trained
    _on_and_base(model, patch)
    patch.apply(model)
    named = [(l.name, model.get_parameter(l.name)) for l in patch.layers]
    assert fingerprint(named) != patch.fingerprint  # the patched weights, hashed and cached
    patch.remove(model)
    patch.verify(model)  # the base is back: its own digest, not the cached patched one


def test_a_loose_apply_never_vouches_for_an_edited_base(trained):
    model, patch, compact = trained
    patch.verify(model)  # digests cached
    w = model.get_parameter(patch.layers[0].name)
    with torch.no_grad():
        w.view(-1)[0] += 1.0  # a versioned edit of the base
    compact.apply(model, strict=False)
    compact.remove(model)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        patch.verify(model)


def test_a_prepared_patch_does_not_keep_its_model_alive():
    import gc
    import weakref

    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    model.extra = nn.Parameter(torch.randn(3, 3))  # a Parameter held by the model itself
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")] + ["extra"]
    handle = sparse_sam.patch(model, 0.05, seed=0, target_parameters=names)
    patch = handle.export()
    sparse_sam.unpatch(model)
    del handle
    assert "extra" in {l.name for l in patch.layers}
    alive = weakref.ref(model)
    _on_and_base(model, patch)
    assert patch._bindings  # prepared for this model
    del model
    gc.collect()
    assert alive() is None
    assert not patch._bindings
