"""The adapter API around patch(): transactions, stacking rules, fingerprints, disabled(), resume, switch,
merge, wide indices, old patch files, DDP."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_sam
from sparse_sam import PatchMismatchError, SAMConfig, patching, patchfile
from conftest import PaperAutoEncoder, assert_same_bits, raw_bits, state_bits

HERE = os.path.dirname(os.path.abspath(__file__))


def model_snapshot(model):
    """Everything patch() may touch: bits, module types, flags, hooks, handle attribute, global hooks."""
    from torch.optim.optimizer import _global_optimizer_post_hooks

    return (state_bits(model), [type(m) for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
            [getattr(m, "track_running_stats", None) for m in model.modules()],
            [sorted(m.__dict__.get("_parameters", {})) for m in model.modules()],
            hasattr(model, patching._HANDLE_ATTR), len(_global_optimizer_post_hooks))


def assert_snapshot(a, b):
    assert_same_bits(a[0], b[0])
    assert a[1:] == b[1:]


def tied_model():
    emb = nn.Embedding(11, 8)
    head = nn.Linear(8, 11, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.BatchNorm1d(5), head)


@pytest.mark.parametrize("norm,targets", [("frozen", None), ("batch", None),
                                          ("frozen", ["0.weight", "1.linear1.weight"])])
def test_failure_at_every_step_rolls_everything_back(monkeypatch, norm, targets):
    # The partial selection leaves 2-D weights out, which adds the flag-mirror steps (_mirror_flags).
    model = tied_model()
    before = model_snapshot(model)
    n = 0
    while True:
        calls = []

        def fail(label, n=n):
            calls.append(label)
            if len(calls) > n:
                raise RuntimeError(f"injected at step {n} ({label})")

        monkeypatch.setattr(patching, "_before_step", fail)
        try:
            handle = sparse_sam.patch(model, 0.1, norm=norm, target_parameters=targets)
        except RuntimeError as e:
            assert f"injected at step {n}" in str(e)
            assert_snapshot(before, model_snapshot(model))
            n += 1
            continue
        break
    assert n >= 8, f"only {n} steps were exercised"
    assert (calls.count("flags") > 0) == (targets is not None)
    monkeypatch.setattr(patching, "_before_step", None)
    handle.unpatch()
    assert_snapshot(before, model_snapshot(model))
    assert not any("_sparse_sam_frozen" in m.__dict__ for m in model.modules())


def test_typo_in_backend_changes_nothing_and_patch_still_works(monkeypatch):
    model = PaperAutoEncoder(w=4)
    before = model_snapshot(model)
    with pytest.raises(ValueError, match="tritn"):
        sparse_sam.patch(model, 0.1, backend="tritn")
    monkeypatch.setenv("SPARSE_SAM_BACKEND", "cpu")
    with pytest.raises(ValueError, match="'cpu'"):
        sparse_sam.patch(model, 0.1)
    monkeypatch.delenv("SPARSE_SAM_BACKEND")
    assert_snapshot(before, model_snapshot(model))
    sparse_sam.unpatch(sparse_sam.patch(model, 0.1).model)
    assert_snapshot(before, model_snapshot(model))


def trained_patch(model, seed=0, sparsity=0.05):
    handle = sparse_sam.patch(model, sparsity, seed=seed)
    with torch.no_grad():
        for pw in handle.layers.values():
            pw.delta.normal_(0, 0.1)
    patch = handle.export()
    sparse_sam.unpatch(model)
    return patch


def assert_same_patch(a, b):
    """Same entries, same indices, same delta bits."""
    assert [l.name for l in a.layers] == [l.name for l in b.layers]
    for la, lb in zip(a.layers, b.layers):
        assert torch.equal(la.indices, lb.indices) and torch.equal(raw_bits(la.deltas), raw_bits(lb.deltas))


def applied_bits(patch, model):
    """The model's state bits while ``patch`` is applied (removed again after)."""
    with patch.applied(model):
        return state_bits(model)


