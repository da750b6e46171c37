"""The ``cuda`` backend (compiled extension, CUDA kernels) against the reference ops, on a GPU.

Without a GPU these tests skip; the CUDA sources are still compiled by scripts/check_cuda_sources.sh.
"""
import pytest
import torch

from sparse_sam import _ext, reference
from sparse_sam.reference import bits_view

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend needs a CUDA device"),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_topk_matches_reference(cuda_backend, dtype):
    g = gen(0)
    shapes = [(1,), (7,), (33, 5), (257, 1031), (3, 100_003)]
    random = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    tied = [torch.randint(-2, 3, s, generator=g).to(dtype) for s in shapes]
    tied[2].view(-1)[::3] = -0.0
    for scores in (random, tied, random + tied):
        for frac in (0.0, 0.01, 0.5, 1.0):
            ks = [round(frac * s.numel()) for s in scores]
            want = reference.topk_mask_ref(scores, ks)
            got = cuda_backend.topk_mask([s.cuda() for s in scores], ks, None)
            for a, b in zip(got, want):
                assert torch.equal(a.cpu(), b)


def test_topk_nan_names_layer(cuda_backend):
    scores = [torch.randn(100, device="cuda"), torch.randn(5000, device="cuda")]
    scores[1][77] = float("nan")
    with pytest.raises(ValueError, match="'b'"):
        cuda_backend.topk_mask(scores, [3, 3], ["a", "b"])
    masks = cuda_backend.topk_mask(scores, [3, 3], ["a", "b"], check_nan=False)  # no synchronisation
    assert int(masks[0].sum()) == 3
    torch.cuda.synchronize()
    assert torch.ops.sparse_sam.cuda_take_error(0)[:2] == [1, 1]  # NaN, layer #1


def test_topk_and_swap_capture_in_a_cuda_graph(cuda_backend):
    """After a warm-up call (tables cached, error word allocated) both ops launch no host copy or sync."""
    g = gen(9)
    scores = [torch.randn(5000, generator=g).cuda(), torch.randn(37, generator=g).cuda()]
    w = torch.randn(1000, generator=g).cuda()
    idx, val = torch.tensor([3, 500, 999], device="cuda"), torch.randn(3, generator=g).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cuda_backend.topk_mask(scores, [100, 5], check_nan=False)
        cuda_backend.swap_([w], [idx], [val])
        cuda_backend.swap_([w], [idx], [val])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        masks = cuda_backend.topk_mask(scores, [100, 5], check_nan=False)
        cuda_backend.swap_([w], [idx], [val])
    w0, v0 = w.clone(), val.clone()
    graph.replay()
    torch.cuda.synchronize()
    want = reference.topk_mask_ref([s.cpu() for s in scores], [100, 5])
    assert all(torch.equal(m.cpu(), r) for m, r in zip(masks, want))
    assert torch.equal(w[idx], v0) and torch.equal(val, w0[idx])


@pytest.mark.parametrize("wdtype,ddtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
def test_sam_weight_matches_reference(cuda_backend, wdtype, ddtype, delta_grad):
    g = gen(1)
    shape = (129, 3, 5, 5)
    w = torch.randn(shape, generator=g).to(wdtype)
    w.view(-1)[::11] = -0.0
    m = torch.rand(shape, generator=g) < 0.3
    v = torch.randn(shape, generator=g).to(ddtype)
    grad = torch.randn(shape, generator=g).to(wdtype)
    got = cuda_backend.sam_weight_forward(w.cuda(), m.cuda(), v.cuda()).cpu()
    assert torch.equal(bits_view(got), bits_view(reference.sam_weight_forward_ref(w, m, v)))
    got = cuda_backend.sam_weight_backward(grad.cuda(), m.cuda(), v.cuda(), torch.float32, delta_grad)
    want = reference.sam_weight_backward_ref(grad, m, v, torch.float32, delta_grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_swap_bitexact_and_validated(cuda_backend, dtype):
    g = gen(2)
    ibits = bits_view(torch.empty(0, dtype=dtype)).dtype
    info = torch.iinfo(ibits)
    weights = [torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(ibits).view(dtype).cuda()
               for n in (5, 4099, 100_000)]
    indices = [torch.randperm(w.numel(), generator=g)[: max(1, w.numel() // 9)].sort().values.cuda() for w in weights]
    values = [torch.randint(info.min, info.max, (len(i),), generator=g, dtype=torch.int64).to(ibits).view(dtype).cuda()
              for i in indices]
    before = [bits_view(t).clone() for t in weights + values]
    ref_w, ref_v = [w.cpu() for w in weights], [v.cpu() for v in values]
    reference.swap_ref(ref_w, [i.cpu() for i in indices], ref_v)
    cuda_backend.swap_(weights, indices, values)
    for a, b in zip(weights + values, ref_w + ref_v):
        assert torch.equal(bits_view(a).cpu(), bits_view(b))
    bad = [indices[0], torch.tensor([3, 2], device="cuda"), indices[2]]
    # No host synchronisation: the op reports through the device's error word and writes nothing.
    torch.ops.sparse_sam.swap_(weights, bad, [values[0], values[1][:2], values[2]])
    torch.cuda.synchronize()
    assert torch.ops.sparse_sam.cuda_take_error(0) == [2, 1, 2]  # bad swap, layer #1, not increasing
    assert torch.ops.sparse_sam.cuda_take_error(0) == [0, -1, 0]  # taken: cleared
    with pytest.raises(ValueError, match="layer #1 are not strictly increasing; nothing was written"):
        cuda_backend.swap_(weights, bad, [values[0], values[1][:2], values[2]])  # raises if the report landed
        torch.cuda.synchronize()
        _ext._check_cuda_errors(weights[0].device, None, wait=False)  # else the next check reports it
    cuda_backend.swap_(weights, indices, values)
    for a, b in zip(weights + values, before):
        assert torch.equal(bits_view(a), b)
