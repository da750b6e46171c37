"""What the SAM layer ops promise beyond matching the reference: the default path is PyTorch's own
convolution / matmul on the materialised ``W_eff`` (bit-identical to the model with the patch applied),
the fused conv is an opt-in, autocast applies as it does to the plain layers, and 1-D / 3-D convs work.
"""
import types

import pytest
import torch
import torch.nn.functional as F

from sparse_sam import backends, ops, reference as R
from conftest import backend_params, raw_bits


def gen(seed):
    return torch.Generator().manual_seed(seed)


def _sam_inputs(wshape, g, requires_grad=False):
    w = torch.randn(wshape, generator=g)
    m = torch.rand(wshape, generator=g) < 0.4
    v = torch.randn(wshape, generator=g).requires_grad_(requires_grad)
    s = torch.randn(wshape, generator=g).requires_grad_(requires_grad)
    return w, m, v, s


# Each case: (op, weight shape, input shape, ref function of (x, w_eff, b)).
CASES = {
    "linear": (lambda x, w, m, v, b, **kw: ops.sam_linear(x, w, m, v, b, **kw), (6, 5), (3, 4, 5),
               lambda x, w, b: F.linear(x, w, b)),
    "conv1d": (lambda x, w, m, v, b, **kw: ops.sam_conv(x, w, m, v, b, 2, 1, **kw), (6, 3, 3), (2, 3, 11),
               lambda x, w, b: F.conv1d(x, w, b, 2, 1)),
    "conv2d": (lambda x, w, m, v, b, **kw: ops.sam_conv2d(x, w, m, v, b, 1, 1, 2, **kw), (6, 3, 3, 2), (2, 3, 9, 8),
               lambda x, w, b: F.conv2d(x, w, b, 1, 1, 2)),
    "conv3d": (lambda x, w, m, v, b, **kw: ops.sam_conv(x, w, m, v, b, 1, (0, 1, 1), **kw), (6, 3, 2, 3, 3),
               (1, 3, 5, 6, 7), lambda x, w, b: F.conv3d(x, w, b, 1, (0, 1, 1))),
    "conv_transpose1d": (lambda x, w, m, v, b, **kw: ops.sam_conv(x, w, m, v, b, 2, 1, transposed=True,
                                                                   output_padding=1, **kw),
                         (3, 6, 4), (2, 3, 7), lambda x, w, b: F.conv_transpose1d(x, w, b, 2, 1, 1)),
    "conv_transpose2d": (lambda x, w, m, v, b, **kw: ops.sam_conv_transpose2d(x, w, m, v, b, 2, 1, 1, **kw),
                         (3, 6, 3, 3), (2, 3, 5, 4), lambda x, w, b: F.conv_transpose2d(x, w, b, 2, 1, 1)),
    "conv_transpose3d": (lambda x, w, m, v, b, **kw: ops.sam_conv(x, w, m, v, b, 2, transposed=True, **kw),
                         (3, 6, 2, 2, 3), (1, 3, 3, 4, 3), lambda x, w, b: F.conv_transpose3d(x, w, b, 2)),
}


@pytest.mark.parametrize("backend", backend_params("sam_conv2d"))
@pytest.mark.parametrize("case", list(CASES))
def test_default_path_is_pytorch_on_the_materialised_weight(case, backend):
    """Bitwise: the op's forward is the plain layer's forward with W_eff, and its gradients are the
    reference's (the weight never gets one)."""
    op, wshape, xshape, plain = CASES[case]
    g = gen(0)
    w, m, v, s = _sam_inputs(wshape, g, requires_grad=True)
    x = torch.randn(xshape, generator=g, requires_grad=True)
    b = torch.randn(6, generator=g)
    out = op(x, w, m, v, b, scores=s, backend=backend)
    want = plain(x, R.sam_weight_forward_ref(w, m, v.detach()), b)
    assert torch.equal(raw_bits(out), raw_bits(want))
    up = torch.randn(out.shape, generator=g)
    v2, s2, x2 = (t.detach().clone().requires_grad_() for t in (v, s, x))
    ref = plain(x2, R.sam_weight_ref(w, m, v2, s2), b)
    got = torch.autograd.grad(out, (x, v, s), up)
    for a, c in zip(got, torch.autograd.grad(ref, (x2, v2, s2), up)):
        assert torch.equal(raw_bits(a), raw_bits(c))


