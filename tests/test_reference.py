"""The executable spec itself: top-k tie rule, STE gradients, raw-bit swaps."""
import pytest
import torch

from sparse_sam import reference as R
from conftest import raw_bits


def brute_topk(s: torch.Tensor, k: int) -> torch.Tensor:
    """Python sort by (score desc, index asc), with -0.0 == +0.0."""
    vals = s.reshape(-1).tolist()
    order = sorted(range(len(vals)), key=lambda i: (-(vals[i] + 0.0), i))
    m = torch.zeros(len(vals), dtype=torch.bool)
    m[order[:k]] = True
    return m.view(s.shape)


# The spec (stable sort) and the torch backend's threshold selection must agree everywhere.
TOPK_IMPLS = [pytest.param(R.topk_mask_ref, id="sort"), pytest.param(R.topk_mask_threshold, id="threshold")]


@pytest.mark.parametrize("topk", TOPK_IMPLS)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (4, 3, 3, 3)])
@pytest.mark.parametrize("distinct", [2, 3, 1000])
def test_topk_ref_matches_brute_force_on_ties(topk, shape, distinct):
    g = torch.Generator().manual_seed(hash((shape, distinct)) % 2**31)
    s = torch.randint(0, distinct, shape, generator=g).float() - distinct // 2
    n = s.numel()
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1))):
        (m,) = topk([s], [k])
        assert int(m.sum()) == k
        assert torch.equal(m, brute_topk(s, k)), (shape, k)


@pytest.mark.parametrize("topk", TOPK_IMPLS)
def test_topk_ref_negative_zero_ties_with_positive_zero(topk):
    s = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0])
    (m,) = topk([s], [3])
    assert m.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("topk", TOPK_IMPLS)
def test_topk_ref_several_layers_and_inf(topk):
    s1 = torch.tensor([float("inf"), 1.0, float("-inf"), 2.0])
    s2 = torch.randn(5, 5)
    m1, m2 = topk([s1, s2], [2, 25])
    assert m1.tolist() == [True, False, False, True]
    assert bool(m2.all())


@pytest.mark.parametrize("topk", TOPK_IMPLS)
def test_topk_ref_nan_names_layer(topk):
    s = torch.randn(10)
    s[3] = float("nan")
    with pytest.raises(ValueError, match="'dec.1'"):
        topk([torch.randn(3), s], [1, 1], names=["enc.0", "dec.1"])


