"""patch → train → export → unpatch: the zero-forget guarantee, on many model shapes."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_sam
from sparse_sam import SAMConv2d, SAMConvTranspose2d, SAMLinear
from conftest import PaperAutoEncoder, assert_same_bits, raw_bits, state_bits


def train_steps(model, handle, x, steps=3, lr_scores=0.5, lr_delta=1e-2):
    """A few real Adam steps of autoencoder training (reconstruct x)."""
    opt = torch.optim.Adam(handle.param_groups(lr_scores=lr_scores, lr_delta=lr_delta))
    model.train()
    for _ in range(steps):
        loss = F.mse_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def warm_bn(model, x):
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()


@pytest.mark.parametrize("norm", ["frozen", "batch"])
@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
def test_zero_forget_paper_autoencoder(norm, delta_grad):
    torch.manual_seed(0)
    model = PaperAutoEncoder()
    x = torch.rand(8, 3, 32, 32)
    warm_bn(model, x)
    before = state_bits(model)
    flags = [p.requires_grad for p in model.parameters()]
    handle = sparse_sam.patch(model, 0.01, seed=0, delta_grad=delta_grad, norm=norm)
    assert sum(isinstance(m, (SAMConv2d, SAMConvTranspose2d)) for m in model.modules()) == 12
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("_sam_scores", "_sam_delta")))
    deltas_before = [m.delta.detach().clone() for m in handle.layers.values()]
    train_steps(model, handle, x)
    assert any(not torch.equal(m.delta, d) for m, d in zip(handle.layers.values(), deltas_before)), "nothing trained"
    # BatchNorm statistics never change while patched
    for name, t in model.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(raw_bits(t), before[name]), name
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(isinstance(m, sparse_sam.SAMLayer) for m in model.modules())
    assert patch.num_modified == round(0.01 * sum(m.weight.numel() for m in handle.layers.values()))


def test_patched_forward_equals_applied_patch_bitwise():
    torch.manual_seed(1)
    model = PaperAutoEncoder()
    x = torch.rand(4, 3, 32, 32)
    warm_bn(model, x)
    handle = sparse_sam.patch(model, 0.03, seed=1, delta_grad="dense")
    train_steps(model, handle, x)
    with torch.no_grad():
        y_patched = model(x)
    patch = handle.export()
    sparse_sam.unpatch(model)
    with torch.no_grad():
        y0 = model(x)
        with patch.applied(model):
            y_applied = model(x)
        y_after = model(x)
    assert torch.equal(raw_bits(y_patched), raw_bits(y_applied))
    assert not torch.equal(y_patched, y0)
    assert torch.equal(raw_bits(y_after), raw_bits(y0))


def test_thousand_apply_remove_cycles():
    torch.manual_seed(2)
    model = PaperAutoEncoder(w=4)
    before = state_bits(model)
    handle = sparse_sam.patch(model, 0.05, seed=2)
    for m in handle.layers.values():
        with torch.no_grad():
            m.delta.normal_()
    patch = handle.export()
    sparse_sam.unpatch(model)
    patch.apply(model)
    on = state_bits(model)
    patch.remove(model)
    for _ in range(999):
        patch.apply(model)
        patch.remove(model)
    assert_same_bits(before, state_bits(model))
    patch.apply(model)
    assert_same_bits(on, state_bits(model))
    patch.remove(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_special_values_and_dtypes(dtype):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).to(dtype)
    with torch.no_grad():
        w = model[0].weight.view(-1)
        w[:8] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-39, 5e-45]).to(dtype)
    before = state_bits(model)
    handle = sparse_sam.patch(model, 0.5, seed=3, learn_mask=False)
    with torch.no_grad():
        for m in handle.layers.values():
            m.delta.normal_()
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    for _ in range(3):
        with patch.applied(model):
            assert not torch.equal(raw_bits(model[2].weight), before["2.weight"])
        assert_same_bits(before, state_bits(model))


class Block(nn.Module):
    """A transformer-style block of Linear layers."""

    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)
        x = x + self.proj(att @ v)
        return x + self.mlp(x)


MODELS = {
    "mlp_block": (lambda: nn.Sequential(Block(), Block()), (2, 5, 16)),
    "convT_stride2_outpad": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 5, 3, 2, 1, output_padding=1),
                                                   nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1)), (2, 3, 7, 7)),
    "groups_dilation": (lambda: nn.Sequential(nn.Conv2d(4, 8, 3, padding=2, dilation=2, groups=2),
                                              nn.ConvTranspose2d(8, 4, 3, padding=1, groups=4, dilation=1),
                                              nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")), (2, 4, 9, 9)),
    "bias_false": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(),
                                         nn.Linear(4 * 25, 7, bias=False)), (2, 3, 7, 7)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_drop_in(name):
    make, shape = MODELS[name]
    torch.manual_seed(4)
    model = make()
    x = torch.randn(shape)
    with torch.no_grad():
        y0 = model(x)
    before = state_bits(model)
    handle = sparse_sam.patch(model, 0.1, seed=4, delta_grad="dense")
    with torch.no_grad():
        assert torch.equal(raw_bits(model(x)), raw_bits(y0)), "zero deltas must give the base output"
    opt = torch.optim.SGD(handle.param_groups(lr_scores=0.1, lr_delta=0.1))
    for _ in range(2):
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        y1 = model(x)
    assert not torch.equal(y1, y0)
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    with patch.applied(model), torch.no_grad():
        assert torch.equal(raw_bits(model(x)), raw_bits(y1))


def test_tied_weight_is_one_target_written_once():
    torch.manual_seed(6)
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(8, 8), head)
    x = torch.randint(0, 10, (3, 5))
    before = state_bits(model)
    handle = sparse_sam.patch(model, 0.2, seed=6)
    assert list(handle.layers) == ["0.weight", "1.weight"]
    pw = handle.layers["0.weight"]
    assert pw.names == ["0.weight", "2.weight"] and len(pw.users) == 2
    with torch.no_grad():
        pw.delta.normal_()
        y = model(x)
        # both users read the same W + m ⊙ v
        assert torch.equal(raw_bits(model[0].weight), raw_bits(model[2].weight))
    patch = handle.export()
    sparse_sam.unpatch(model)
    assert_same_bits(before, state_bits(model))
    assert [l.name for l in patch.layers] == ["0.weight", "1.weight"]
    assert patch.layers[0].names == ["0.weight", "2.weight"]
    with patch.applied(model), torch.no_grad():
        assert torch.equal(raw_bits(model(x)), raw_bits(y))
        assert model[0].weight is model[2].weight
    assert_same_bits(before, state_bits(model))


def test_errors_leave_model_untouched():
    model = PaperAutoEncoder(w=4)
    before = state_bits(model)
    with pytest.raises(ValueError, match="no layer selected"):
        sparse_sam.patch(model, 0.1, layers=(nn.Linear,))
    with pytest.raises(ValueError, match="sparsity"):
        sparse_sam.patch(model, 1.5)
    with pytest.raises(ValueError, match="rounds to a budget of 0"):
        sparse_sam.patch(model, 1e-9)
    with pytest.raises(ValueError, match="delta_grad"):
        sparse_sam.patch(model, 0.1, delta_grad="sparse")
    with pytest.raises(ValueError, match="unknown backend 'tritn'"):
        sparse_sam.patch(model, 0.1, backend="tritn")
    with pytest.raises(TypeError, match="unknown option"):
        sparse_sam.patch(model, 0.1, sparsty=0.1)
    assert_same_bits(before, state_bits(model))
    assert not any(isinstance(m, sparse_sam.SAMLayer) for m in model.modules())
    sparse_sam.patch(model, 0.1)
    with pytest.raises(ValueError, match="already patched"):
        sparse_sam.patch(model, 0.1)
    sparse_sam.unpatch(model)
    with pytest.raises(ValueError, match="not patched"):
        sparse_sam.unpatch(model)


def test_a_bare_layer_is_patchable_in_place():
    torch.manual_seed(8)
    layer = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    before = state_bits(layer)
    handle = sparse_sam.patch(layer, 0.2, seed=8)
    with torch.no_grad():
        handle.layers["weight"].delta.normal_()
        y = layer(x)
    patch = handle.export()
    sparse_sam.unpatch(layer)
    assert type(layer) is nn.Linear
    assert_same_bits(before, state_bits(layer))
    with patch.applied(layer), torch.no_grad():
        assert torch.equal(raw_bits(layer(x)), raw_bits(y))


def test_fixed_mask_never_changes_and_learned_mask_can():
    torch.manual_seed(5)
    x = torch.randn(16, 12)
    for learn, lr in ((False, 0.0), (True, 50.0)):
        model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 12))
        handle = sparse_sam.patch(model, 0.1, seed=5, learn_mask=learn, delta_grad="dense")
        groups = handle.param_groups(lr_scores=lr, lr_delta=0.05)
        assert [g["name"] for g in groups] == (["scores", "delta"] if learn else ["delta"])
        opt = torch.optim.Adam(groups)
        for _ in range(5):
            loss = (model(x) - x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        flipped = handle.flipped_fraction()
        assert (flipped > 0) if learn else (flipped == 0)
        for m in handle.layers.values():
            m._ensure_mask()
            assert int(m.mask.sum()) == m.k
        sparse_sam.unpatch(model)


def test_same_seed_same_scores_and_summary():
    a, b = PaperAutoEncoder(w=4), PaperAutoEncoder(w=4)
    budgets = sparse_sam.layer_budgets(a, 0.02)
    ha, hb = sparse_sam.patch(a, 0.02, seed=7), sparse_sam.patch(b, 0.02, seed=7)
    for ma, mb in zip(ha.layers.values(), hb.layers.values()):
        assert torch.equal(ma.scores, mb.scores) and torch.equal(ma.mask, mb.mask)
    rows = ha.summary()
    assert {r["name"]: r["k"] for r in rows} == budgets
    assert sum(r["k"] for r in rows) == round(0.02 * sum(r["p"] for r in rows))
    assert "total" in repr(ha)