@pytest.mark.parametrize("backend", backend_params("sam_conv2d"))
@pytest.mark.parametrize("case", list(CASES))
def test_autocast_bf16_matches_plain_layer_under_autocast(case, backend):
    op, wshape, xshape, plain = CASES[case]
    g = gen(1)
    w, m, v, s = _sam_inputs(wshape, g, requires_grad=True)
    x, b = torch.randn(xshape, generator=g), torch.randn(6, generator=g)
    v2, s2 = v.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = op(x, w, m, v, b, scores=s, backend=backend)
        ref = plain(x, R.sam_weight_ref(w, m, v2, s2), b)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert torch.equal(raw_bits(out), raw_bits(ref))
    up = torch.randn(out.shape, generator=g).to(torch.bfloat16)
    for a, c in zip(torch.autograd.grad(out, (v, s), up), torch.autograd.grad(ref, (v2, s2), up)):
        assert a.dtype == c.dtype == torch.float32  # gradients come back in the parameters' dtype
        assert torch.equal(raw_bits(a), raw_bits(c))


def _fused_backend(calls):
    """The torch backend plus fused conv forwards that record their calls and return a marker value."""
    t = backends.get("torch")

    def fused(x, w, *args, fused):
        calls.append(fused)
        return torch.full((1,), 123.0)

    return types.SimpleNamespace(topk_mask=t.topk_mask, swap_=t.swap_, sam_weight_forward=t.sam_weight_forward,
                                 sam_weight_backward=t.sam_weight_backward, sam_conv2d_forward=fused,
                                 sam_conv_transpose2d_forward=fused)


def test_fused_conv_is_opt_in_and_never_under_autocast(monkeypatch):
    calls = []
    monkeypatch.setattr(backends, "resolve", lambda op, t, backend=None: ("fake", _fused_backend(calls)))
    monkeypatch.delenv("SPARSE_SAM_FUSED_CONV", raising=False)
    g = gen(2)
    w, m, v, _ = _sam_inputs((4, 3, 3, 3), g)
    x = torch.randn(1, 3, 6, 6, generator=g)
    want = F.conv2d(x, R.sam_weight_forward_ref(w, m, v), None, 1, 1)
    assert torch.equal(raw_bits(ops.sam_conv2d(x, w, m, v, None, 1, 1)), raw_bits(want)) and calls == []
    assert float(ops.sam_conv2d(x, w, m, v, None, 1, 1, fused=True)[0]) == 123.0 and calls == [True]
    monkeypatch.setenv("SPARSE_SAM_FUSED_CONV", "1")  # the backend's own heuristic decides
    assert float(ops.sam_conv_transpose2d(x, w.transpose(0, 1), m.transpose(0, 1), v.transpose(0, 1))[0]) == 123.0
    assert calls == [True, None]
    assert torch.equal(raw_bits(ops.sam_conv2d(x, w, m, v, None, 1, 1, fused=False)), raw_bits(want))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.sam_conv2d(x, w, m, v, None, 1, 1, fused=True)
    assert out.dtype == torch.bfloat16 and calls == [True, None]
    monkeypatch.setenv("SPARSE_SAM_FUSED_CONV", "yes")
    with pytest.raises(ValueError, match="SPARSE_SAM_FUSED_CONV must be 0"):
        ops.sam_conv2d(x, w, m, v)


def test_sam_conv_rejects_a_weight_of_the_wrong_rank():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"3 to 5 dimensions.*\(4, 3\)"):
        ops.sam_conv(torch.randn(1, 3, 5), w, torch.ones(4, 3, dtype=torch.bool), torch.zeros(4, 3))


def test_sam_conv_ref_is_the_plain_conv_of_the_reference_weight():
    g = gen(3)
    w, m, v, _ = _sam_inputs((6, 3, 2, 3, 3), g)
    x = torch.randn(1, 3, 5, 6, 7, generator=g)
    want = F.conv3d(x, R.sam_weight_forward_ref(w, m, v), None, 1, 1)
    assert torch.equal(R.sam_conv_ref(x, w, m, v, None, 1, 1), want)


# ----------------------------------------------------------------------------- one device per group
@pytest.mark.parametrize("backend", backend_params("topk_mask"))
def test_grouped_ops_name_the_layer_on_another_device(backend):
    scores = [torch.randn(4, 5), torch.randn(3).to("meta"), torch.randn(2)]
    with pytest.raises(ValueError, match=r"topk_mask: layer 'b' is on meta but layer 'a' is on cpu"):
        ops.topk_mask(scores, [1, 1, 1], backend=backend, names=["a", "b", "c"])
    ws = [torch.randn(6), torch.randn(5).to("meta")]
    idx = [torch.tensor([0, 2]), torch.tensor([1]).to("meta")]
    vals = [torch.randn(2), torch.randn(1).to("meta")]
    before = raw_bits(ws[0])
    with pytest.raises(ValueError, match=r"swap_: layer #1 is on meta but layer #0 is on cpu"):
        ops.swap_(ws, idx, vals, backend=backend)
    assert torch.equal(raw_bits(ws[0]), before)
