"""PatchServer: exact per id on raw bits, base untouched (also after an exception), refused inputs,
threads, add/remove while serving, sparse memory."""
import gc
import random
import threading
import time
import weakref

import pytest
import torch
import torch.nn as nn

import sparse_sam
from sparse_sam import PatchMismatchError, PatchServer
from conftest import PaperAutoEncoder, assert_same_bits, state_bits

NAMES = ("VA", "VP", "VC", "VH")


def _randomise_norms(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def _make_patch(model: nn.Module, seed: int) -> sparse_sam.SparsePatch:
    handle = sparse_sam.patch(model, 0.05, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for m in handle.layers.values():
            m.delta.copy_(0.1 * torch.randn(m.delta.shape, generator=g))
    patch = handle.export()
    sparse_sam.unpatch(model)
    return patch


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=4)
    _randomise_norms(model, torch.Generator().manual_seed(1))
    model.eval()
    patches = {name: _make_patch(model, i) for i, name in enumerate(NAMES)}
    return model, patches


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _reference(model, patches, x, ids) -> dict:
    """{id: (rows, output of those rows run alone with that patch applied)}."""
    out = {}
    with torch.no_grad():
        for g in dict.fromkeys(ids):
            rows = [i for i, v in enumerate(ids) if v == g]
            if g is None:
                out[g] = rows, model(x[rows])
            else:
                with patches[g].applied(model):
                    out[g] = rows, model(x[rows])
    return out


def _assert_exact(y, ref) -> None:
    for g, (rows, expected) in ref.items():
        assert torch.equal(_bits(y[rows]), _bits(expected)), f"rows of id {g!r} differ from the reference"


def _random_ids(n: int, rng: random.Random, names=(None, *NAMES)) -> list:
    return [rng.choice(names) for _ in range(n)]


def test_mixed_batch_is_exact_per_id_and_base_untouched(setup):
    model, patches = setup
    before = state_bits(model)
    server = PatchServer(model, patches)
    rng = random.Random(0)
    for n in (37, 5):  # odd sizes; with 5 rows some ids get one row (another conv path on the CPU)
        x = torch.rand(n, 3, 32, 32)
        ids = _random_ids(n, rng)
        y = server(x, ids)
        assert_same_bits(before, state_bits(model))
        _assert_exact(y, _reference(model, patches, x, ids))
    # the patches really change the output (so the comparison above could fail)
    x = torch.rand(4, 3, 32, 32)
    assert not torch.equal(server(x, "VA"), server(x, None))


def test_single_id_is_the_applied_forward(setup):
    model, patches = setup
    server = PatchServer(model, patches)
    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        with patches["VC"].applied(model):
            expected = model(x)
        base = model(x)
    assert torch.equal(_bits(server(x, "VC")), _bits(expected))
    assert torch.equal(_bits(server(x, ["VC"] * 6)), _bits(expected))
    assert torch.equal(_bits(server(x, None)), _bits(base))


def test_exception_mid_call_leaves_the_base_bit_identical(setup):
    model, patches = setup
    before = state_bits(model)
    server = PatchServer(model, patches)
    x = torch.rand(12, 3, 32, 32)
    ids = ["VA", "VP", None] * 4
    calls = []

    def fail_on_second(module, inp, out):
        calls.append(1)
        if len(calls) == 2:  # inside the second id's forward, its patch switched in
            raise RuntimeError("injected")

    hook = model.decoder[3].register_forward_hook(fail_on_second)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            server(x, ids)
    finally:
        hook.remove()
    assert len(calls) == 2
    assert_same_bits(before, state_bits(model))
    _assert_exact(server(x, ids), _reference(model, patches, x, ids))


def test_refused_inputs_name_the_culprit_and_change_nothing(setup):
    model, patches = setup
    before = state_bits(model)
    server = PatchServer(model, patches)
    x = torch.rand(3, 3, 32, 32)
    with pytest.raises(KeyError, match="'nope'"):
        server(x, ["VA", "nope", None])
    with pytest.raises(ValueError, match="2 ids for 3 samples"):
        server(x, ["VA", None])
    with pytest.raises(ValueError, match="already served"):
        server.add("VA", patches["VA"])
    with pytest.raises(KeyError, match="'VQ'"):
        server.remove("VQ")
    assert_same_bits(before, state_bits(model))
    assert server.names == list(NAMES)


def test_patch_of_another_base_model_is_refused_at_add(setup):
    model, patches = setup
    torch.manual_seed(1)
    other = PaperAutoEncoder(w=4).eval()
    foreign = _make_patch(other, 0)
    server = PatchServer(model, patches)
    with pytest.raises(PatchMismatchError, match="'foreign'.*fingerprint"):
        server.add("foreign", foreign)
    assert "foreign" not in server
    with pytest.raises(PatchMismatchError):
        PatchServer(model, {"foreign": foreign})


def test_train_mode_is_refused(setup):
    model, patches = setup
    before = state_bits(model)
    server = PatchServer(model, patches)
    model.train()
    try:
        with pytest.raises(ValueError, match="eval mode"):
            server(torch.rand(4, 3, 32, 32), ["VA", None, "VH", "VA"])
    finally:
        model.eval()
    assert_same_bits(before, state_bits(model))  # BatchNorm buffers included


def test_changed_base_or_applied_patch_is_refused(setup):
    model, patches = setup
    server = PatchServer(model, patches)
    x = torch.rand(2, 3, 32, 32)
    with patches["VH"].applied(model):
        with pytest.raises(PatchMismatchError, match="applied"):
            server(x, ["VA", None])
    # A patch applied and removed bumps the version counters but restores the bits: still served.
    _assert_exact(server(x, ["VA", None]), _reference(model, patches, x, ["VA", None]))
    w = model.encoder[0].weight
    with torch.no_grad():
        w.add_(0.0)  # an in-place write of the same bits: re-hashed, still the base
    _assert_exact(server(x, ["VA", None]), _reference(model, patches, x, ["VA", None]))
    saved = w.detach().clone()
    with torch.no_grad():
        w.view(-1)[0] += 1.0  # a real change of the base
    with pytest.raises(PatchMismatchError, match="changed"):
        server(x, ["VA", None])
    with torch.no_grad():
        w.copy_(saved)
    server2 = PatchServer(model, patches)  # re-added patches fit again
    _assert_exact(server2(x, ["VA", None]), _reference(model, patches, x, ["VA", None]))


def test_memory_stays_sparse(setup):
    model, patches = setup
    extra = _make_patch(model, 9)
    ref = weakref.ref(extra)
    params_before = sum(p.numel() for p in model.parameters())
    server = PatchServer(model, patches)
    server.add("E", extra)
    del extra
    gc.collect()
    assert ref() is None, "the server keeps the SparsePatch object (and its deltas) alive"
    k = patches["VA"].num_modified
    assert server.nbytes("VA") == 8 * k == patches["VA"].nbytes  # int32 index + float32 value
    assert server.nbytes() == sum(server.nbytes(n) for n in server.names)
    assert sum(p.numel() for p in model.parameters()) == params_before


def test_four_threads_with_add_and_remove_while_serving(setup):
    model, patches = setup
    before = state_bits(model)
    server = PatchServer(model, patches)
    extra = _make_patch(model, 7)
    all_patches = {**patches, "E": extra}
    rng = random.Random(1)
    jobs = []
    for _ in range(4 * 4):
        x = torch.rand(rng.randint(1, 9), 3, 32, 32)
        ids = _random_ids(x.shape[0], rng, (None, *NAMES, "E"))
        jobs.append((x, ids, _reference(model, all_patches, x, ids)))
    errors, results = [], {"exact": 0, "E missing": 0}
    stop = threading.Event()

    def serve(part):
        try:
            for x, ids, ref in part:
                try:
                    y = server(x, ids)
                except KeyError as e:
                    assert "'E'" in str(e) and "E" in ids
                    results["E missing"] += 1
                    continue
                _assert_exact(y, ref)
                results["exact"] += 1
        except BaseException as e:  # surfaced in the main thread
            errors.append(e)

    def churn():
        while not stop.is_set():
            server.add("E", extra)
            time.sleep(0.002)
            server.remove("E")
            time.sleep(0.002)

    churner = threading.Thread(target=churn)
    workers = [threading.Thread(target=serve, args=(jobs[i::4],)) for i in range(4)]
    churner.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    churner.join()
    assert not errors, errors[0]
    assert results["exact"] + results["E missing"] == len(jobs) and results["exact"] > 0
    assert_same_bits(before, state_bits(model))


class _TwoHeads(nn.Module):
    """``(N, 4) -> ((N, 3), {"h": (N, 5)})`` with a keyword argument."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x, scale=1.0):
        h = self.a(x).relu()
        return self.b(h) * scale, {"h": h}


def test_structured_outputs_and_kwargs():
    torch.manual_seed(3)
    model = _TwoHeads().eval()
    patch = _make_patch(model, 0)
    server = PatchServer(model, {"p": patch})
    x = torch.randn(7, 4)
    ids = ["p", None, "p", "p", None, None, "p"]
    y, aux = server(x, ids, scale=-2.5)
    rows = [i for i, v in enumerate(ids) if v == "p"]
    with torch.no_grad(), patch.applied(model):
        ey, eaux = model(x[rows], scale=-2.5)
    assert torch.equal(_bits(y[rows]), _bits(ey)) and torch.equal(_bits(aux["h"][rows]), _bits(eaux["h"]))