def test_apply_while_patched_and_patch_while_applied():
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    patch = trained_patch(model)
    handle = sparse_sam.patch(model, 0.05)
    with pytest.raises(PatchMismatchError, match="patched for training"):
        patch.apply(model)
    sparse_sam.unpatch(model)
    before = state_bits(model)
    patch.apply(model)
    with pytest.raises(ValueError, match="stack=True"):
        sparse_sam.patch(model, 0.05)
    on = state_bits(model)
    handle = sparse_sam.patch(model, 0.05, stack=True, seed=3)
    with torch.no_grad():
        for pw in handle.layers.values():
            pw.delta.normal_(0, 0.1)
    second = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(on, state_bits(model))
    second.apply(model, stack=True)
    with pytest.raises(PatchMismatchError, match="reverse order"):
        patch.remove(model)
    second.remove(model)
    patch.remove(model)
    assert_same_bits(before, state_bits(model))


def test_fingerprint_not_fooled_by_data_edits():
    torch.manual_seed(1)
    model = PaperAutoEncoder(w=4)
    patch = trained_patch(model)
    for _ in range(3):  # warm: later cycles take the O(k) path
        patch.apply(model)
        patch.remove(model)
    layer = patch.layers[3]
    w = model.get_parameter(layer.name)
    i = int(layer.indices[len(layer.indices) // 2])
    v0, orig = w._version, w.detach().view(-1)[i].clone()
    w.data.view(-1)[i] += 1.0  # bypasses the version counter
    assert w._version == v0
    before = state_bits(model)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        patch.apply(model)
    assert_same_bits(before, state_bits(model))
    w.data.view(-1)[i] = orig
    patch.apply(model)  # the very same bits again: accepted
    patch.remove(model)
    # An edit elsewhere through .data is caught by a full check.
    j = next(j for j in range(w.numel()) if j not in set(layer.indices.tolist()))
    w.data.view(-1)[j] += 1.0
    edited = state_bits(model)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        patch.apply(model, verify="full")
    assert_same_bits(edited, state_bits(model))


def test_disabled_computes_the_base_bit_for_bit():
    torch.manual_seed(2)
    model = tied_model().eval()
    x = torch.randint(0, 11, (3, 5))
    y0 = model(x).detach()
    handle = sparse_sam.patch(model, 0.2, seed=2)
    with torch.no_grad():
        for pw in handle.layers.values():
            pw.delta.normal_()
    y1 = model(x).detach()
    with handle.disabled():
        yd = model(x).detach()
    assert torch.equal(raw_bits(y0), raw_bits(yd)) and not torch.equal(y0, y1)
    assert torch.equal(raw_bits(model(x).detach()), raw_bits(y1))
    sparse_sam.unpatch(model)


RESUME = textwrap.dedent('''
    import sys, torch, torch.nn.functional as F
    sys.path.insert(0, {here!r})
    import sparse_sam
    from sam_test_models import PaperAutoEncoder
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    model.load_state_dict(torch.load({base!r}))
    x = torch.load({x!r})
    saved = torch.load({state!r})
    handle = sparse_sam.resume(model, saved["handle"])
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.5, lr_delta=1e-2))
    opt.load_state_dict(saved["opt"])
    for _ in range(2):
        loss = F.mse_loss(model(x), x); opt.zero_grad(); loss.backward(); opt.step()
    handle.export().save({out!r})
''')


def test_state_dict_resumes_bit_identically_in_another_process(tmp_path):
    torch.manual_seed(3)
    model = PaperAutoEncoder(w=4)
    x = torch.rand(4, 3, 32, 32)
    torch.save(model.state_dict(), tmp_path / "base.pt")
    torch.save(x, tmp_path / "x.pt")
    handle = sparse_sam.patch(model, 0.05, seed=3)
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.5, lr_delta=1e-2))

    def steps(n):
        for _ in range(n):
            loss = F.mse_loss(model(x), x)
            opt.zero_grad()
            loss.backward()
            opt.step()

    steps(2)
    torch.save({"handle": handle.state_dict(), "opt": opt.state_dict()}, tmp_path / "state.pt")
    steps(2)
    here = handle.export()
    code = RESUME.format(here=HERE, base=str(tmp_path / "base.pt"), x=str(tmp_path / "x.pt"),
                         state=str(tmp_path / "state.pt"), out=str(tmp_path / "resumed.sam"))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    there = sparse_sam.load_patch(tmp_path / "resumed.sam")
    assert here.fingerprint == there.fingerprint
    assert_same_patch(here, there)
    assert there.config["sparsity"] == 0.05 and there.config["seed"] == 3