@pytest.mark.parametrize("topk", TOPK_IMPLS)
@pytest.mark.parametrize("k", [-1, 11, 2.5])
def test_topk_ref_bad_k(topk, k):
    with pytest.raises(ValueError, match="outside"):
        topk([torch.randn(10)], [k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_threshold_equals_sort_on_coarse_values(dtype):
    """Many layers of odd sizes, values on a coarse grid (heavy ties), signed zeros and infinities."""
    g = torch.Generator().manual_seed(7)
    scores, ks = [], []
    for n in (1, 2, 5, 64, 999, 4097):
        s = (torch.randn(n, generator=g) * 4).round() / 4
        s[torch.rand(n, generator=g) < 0.05] = -0.0
        s[torch.rand(n, generator=g) < 0.01] = float("inf")
        s[torch.rand(n, generator=g) < 0.01] = float("-inf")
        scores.append(s.to(dtype))
        ks.append(int(torch.randint(0, n + 1, (1,), generator=g)))
    for a, b in zip(R.topk_mask_threshold(scores, ks), R.topk_mask_ref(scores, ks)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
def test_sam_weight_ref_gradcheck(delta_grad):
    """Float64 gradcheck of the delta gradient; in dense mode the surrogate equals the true derivative
    of W + v, so the check uses an all-ones mask there."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(4, 3, generator=g) < 0.4 if delta_grad == "masked" else torch.ones(4, 3, dtype=torch.bool)
    v = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: R.sam_weight_ref(w, mask, v, None, delta_grad), (v,))


@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
def test_sam_weight_ref_score_gradient_is_straight_through(delta_grad):
    """grad_s equals the finite-difference derivative of the relaxed W + m_c ⊙ v w.r.t. m_c at m_c = m
    (eq. 9: the indicator h is treated as the identity)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) < 0.5
    v = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, generator=g, dtype=torch.float64)
    gv, gs = torch.autograd.grad(R.sam_weight_ref(w, mask, v, s, delta_grad), (v, s), up)
    eps, m_c = 1e-6, mask.double()
    fd = torch.empty_like(m_c)
    for i in range(m_c.numel()):
        e = torch.zeros_like(m_c).view(-1)
        e[i] = eps
        e = e.view_as(m_c)
        fd.view(-1)[i] = (((w + (m_c + e) * v.detach()) - (w + (m_c - e) * v.detach())) * up).sum() / (2 * eps)
    torch.testing.assert_close(gs, fd)
    torch.testing.assert_close(gv, torch.where(mask, up, 0.0) if delta_grad == "masked" else up)


def test_sam_weight_ref_passes_unmasked_bits_through():
    w = torch.tensor([-0.0, float("nan"), 1e-40, 1.0])
    v = torch.tensor([float("inf"), 1.0, 2.0, 0.5])
    mask = torch.tensor([False, False, False, True])
    out = R.sam_weight_forward_ref(w, mask, v)
    assert torch.equal(raw_bits(out[:3]), raw_bits(w[:3]))
    assert out[3] == 1.5


def test_sam_weight_ref_half_weight_rounds_once():
    w = torch.randn(64).to(torch.bfloat16)
    v = torch.randn(64) * 1e-2
    out = R.sam_weight_forward_ref(w, torch.ones(64, dtype=torch.bool), v)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, (w.float() + v).to(torch.bfloat16))


def special_weights(dtype):
    vals = [float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-45, 3.0]
    w = torch.tensor(vals * 4, dtype=torch.float32).to(dtype)
    if dtype == torch.float32:  # a NaN with a payload: must survive as raw bits
        w.view(torch.int32)[9] = 0x7FC0BEEF
    return w.view(4, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_swap_ref_is_self_inverse_on_raw_bits(dtype):
    w = special_weights(dtype)
    before = raw_bits(w)
    idx = torch.tensor([0, 3, 9, 17, 31], dtype=torch.int32)
    vals = torch.randn(5).to(dtype)
    vals_before = raw_bits(vals)
    R.swap_ref([w], [idx], [vals])
    assert torch.equal(raw_bits(vals), raw_bits(special_weights(dtype).view(-1)[idx.long()]))
    R.swap_ref([w], [idx], [vals])
    assert torch.equal(raw_bits(w), before) and torch.equal(raw_bits(vals), vals_before)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([0, 40], dtype=torch.int32), "outside"),
    (torch.tensor([-1, 2], dtype=torch.int32), "outside"),
    (torch.tensor([3, 3], dtype=torch.int32), "strictly increasing"),
    (torch.tensor([5, 2], dtype=torch.int32), "strictly increasing"),
    (torch.tensor([1.0, 2.0]), "int32/int64"),
])
def test_swap_ref_validates_every_layer_before_writing(bad, match):
    w1, w2 = torch.randn(10), torch.randn(32)
    b1, b2 = raw_bits(w1), raw_bits(w2)
    good = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        R.swap_ref([w1, w2], [good, bad], [torch.randn(2), torch.randn(2)], names=["a", "b"])
    assert torch.equal(raw_bits(w1), b1) and torch.equal(raw_bits(w2), b2)


def test_swap_ref_rejects_wrong_value_dtype():
    with pytest.raises(ValueError, match="values of layer"):
        R.swap_ref([torch.randn(4)], [torch.tensor([1])], [torch.randn(1, dtype=torch.float64)])
