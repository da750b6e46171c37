"""Per-layer budgets: eq. (11), exact totals, caps with redistribution."""
import pytest
import torch.nn as nn

import sparse_sam
from sparse_sam.budget import allocate, layer_dims
from conftest import PaperAutoEncoder


@pytest.mark.parametrize("allocation", ["linear", "uniform"])
@pytest.mark.parametrize("sparsity", [0.0003, 0.001, 0.003, 0.01, 0.37, 1.0])
def test_total_is_exact_and_capped(allocation, sparsity):
    model = PaperAutoEncoder()
    ks = sparse_sam.layer_budgets(model, sparsity, allocation)
    sizes = {n: p.numel() for n, p in model.named_parameters() if n in ks}
    assert len(ks) == 12
    assert sum(ks.values()) == round(sparsity * sum(sizes.values()))
    assert all(0 <= ks[n] <= sizes[n] for n in ks)


def test_linear_follows_eq_11():
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 10), nn.Linear(10, 10))
    ks = sparse_sam.layer_budgets(model, 0.01, "linear")
    total = round(0.01 * (20000 + 2000 + 100))
    dims = [300, 210, 20]
    for (name, k), d in zip(ks.items(), dims):
        assert abs(k - total * d / sum(dims)) < 1


def test_uniform_is_proportional_to_size():
    model = nn.Sequential(nn.Linear(100, 200), nn.Linear(200, 10))
    assert sparse_sam.layer_budgets(model, 0.1, "uniform") == {"0.weight": 2000, "1.weight": 200}


def test_cap_redistributes_excess():
    # the tiny layer's linear share exceeds its size: it is capped and the rest goes to the others
    ks = allocate({"a": 4, "b": 10000, "c": 10000}, {"a": 1000.0, "b": 1.0, "c": 1.0}, 0.5)
    assert ks["a"] == 4 and ks["b"] + ks["c"] == 10002 - 4 and abs(ks["b"] - ks["c"]) <= 1


def test_dims_for_groups_and_transposed():
    conv = nn.Conv2d(8, 12, 3, groups=4)
    assert layer_dims(conv) == (2 * 9, 12)
    convt = nn.ConvTranspose2d(8, 12, 3, groups=4)
    assert layer_dims(convt) == (8, 3 * 9)
    assert layer_dims(nn.Linear(5, 7)) == (5, 7)
    for m in (conv, convt):
        d_in, d_out = layer_dims(m)
        assert d_in * d_out == m.weight.numel()


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan")])
def test_sparsity_out_of_range_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        sparse_sam.layer_budgets(PaperAutoEncoder(), bad)


def test_unknown_allocation_raises():
    with pytest.raises(ValueError, match="allocation"):
        sparse_sam.layer_budgets(PaperAutoEncoder(), 0.01, "quadratic")