def test_state_dict_refuses_another_model():
    handle = sparse_sam.patch(PaperAutoEncoder(w=4), 0.05)
    other = sparse_sam.patch(nn.Sequential(nn.Linear(4, 4)), 0.5)
    with pytest.raises(ValueError, match="weights"):
        other.load_state_dict(handle.state_dict())


def test_config_object_and_keywords_agree(tmp_path):
    a, b = PaperAutoEncoder(w=4), PaperAutoEncoder(w=4)
    b.load_state_dict(a.state_dict())
    cfg = SAMConfig(sparsity=0.03, allocation="uniform", seed=5, delta_grad="dense")
    ha, hb = sparse_sam.patch(a, cfg), sparse_sam.patch(b, 0.03, allocation="uniform", seed=5, delta_grad="dense")
    assert ha.config == hb.config and ha.allocation == "uniform"
    for pa, pb in zip(ha.layers.values(), hb.layers.values()):
        assert torch.equal(pa.mask, pb.mask)
    ha.export().save(tmp_path / "a.sam")
    meta = sparse_sam.load_patch(tmp_path / "a.sam").config
    assert SAMConfig.from_dict(meta) == cfg


def test_switch_between_patches_in_place():
    torch.manual_seed(4)
    model = PaperAutoEncoder(w=4)
    base = state_bits(model)
    pa, pb = trained_patch(model, seed=1), trained_patch(model, seed=2)
    on_a, on_b = applied_bits(pa, model), applied_bits(pb, model)
    sparse_sam.switch(model, pa)
    assert_same_bits(on_a, state_bits(model))
    sparse_sam.switch(model, pb)
    assert sparse_sam.applied_patch(model) is pb
    assert_same_bits(on_b, state_bits(model))
    bad = trained_patch(PaperAutoEncoder(w=4), seed=3)  # another base: refused, pb stays applied
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        sparse_sam.switch(model, bad)
    assert sparse_sam.applied_patch(model) is pb
    assert_same_bits(on_b, state_bits(model))
    sparse_sam.switch(model, None)
    assert_same_bits(base, state_bits(model))


def test_merge_is_permanent():
    torch.manual_seed(5)
    model = PaperAutoEncoder(w=4)
    patch = trained_patch(model)
    on = applied_bits(patch, model)
    patch.merge(model)
    assert sparse_sam.applied_patch(model) is None
    assert_same_bits(on, state_bits(model))
    with pytest.raises(PatchMismatchError, match="not applied"):
        patch.remove(model)
    with pytest.raises(PatchMismatchError, match="fingerprint"):
        patch.apply(model)  # the base it was made for is gone


def test_wide_indices_round_trip(monkeypatch, tmp_path):
    """Weights above the int32 limit get int64 indices in memory and in the file (limit lowered here)."""
    monkeypatch.setattr(patchfile, "INT32_LIMIT", 100)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(20, 10), nn.Linear(10, 5))  # 200 and 50 weights
    before = state_bits(model)
    patch = trained_patch(model, sparsity=0.2)
    assert [l.indices.dtype for l in patch.layers] == [torch.int64, torch.int32]
    patch.save(tmp_path / "w.sam")
    loaded = sparse_sam.load_patch(tmp_path / "w.sam")
    assert [l.indices.dtype for l in loaded.layers] == [torch.int64, torch.int32]
    assert_same_bits(applied_bits(patch, model), applied_bits(loaded, model))
    assert_same_bits(before, state_bits(model))
    layer = patch.layers[0]
    bad = patchfile.PatchLayer(layer.name, layer.shape, layer.dtype, layer.indices.to(torch.int32), layer.deltas)
    with pytest.raises(sparse_sam.PatchFileError, match="int64"):
        sparse_sam.SparsePatch([bad], patch.fingerprint)


