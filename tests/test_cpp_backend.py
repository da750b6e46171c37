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


# --------------------------------------------------------------------------------------- sam_weight
def _special(t):
    """Sprinkle -0.0, inf, NaN and denormals into a float tensor (in place)."""
    flat = t.view(-1)
    flat[::13] = -0.0
    flat[1::17] = float("inf")
    flat[2::19] = float("nan")
    flat[3::23] = torch.finfo(t.dtype).tiny / 4
    return t


@pytest.mark.parametrize("wdtype,ddtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                           (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float16), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("shape", [(1,), (5, 3, 3, 3), (1001, 67)])
def test_sam_weight_forward_bitexact(cpp, wdtype, ddtype, shape):
    g = gen(6)
    w = _special(torch.randn(shape, generator=g).to(wdtype))
    m = torch.rand(shape, generator=g) < 0.3
    v = torch.randn(shape, generator=g).to(ddtype)
    want = reference.sam_weight_forward_ref(w, m, v)
    got = cpp.sam_weight_forward(w, m, v)
    assert got.dtype == wdtype and got.shape == w.shape
    # NaN + v may carry either operand's payload depending on the instruction; compare NaN-ness there.
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(bits_view(got)[~nan], bits_view(want)[~nan])
    # Masked-off entries are the weight's own bits, NaN payloads included.
    assert torch.equal(bits_view(got)[~m], bits_view(w)[~m])


@pytest.mark.parametrize("gdtype,ddtype,sdtype", [(torch.float32,) * 3, (torch.float64,) * 3,
                                                  (torch.float16, torch.float32, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16, torch.float16),
                                                  (torch.bfloat16, torch.float16, torch.float16),
                                                  (torch.float32, torch.float64, torch.bfloat16)])
@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
@pytest.mark.parametrize("shape", [(3,), (64, 3, 5, 5), (777, 129)])
def test_sam_weight_backward_bitexact(cpp, gdtype, ddtype, sdtype, delta_grad, shape):
    g = gen(7)
    grad = (torch.randn(shape, generator=g) * 3).to(gdtype)
    m = torch.rand(shape, generator=g) < 0.5
    v = (torch.randn(shape, generator=g) * 1e-2).to(ddtype)
    want = reference.sam_weight_backward_ref(grad, m, v, sdtype, delta_grad)
    got = cpp.sam_weight_backward(grad, m, v, sdtype, delta_grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits_view(a), bits_view(b))


def test_sam_weight_autograd_through_ops(cpp):
    g = gen(8)
    w = torch.randn(40, 9, generator=g)
    m = torch.rand(40, 9, generator=g) < 0.2
    v0 = torch.randn(40, 9, generator=g)
    s0 = torch.randn(40, 9, generator=g)
    outs = []
    for backend in ("cpp", "torch"):
        v, s = v0.clone().requires_grad_(), s0.clone().requires_grad_()
        y = ops.sam_weight(w, m, v, s, backend=backend)
        (y.sin() * torch.arange(9.0)).sum().backward()
        outs.append((y.detach(), v.grad, s.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_sam_weight_rejects_bad_args(cpp):
    w = torch.randn(4, 4)
    with pytest.raises(TypeError, match="bool"):
        torch.ops.sparse_sam.sam_weight_forward(w, torch.ones(4, 4), w)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.sparse_sam.sam_weight_forward(w, torch.ones(4, 3, dtype=torch.bool), w)


# ------------------------------------------------------------------------------------------- swap_
def _special_bits(dtype, n, g):
    """n values of dtype whose raw bits include NaN payloads, +-inf, -0.0 and denormals."""
    ibits = bits_view(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(ibits)
    raw = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(ibits)
    vals = raw.view(dtype).clone()
    specials = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, torch.finfo(dtype).tiny / 8], dtype=dtype)
    k = min(n, len(specials))
    vals[:k] = specials[:k]
    return vals


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_swap_bitexact_and_self_inverse(cpp, dtype, idx_dtype):
    g = gen(9)
    sizes = [1, 17, 4096, 100_003]
    weights = [_special_bits(dtype, n, g) for n in sizes]
    # Reshape one layer so flat indices address a multi-dim weight.
    weights[2] = weights[2].view(64, 64)
    before = [bits_view(w).clone() for w in weights]
    indices = [torch.randperm(n, generator=g)[: max(1, n // 7)].sort().values.to(idx_dtype) for n in sizes]
    values = [_special_bits(dtype, len(i), g) for i in indices]
    vals_before = [bits_view(v).clone() for v in values]

    ref_w = [w.clone() for w in weights]
    ref_v = [v.clone() for v in values]
    reference.swap_ref(ref_w, indices, ref_v)
    cpp.swap_(weights, indices, values)
    for a, b in zip(weights + values, ref_w + ref_v):
        assert torch.equal(bits_view(a), bits_view(b))
    assert any(not torch.equal(bits_view(a), b) for a, b in zip(weights, before))

    cpp.swap_(weights, indices, values)  # self-inverse
    for a, b in zip(weights + values, before + vals_before):
        assert torch.equal(bits_view(a), b)


@pytest.mark.parametrize("bad", ["negative", "too_large", "unsorted", "duplicate"])
def test_swap_malformed_indices_leave_weights_untouched(cpp, bad):
    g = gen(10)
    weights = [torch.randn(100, generator=g), torch.randn(7, 9, generator=g)]
    good = torch.tensor([1, 5, 50])
    broken = {"negative": torch.tensor([-1, 3, 4]), "too_large": torch.tensor([0, 3, 63]),
              "unsorted": torch.tensor([4, 3, 10]), "duplicate": torch.tensor([2, 9, 9])}[bad]
    indices = [good, broken]
    values = [torch.randn(3, generator=g), torch.randn(3, generator=g)]
    snapshot = [bits_view(t).clone() for t in weights + values]
    # Directly through torch.ops: the C++ op validates on its own, before writing the first layer.
    with pytest.raises(ValueError, match="#1"):
        torch.ops.sparse_sam.swap_(weights, indices, values)
    with pytest.raises(ValueError):
        cpp.swap_(weights, indices, values)
    for t, b in zip(weights + values, snapshot):
        assert torch.equal(bits_view(t), b)


@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("bad", ["unsorted", "duplicate", "too_large", "negative"])
def test_swap_finds_a_violation_deep_in_a_long_index_vector(cpp, idx_dtype, bad):
    """The order check runs vectorized where the CPU allows it: a violation at any lane, far from the
    ends, is still found before anything is written."""
    g = gen(11)
    n = 1001  # odd: a vector body and a scalar tail
    w = torch.randn(20_000, generator=g)
    for pos in (1, 498, 499, 500, n - 2):
        idx = torch.arange(0, 19 * n, 19, dtype=torch.int64)
        if bad == "unsorted":
            idx[pos], idx[pos + 1] = idx[pos + 1].clone(), idx[pos].clone()
        elif bad == "duplicate":
            idx[pos + 1] = idx[pos]
        elif bad == "too_large":  # in order, but past the end, at the last entry only
            idx[-1] = w.numel()
        else:
            idx[0] = -1
        idx = idx.to(idx_dtype)
        vals = torch.randn(n, generator=g)
        snapshot = [bits_view(t).clone() for t in (w, vals)]
        with pytest.raises(ValueError, match="#0"):
            torch.ops.sparse_sam.swap_([w], [idx], [vals])
        assert all(torch.equal(bits_view(t), b) for t, b in zip((w, vals), snapshot))


def test_swap_rejects_mismatched_metadata(cpp):
    w = torch.randn(10)
    with pytest.raises(ValueError, match="values of layer #0"):
        torch.ops.sparse_sam.swap_([w], [torch.tensor([1, 2])], [torch.randn(3)])
    with pytest.raises(ValueError, match="int32/int64"):
        torch.ops.sparse_sam.swap_([w], [torch.tensor([1.0])], [torch.randn(1)])
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.sparse_sam.swap_([torch.randn(4, 4).t()], [torch.tensor([1])], [torch.randn(1)])


# ---------------------------------------------------------------------------------------- output cache
def test_large_outputs_reuse_freed_blocks_and_stay_exact(cpp):
    """Large outputs come from a cache of freed blocks: a block that held other data is fully
    overwritten, so results stay bit-identical to the reference."""
    n = 700_001  # 2.8 MB of float32: cached; an odd size (not a multiple of the 2 MiB block)
    g = gen(21)
    torch.ops.sparse_sam.cpu_cache_clear()
    first = cpp.sam_weight_forward(torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.5,
                                   torch.randn(n, generator=g))
    ptr = first.data_ptr()
    del first  # its block goes to the cache, still holding those values
    cached, limit, hits, misses = torch.ops.sparse_sam.cpu_cache_stats()
    assert cached >= n * 4 and limit > 0
    w, m, v = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.3, torch.randn(n, generator=g)
    again = cpp.sam_weight_forward(w, m, v)
    assert again.data_ptr() == ptr
    assert torch.ops.sparse_sam.cpu_cache_stats()[2] == hits + 1
    assert torch.equal(bits_view(again), bits_view(reference.sam_weight_forward_ref(w, m, v)))
    # A bool mask in a block that held float bytes: every byte is rewritten to 0 or 1.
    del again
    scores = torch.randn(3 * n, generator=g)
    mask = cpp.topk_mask([scores], [n // 7], None)[0]
    assert torch.equal(mask.view(torch.uint8).unique(), torch.tensor([0, 1], dtype=torch.uint8))
    assert torch.equal(mask, reference.topk_mask_ref([scores], [n // 7])[0])
    del mask
    torch.ops.sparse_sam.cpu_cache_clear()
    assert torch.ops.sparse_sam.cpu_cache_stats()[0] == 0


def _run_forked(target, timeout):
    """Runs target(queue) in a forked child; returns what it put on the queue. Fails if it hangs."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q,), daemon=True)
    p.start()
    p.join(timeout)
    if p.exitcode is None:
        p.kill()
        pytest.fail("the forked child hung")
    assert p.exitcode == 0
    return q.get(timeout=5)


def _child_sam_weight(q):
    from sparse_sam import backends as b

    torch.set_num_threads(1)  # as DataLoader workers do: the parent's OpenMP pool does not survive fork
    n = 600_000
    g = torch.Generator().manual_seed(5)
    w, m, v = torch.randn(n, generator=g), torch.rand(n, generator=g) < 0.5, torch.randn(n, generator=g)
    out = b.get("cpp").sam_weight_forward(w, m, v)
    q.put(bool(torch.equal(bits_view(out), bits_view(reference.sam_weight_forward_ref(w, m, v)))))


def test_output_cache_works_in_a_forked_child(cpp):
    """A forked child (as DataLoader workers are) gets a usable cache: fresh lock, inherited blocks."""
    keep = cpp.sam_weight_forward(torch.randn(600_000), torch.zeros(600_000, dtype=torch.bool),
                                  torch.randn(600_000))
    del keep  # a block now sits in the parent's cache and is inherited by the child
    assert _run_forked(_child_sam_weight, 60) is True


def _child_topk_and_swap(q):
    from sparse_sam import backends as b

    torch.set_num_threads(1)  # torch's own OpenMP ops hang in a forked child otherwise
    g = torch.Generator().manual_seed(6)
    scores = [torch.randn(n, generator=g) for n in (300_000, 70_001)]
    ks = [3_000, 701]
    want_masks = reference.topk_mask_ref(scores, ks)
    w = torch.randn(1_000_000, generator=g)
    idx = torch.randperm(w.numel(), generator=g)[:100_000].sort().values
    v = torch.randn(idx.numel(), generator=g)
    want_w, want_v = w.clone(), v.clone()
    reference.swap_ref([want_w], [idx], [want_v])
    torch.set_num_threads(2)  # the ops below now try to share work with the (dead) inter-op threads
    masks = b.get("cpp").topk_mask(scores, ks, None)
    b.get("cpp").swap_([w], [idx], [v])
    torch.set_num_threads(1)
    q.put(all(torch.equal(a, r) for a, r in zip(masks, want_masks)) and
          torch.equal(bits_view(w), bits_view(want_w)) and torch.equal(bits_view(v), bits_view(want_v)))


def test_shared_work_finishes_in_a_forked_child(cpp):
    """topk_mask and swap_ hand work to torch's inter-op threads, which do not survive fork: in a
    forked child asking for 2 threads the caller does all the work itself instead of waiting."""
    scores = [torch.randn(300_000)]
    cpp.topk_mask(scores, [10], None)  # the parent's helpers exist before the fork
    assert _run_forked(_child_topk_and_swap, 120) is True


@pytest.mark.parametrize("value, expect", [("0", "off"), ("abc", "error")])
def test_output_cache_environment(cpp, value, expect):
    """SPARSE_SAM_CPU_CACHE_MB=0 turns the cache off; a malformed value is an error naming the variable."""
    import ast
    import subprocess
    import sys

    code = ("import torch, sparse_sam\n"
            "from sparse_sam import backends\n"
            "cpp = backends.get('cpp')\n"
            "for _ in range(3): cpp.sam_weight_forward(torch.ones(600_000), torch.ones(600_000, dtype=torch.bool), "
            "torch.ones(600_000))\n"
            "print(torch.ops.sparse_sam.cpu_cache_stats())\n")
    env = {**__import__("os").environ, "SPARSE_SAM_CPU_CACHE_MB": value}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if expect == "off":
        assert out.returncode == 0, out.stderr
        cached, limit, hits, misses = ast.literal_eval(out.stdout.strip().splitlines()[-1])
        assert (cached, limit, hits, misses) == (0, 0, 0, 0)
    else:
        assert out.returncode != 0 and "SPARSE_SAM_CPU_CACHE_MB" in out.stderr


# ---------------------------------------------------------------------------------------- loading
def test_load_failure_is_reported_not_raised(cpp, monkeypatch, tmp_path, caplog):
    """Without a prebuilt module or sources, backend() raises BackendUnavailable with the reason and
    the failure is logged once."""
    import sys

    from sparse_sam import _ext

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setattr(_ext, "_CSRC", str(tmp_path / "no-csrc"))
    monkeypatch.setitem(sys.modules, "sparse_sam._C", None)  # makes the import fail
    with caplog.at_level("WARNING", logger="sparse_sam"):
        for _ in range(2):
            with pytest.raises(backends.BackendUnavailable, match="no C\\+\\+ sources"):
                _ext.backend("cpp")
    assert sum("compiled extension unavailable" in r.getMessage() for r in caplog.records) == 1


_JIT_CHILD = """
import json, os, sys, time
import torch
sys.modules["sparse_sam._C"] = None  # hide the prebuilt module: the loader must build from sources
from sparse_sam import _ext, reference
_ext._CSRC = os.environ["SPARSE_SAM_TEST_CSRC"]
t = time.perf_counter()
origin = _ext.origin()
secs = time.perf_counter() - t
g = torch.Generator().manual_seed(3)
scores = [torch.randn(1000, generator=g), torch.randn(7, 11, generator=g)]
got = _ext.backend("cpp").topk_mask(scores, [10, 7])
ok = all(torch.equal(a, b) for a, b in zip(got, reference.topk_mask_ref(scores, [10, 7])))
print(json.dumps({"origin": origin, "ok": ok, "secs": secs}))
"""


@pytest.mark.slow
def test_jit_build_caches_and_rebuilds_on_source_change(tmp_path):
    """Without the prebuilt module the extension is JIT-built from csrc/, loaded from the cache the next
    time, and rebuilt after a source file changes."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from sparse_sam import _ext

    if not os.path.isdir(_ext._CSRC):
        pytest.skip("no csrc/ next to the package (installed without sources)")
    csrc = tmp_path / "csrc"
    shutil.copytree(_ext._CSRC, csrc)
    env = {**os.environ, "SPARSE_SAM_TEST_CSRC": str(csrc), "SPARSE_SAM_EXT_DIR": str(tmp_path / "cache")}

    def load():
        out = subprocess.run([sys.executable, "-c", _JIT_CHILD], env=env, capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout.strip().splitlines()[-1])
        assert r["ok"] and r["origin"].startswith("JIT-built at " + str(tmp_path / "cache")), r
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.so")}

    built = load()
    assert built, "no shared library in the cache"
    assert load() == built  # cached: nothing rebuilt
    with open(csrc / "cpu" / "swap.cpp", "a") as f:
        f.write("\n// changed\n")
    rebuilt = load()
    assert rebuilt != built and max(rebuilt.values()) > max(built.values())


def test_disabled_by_environment(monkeypatch):
    from sparse_sam import _ext

    monkeypatch.setattr(_ext, "_state", {})
    monkeypatch.setenv("SPARSE_SAM_BUILD_EXT", "0")
    with pytest.raises(backends.BackendUnavailable, match="SPARSE_SAM_BUILD_EXT=0"):
        _ext.backend("cpp")


def test_cuda_backend_needs_cuda_kernels(cpp):
    from sparse_sam import _ext

    if torch._C._dispatch_has_kernel_for_dispatch_key("sparse_sam::topk_mask", "CUDA"):
        assert _ext.backend("cuda") is not None
    else:
        with pytest.raises(backends.BackendUnavailable, match="without CUDA"):
            _ext.backend("cuda")


# ---------------------------------------------------------------------------------------- routing
def test_cpu_tensors_resolve_to_cpp(cpp, monkeypatch):
    monkeypatch.delenv("SPARSE_SAM_BACKEND", raising=False)
    for op in backends.OPS:
        name, impl = backends.resolve(op, torch.zeros(1))
        assert name == "cpp" and impl is cpp


def test_public_ops_route_to_cpp(cpp, monkeypatch):
    calls = []
    real = torch.ops.sparse_sam.topk_mask

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(type(cpp), "topk_mask", staticmethod(lambda s, k, n=None: spy(s, k)), raising=True)
    s = [torch.randn(30, generator=gen(11))]
    m = ops.topk_mask(s, [4], backend="cpp")
    assert calls and int(m[0].sum()) == 4
