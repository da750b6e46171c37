"""Public ops on every available backend against the reference (fresh random inputs, odd shapes)."""
import types

import pytest
import torch
import torch.nn.functional as F

from sparse_sam import backends, ops
from sparse_sam import reference as R
from conftest import backend_params, raw_bits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", backend_params("topk_mask"))
@pytest.mark.parametrize("distinct", [3, 100000])
def test_topk_mask_matches_reference(backend, distinct):
    g = torch.Generator().manual_seed(distinct)
    shapes = [(1,), (5,), (13, 7), (6, 5, 3, 3), (1000,)]
    scores = [(torch.randint(0, distinct, s, generator=g).float() - distinct / 2) / 7 for s in shapes]
    scores[1][2] = -0.0
    scores[1][0] = 0.0
    ks = [1, 2, 40, 133, 0]
    got = ops.topk_mask(scores, ks, backend=backend)
    want = R.topk_mask_ref(scores, ks)
    for gm, wm, k in zip(got, want, ks):
        assert gm.dtype == torch.bool and int(gm.sum()) == k
        assert torch.equal(gm, wm)


@pytest.mark.parametrize("backend", backend_params("topk_mask"))
def test_topk_mask_nan_raises_naming_layer(backend):
    s = torch.randn(33)
    s[-1] = float("nan")
    with pytest.raises(ValueError, match="'second'"):
        ops.topk_mask([torch.randn(4), s], [1, 3], backend=backend, names=["first", "second"])