def test_version_1_files_still_load(tmp_path):
    """A file in the old layout (module names, weight implied, fingerprint over module names)."""
    from safetensors.torch import save_file

    torch.manual_seed(7)
    model = PaperAutoEncoder(w=4)
    patch = trained_patch(model)
    legacy = [(l.name.rpartition(".")[0], model.get_parameter(l.name)) for l in patch.layers]
    meta = {"format": "sparse_sam.patch", "version": 1, "encoding": "fp32", "sparsity": 0.05, "allocation": "linear",
            "fingerprint": patchfile.fingerprint(legacy),
            "layers": [{"name": n, "shape": list(l.shape), "dtype": str(l.dtype), "k": int(l.indices.numel())}
                       for (n, _), l in zip(legacy, patch.layers)]}
    tensors = {}
    for i, l in enumerate(patch.layers):
        tensors[f"{i}.indices"], tensors[f"{i}.deltas"] = l.indices, l.deltas
    save_file(tensors, tmp_path / "v1.sam", metadata={"sparse_sam": json.dumps(meta)})
    old = sparse_sam.load_patch(tmp_path / "v1.sam")
    assert [l.name for l in old.layers] == [l.name for l in patch.layers]
    on = applied_bits(patch, model)
    assert_same_bits(on, applied_bits(old, model))
    old.save(tmp_path / "v2.sam")  # re-saved as version 2, still fingerprinted under the module names
    assert_same_bits(on, applied_bits(sparse_sam.load_patch(tmp_path / "v2.sam"), model))


DDP = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist, torch.nn.functional as F
    sys.path.insert(0, {here!r})
    import sparse_sam
    from sam_test_models import PaperAutoEncoder
    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=rank, world_size=2)
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    handle = sparse_sam.patch(model, 0.05, seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(handle.param_groups(lr_scores=0.5, lr_delta=1e-2))
    torch.manual_seed(rank + 1)  # each rank its own data
    x = torch.rand(4, 3, 32, 32)
    for _ in range(2):
        loss = F.mse_loss(ddp(x), x); opt.zero_grad(); loss.backward(); opt.step()
    handle.export().save({out!r} + str(rank))
    dist.destroy_process_group()
''')


def test_ddp_two_gloo_ranks_stay_in_sync(tmp_path):
    code = DDP.format(here=HERE, store=str(tmp_path / "store"), out=str(tmp_path / "rank"))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)]) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    a, b = (sparse_sam.load_patch(tmp_path / f"rank{r}") for r in range(2))
    assert a.num_modified > 0
    assert_same_patch(a, b)
    assert any(bool(l.deltas.abs().sum() > 0) for l in a.layers)


def test_a_copied_or_edited_patch_is_prepared_afresh():
    """Prepared switching state belongs to one patch object and its very tensors."""
    import copy

    torch.manual_seed(8)
    model = PaperAutoEncoder(w=4)
    patch = trained_patch(model)
    on = applied_bits(patch, model)
    other = copy.copy(patch)
    other.layers = [patchfile.PatchLayer(l.name, l.shape, l.dtype, l.indices, l.deltas * 2, l.names)
                    for l in patch.layers]
    on2 = applied_bits(other, model)
    assert any(not torch.equal(on[k], on2[k]) for k in on)
    with patch.applied(model):  # the original still switches its own values
        assert_same_bits(on, state_bits(model))
