"""The ``cpp`` backend (compiled extension, CPU kernels) against the reference ops.

Masks and swaps must match bit for bit; ``sam_weight`` results too (same arithmetic, same rounding).
"""
import pytest
import torch

from sparse_sam import backends, ops, reference
from sparse_sam.reference import bits_view

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Below / above the size at which a layer is split across threads (both code paths).
SHAPES = [(1,), (7,), (33, 5), (3, 3, 3, 3), (257, 1031), (3, 100_003)]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def assert_masks_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.bool and g.shape == w.shape
        assert torch.equal(g, w), f"{int((g != w).sum())} mask entries differ"


# ---------------------------------------------------------------------------------------- topk_mask
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_random_odd_shapes(cpp, dtype):
    g = gen(0)
    scores = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
    for frac in (0.01, 0.37, 0.999):
        ks = [max(0, min(s.numel(), round(frac * s.numel()))) for s in scores]
        assert_masks_equal(cpp.topk_mask(scores, ks, None), reference.topk_mask_ref(scores, ks))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_topk_ties_and_signed_zeros(cpp, dtype):
    g = gen(1)
    scores = []
    for s in SHAPES:
        # Few distinct values, with -0.0 and +0.0 both present: ties decide most of the mask.
        v = torch.randint(-2, 3, s, generator=g).to(dtype)
        zero_sign = torch.rand(s, generator=g) < 0.5
        v = torch.where((v == 0) & zero_sign, torch.tensor(-0.0, dtype=dtype), v)
        scores.append(v)
    assert any(bool((bits_view(s) == bits_view(torch.tensor(-0.0, dtype=dtype))).any()) for s in scores)
    for ks in ([max(1, s.numel() // 3) for s in scores],
               [int((s >= 0).sum()) for s in scores],  # threshold exactly at a value boundary
               [int((s > 0).sum()) + (s.numel() > 1) for s in scores]):
        ks = [min(k, s.numel()) for k, s in zip(ks, scores)]
        assert_masks_equal(cpp.topk_mask(scores, ks, None), reference.topk_mask_ref(scores, ks))


def test_topk_extreme_values(cpp):
    g = gen(2)
    big = torch.randn(300_001, generator=g)
    big[::97] = float("inf")
    big[5::101] = -float("inf")
    big[7::89] = 1e-45  # denormal
    big[11::83] = -1e-45
    small = big[:999].clone()
    ks = [1234, 500]
    assert_masks_equal(cpp.topk_mask([big, small], ks, None), reference.topk_mask_ref([big, small], ks))


@pytest.mark.parametrize("frac", [0.005, 0.05, 0.9])
def test_topk_adversarial_to_sampling(cpp, frac):
    """Scores whose regular subsample is unrepresentative (large values exactly on a stride) and
    sorted / constant layers: whatever shortcut a kernel takes, the mask must stay exact."""
    g = gen(12)
    n = 64 * 1500
    strided = torch.rand(n, generator=g)
    for offset in (0, 31, 32, 63):
        strided[offset::64] += 100.0
    scores = [strided, torch.linspace(-3, 3, n), torch.linspace(3, -3, n), torch.full((n,), 0.25),
              torch.randn(n, generator=g).sort().values.flip(0).contiguous()]
    ks = [int(frac * n)] * len(scores)
    assert_masks_equal(cpp.topk_mask(scores, ks, None), reference.topk_mask_ref(scores, ks))


def test_topk_k_zero_full_and_size_one(cpp):
    g = gen(3)
    scores = [torch.randn(s, generator=g) for s in [(1,), (1,), (50,), (50,), (400_000,), (400_000,)]]
    ks = [0, 1, 0, 50, 0, 400_000]
    masks = cpp.topk_mask(scores, ks, None)
    assert [int(m.sum()) for m in masks] == ks
    assert_masks_equal(masks, reference.topk_mask_ref(scores, ks))


@pytest.mark.parametrize("n", [10, 300_000])
def test_topk_nan_raises_naming_layer(cpp, n):
    g = gen(4)
    scores = [torch.randn(n, generator=g) for _ in range(3)]
    scores[1][n // 2] = float("nan")
    for ks in ([1, 1, 1], [1, 0, 1]):  # NaN is an error even when the layer takes nothing
        with pytest.raises(ValueError, match="#1"):
            cpp.topk_mask(scores, ks, None)
        with pytest.raises(ValueError, match="'dec.conv'"):
            cpp.topk_mask(scores, ks, ["enc", "dec.conv", "head"])


def test_topk_rejects_bad_k_through_torch_ops(cpp):
    s = torch.randn(10)
    with pytest.raises(ValueError, match="outside"):
        torch.ops.sparse_sam.topk_mask([s], [11])
    with pytest.raises(ValueError, match="outside"):
        torch.ops.sparse_sam.topk_mask([s], [-1])


def test_topk_non_contiguous_scores(cpp):
    s = torch.randn(64, 48, generator=gen(5)).t()
    assert_masks_equal(cpp.topk_mask([s], [100], None), reference.topk_mask_ref([s], [100]))


# Around the size from which a layer is sampled and split in 65536-score chunks (2^16), and sizes that
# leave a tail after the last 32-score vector block.
SAMPLED_SIZES = [65_535, 65_536, 65_537, 65_536 + 31, 131_071, 200_003]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_sampled_layers_odd_sizes_and_extreme_k(cpp, dtype):
    g = gen(13)
    scores = [torch.randn(n, generator=g).to(dtype) for n in SAMPLED_SIZES]
    for pick in (lambda n: 1, lambda n: 2, lambda n: n // 100, lambda n: n // 2, lambda n: n - 2,
                 lambda n: n - 1):
        ks = [pick(s.numel()) for s in scores]
        assert_masks_equal(cpp.topk_mask(scores, ks, None), reference.topk_mask_ref(scores, ks))


def test_topk_sampled_layers_heavy_ties_and_infinities(cpp):
    g = gen(14)
    ties = [torch.randint(-3, 4, (n,), generator=g).float() for n in SAMPLED_SIZES]
    for t in ties:
        t[t == 0] = torch.where(torch.rand(int((t == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        t[torch.rand(t.numel(), generator=g) < 0.002] = float("inf")
        t[torch.rand(t.numel(), generator=g) < 0.002] = -float("inf")
    for ks in ([n // 100 for n in SAMPLED_SIZES], [int((t > 0).sum()) for t in ties],
               [int((t >= 0).sum()) + 1 for t in ties], [int((t == float("inf")).sum()) for t in ties]):
        assert_masks_equal(cpp.topk_mask(ties, ks, None), reference.topk_mask_ref(ties, ks))


def test_topk_many_layers_mixed_modes(cpp):
    """Hundreds of layers in one call: empty, tiny, whole-layer and sampled ones, k = 0 and k = numel,
    enough work in total for the parallel path."""
    g = gen(15)
    sizes = [0, 1, 2, 31, 33] + torch.randint(1, 4_000, (240,), generator=g).tolist() + [70_000, 150_001]
    scores = [torch.randn(n, generator=g) for n in sizes]
    ks = [0 if i % 7 == 0 else n if i % 11 == 0 else max(0, min(n, int(n * 0.03) + i % 3))
          for i, n in enumerate(sizes)]
    masks = cpp.topk_mask(scores, ks, None)
    assert [int(m.sum()) for m in masks] == ks
    assert_masks_equal(masks, reference.topk_mask_ref(scores, ks))


def _sample_positions(n: int) -> torch.Tensor:
    """The positions csrc/cpu/topk_mask.cpp samples to bracket the threshold of an n-score layer."""
    h, pos, mask64 = 0x9E3779B97F4A7C15, [], (1 << 64) - 1
    for j in range(n // 256):
        h = (h * 6364136223846793005 + 1442695040888963407) & mask64
        pos.append(j * 256 + ((h >> 40) & 255))
    return torch.tensor(pos)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_missed_bracket_is_redone_exactly(cpp, dtype):
    """Large values exactly where the sampler looks: its bracket misses the threshold, and the layer
    is selected again the whole-layer way (one more parallel pass)."""
    g = gen(16)
    scores = []
    for n in (100_000, 300_007):
        s = torch.rand(n, generator=g)
        s[_sample_positions(n)] += 10.0
        scores.append(s.to(dtype))
    scores.append(torch.randn(90_000, generator=g).to(dtype))  # an ordinary layer beside them
    ks = [s.numel() // 100 for s in scores]
    assert_masks_equal(cpp.topk_mask(scores, ks, None), reference.topk_mask_ref(scores, ks))


@pytest.mark.parametrize("layer,where", [(0, 0), (0, 69_999), (0, "sampled"), (1, 65_536 * 2 + 5), (1, 200_002)])
def test_topk_nan_anywhere_in_a_sampled_layer(cpp, layer, where):
    """NaN at a layer's ends, in a vector block, in the tail after the last block (69_999 and 200_002),
    or on a position the sampler reads."""
    g = gen(17)
    scores = [torch.randn(n, generator=g) for n in (70_000, 200_003)]
    scores[layer][int(_sample_positions(70_000)[3]) if where == "sampled" else where] = float("nan")
    for ks in ([700, 2_000], [0, 200_003]):
        with pytest.raises(ValueError, match=f"#{layer}"):
            cpp.topk_mask(scores, ks, None)