@pytest.mark.parametrize("backend", backend_params("sam_weight"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta_grad", ["masked", "dense"])
def test_sam_weight_forward_backward(backend, dtype, delta_grad):
    g = torch.Generator().manual_seed(3)
    shape = (7, 3, 3, 5)
    w = torch.randn(shape, generator=g).to(dtype)
    mask = torch.rand(shape, generator=g) < 0.3
    v = (torch.randn(shape, generator=g) * 0.1).requires_grad_()
    s = torch.randn(shape, generator=g).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype)
    out = ops.sam_weight(w, mask, v, s, delta_grad, backend=backend)
    ref = R.sam_weight_ref(w, mask, v, s, delta_grad)
    assert out.dtype == dtype and torch.equal(raw_bits(out), raw_bits(ref))
    got = torch.autograd.grad(out, (v, s), up)
    want = torch.autograd.grad(ref, (v, s), up)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


CONV_CASES = [  # (C_in, C_out, k, stride, padding, dilation, groups, H)
    (3, 5, 3, 1, 1, 1, 1, 9),
    (4, 6, 3, 2, 0, 1, 2, 11),
    (5, 7, 3, 1, 2, 2, 1, 10),
    (6, 3, 1, 2, 0, 1, 3, 7),
]


@pytest.mark.parametrize("backend", backend_params("sam_conv2d"))
@pytest.mark.parametrize("case", CONV_CASES)
def test_sam_conv2d(backend, case):
    cin, cout, k, stride, pad, dil, groups, h = case
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, cin, h, h + 1, generator=g, requires_grad=True)
    w = torch.randn(cout, cin // groups, k, k, generator=g)
    b = torch.randn(cout, generator=g)
    mask = torch.rand(w.shape, generator=g) < 0.5
    v = torch.randn(w.shape, generator=g).requires_grad_()
    s = torch.randn(w.shape, generator=g).requires_grad_()
    out = ops.sam_conv2d(x, w, mask, v, b, stride, pad, dil, groups, scores=s, backend=backend)
    ref = R.sam_conv2d_ref(x, w, mask, v, b, stride, pad, dil, groups, scores=s)
    torch.testing.assert_close(out, ref)
    up = torch.randn(out.shape, generator=g)
    for a, c in zip(torch.autograd.grad(out, (x, v, s), up), torch.autograd.grad(ref, (x, v, s), up)):
        torch.testing.assert_close(a, c)


CONVT_CASES = [  # (C_in, C_out, k, stride, padding, output_padding, groups, dilation, H)
    (3, 5, 4, 2, 1, 0, 1, 1, 5),
    (4, 5, 3, 2, 1, 1, 1, 1, 6),
    (6, 4, 3, 2, 0, 1, 2, 1, 5),
    (5, 3, 3, 1, 1, 0, 1, 2, 7),
]


@pytest.mark.parametrize("backend", backend_params("sam_conv_transpose2d"))
@pytest.mark.parametrize("case", CONVT_CASES)
def test_sam_conv_transpose2d(backend, case):
    cin, cout, k, stride, pad, opad, groups, dil, h = case
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, cin, h, h + 2, generator=g, requires_grad=True)
    w = torch.randn(cin, cout // groups, k, k, generator=g)
    mask = torch.rand(w.shape, generator=g) < 0.5
    v = torch.randn(w.shape, generator=g).requires_grad_()
    s = torch.randn(w.shape, generator=g).requires_grad_()
    out = ops.sam_conv_transpose2d(x, w, mask, v, None, stride, pad, opad, groups, dil, scores=s, backend=backend)
    ref = R.sam_conv_transpose2d_ref(x, w, mask, v, None, stride, pad, opad, groups, dil, scores=s)
    torch.testing.assert_close(out, ref)
    up = torch.randn(out.shape, generator=g)
    for a, c in zip(torch.autograd.grad(out, (x, v, s), up), torch.autograd.grad(ref, (x, v, s), up)):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", backend_params("sam_linear"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_sam_linear(backend, dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 17, generator=g).to(dtype)
    w = torch.randn(9, 17, generator=g).to(dtype)
    mask = torch.rand(w.shape, generator=g) < 0.2
    v = torch.randn(w.shape, generator=g).requires_grad_()
    out = ops.sam_linear(x, w, mask, v, None, backend=backend)
    ref = R.sam_linear_ref(x, w, mask, v, None)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", backend_params("swap_"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_matches_reference_and_is_self_inverse(backend, dtype):
    g = torch.Generator().manual_seed(7)
    ws = [torch.randn(s, generator=g).to(dtype) for s in [(1,), (7, 3), (5, 4, 3, 3)]]
    ws[1].view(-1)[0] = float("nan")
    ws[1].view(-1)[1] = -0.0
    ks = [1, 9, 60]
    idx = [torch.sort(torch.randperm(w.numel(), generator=g)[:k]).values.to(torch.int32) for w, k in zip(ws, ks)]
    vals = [torch.randn(k, generator=g).to(dtype) for k in ks]
    w_ref, v_ref = [w.clone() for w in ws], [v.clone() for v in vals]
    before = [raw_bits(w) for w in ws]
    ops.swap_(ws, idx, vals, backend=backend)
    R.swap_ref(w_ref, idx, v_ref)
    for a, b in zip(ws + vals, w_ref + v_ref):
        assert torch.equal(raw_bits(a), raw_bits(b))
    ops.swap_(ws, idx, vals, backend=backend)
    assert all(torch.equal(raw_bits(w), b) for w, b in zip(ws, before))


@pytest.mark.parametrize("backend", backend_params("swap_"))
def test_swap_bad_indices_leave_weights_untouched(backend):
    ws = [torch.randn(10), torch.randn(10)]
    before = [raw_bits(w) for w in ws]
    idx = [torch.tensor([1, 2], dtype=torch.int32), torch.tensor([2, 10], dtype=torch.int32)]
    with pytest.raises(ValueError, match="outside"):
        ops.swap_(ws, idx, [torch.randn(2), torch.randn(2)], backend=backend)
    assert all(torch.equal(raw_bits(w), b) for w, b in zip(ws, before))


def test_fused_conv_path_gradients(monkeypatch):
    """SAMConvFunction (used when a backend has a fused conv forward) gives the reference gradients."""
    torch_impl = backends.get("torch")
    fake = types.SimpleNamespace(
        topk_mask=torch_impl.topk_mask, swap_=torch_impl.swap_,
        sam_weight_forward=torch_impl.sam_weight_forward, sam_weight_backward=torch_impl.sam_weight_backward,
        sam_conv2d_forward=lambda x, w, m, v, b, st, p, d, gr, fused: F.conv2d(
            x, R.sam_weight_forward_ref(w, m, v), b, st, p, d, gr),
        sam_conv_transpose2d_forward=lambda x, w, m, v, b, st, p, op, gr, d, fused: F.conv_transpose2d(
            x, R.sam_weight_forward_ref(w, m, v), b, st, p, op, gr, d))
    monkeypatch.setattr(backends, "resolve", lambda op, t, backend=None: ("fake", fake))
    monkeypatch.setenv("SPARSE_SAM_FUSED_CONV", "1")  # the fused forward is an opt-in
    g = torch.Generator().manual_seed(8)
    for transposed in (False, True):
        x = torch.randn(2, 4, 7, 6, generator=g, requires_grad=True)
        w = torch.randn((4, 6, 3, 3) if transposed else (6, 4, 3, 3), generator=g)
        b = torch.randn(6, generator=g, requires_grad=True)
        mask = torch.rand(w.shape, generator=g) < 0.5
        v = torch.randn(w.shape, generator=g).requires_grad_()
        s = torch.randn(w.shape, generator=g).requires_grad_()
        if transposed:
            out = ops.sam_conv_transpose2d(x, w, mask, v, b, 2, 1, 1, scores=s, delta_grad="dense")
            ref = R.sam_conv_transpose2d_ref(x, w, mask, v, b, 2, 1, 1, scores=s, delta_grad="dense")
        else:
            out = ops.sam_conv2d(x, w, mask, v, b, 2, 1, scores=s, delta_grad="dense")
            ref = R.sam_conv2d_ref(x, w, mask, v, b, 2, 1, scores=s, delta_grad="dense")
        assert out.grad_fn is not None and "SAMConvFunction" in type(out.grad_fn).__name__
        torch.testing.assert_close(out, ref)
        up = torch.randn(out.shape, generator=g)
        for a, c in zip(torch.autograd.grad(out, (x, v, s, b), up), torch.autograd.grad(ref, (x, v, s, b), up)):
            torch.testing.assert_close(a, c)


def test_forced_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setenv("SPARSE_SAM_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="cuda.*CUDA tensors"):
        ops.topk_mask([torch.randn(4)], [1])
    monkeypatch.setenv("SPARSE_SAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops.topk_mask([torch.randn(4)], [1])


def test_bad_arguments_name_the_culprit():
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="delta has shape"):
        ops.sam_weight(w, torch.ones(3, 4, dtype=torch.bool), torch.randn(4, 3))
    with pytest.raises(TypeError, match="mask must be a bool"):
        ops.sam_weight(w, torch.ones(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="delta_grad"):
        ops.sam_weight(w, torch.ones(3, 4, dtype=torch.bool), torch.randn(3, 4), delta_grad="sparse")
