"""Triton kernels against the reference.

Without CUDA the kernels run on CPU tensors under Triton's interpreter, so shapes stay tiny; the
``gpu``-marked tests compile for real on CUDA with larger shapes and skip otherwise.
"""
import importlib
import os

import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton / sparse_sam.kernels: @triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="Triton is not installed: the triton backend is unavailable")

import torch.nn.functional as F  # noqa: E402

from sparse_sam import ops, reference as R, selftest  # noqa: E402
from sparse_sam.kernels import patch_swap, sam_conv, sam_weight  # noqa: E402

# The package exports the function topk_mask under the submodule's name.
topk_mod = importlib.import_module("sparse_sam.kernels.topk_mask")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not isinstance(topk_mod._topk_hist_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("sparse_sam.kernels was imported before TRITON_INTERPRET=1 was set, so it cannot run on CPU "
                "(run this file alone or set TRITON_INTERPRET=1 in the environment)", allow_module_level=True)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: real Triton compilation")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def bits(t):
    return R.bits_view(t.contiguous())


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- top-k
def _check_topk(scores, ks):
    got = topk_mod.topk_mask(scores, ks)
    want = R.topk_mask_ref([s.cpu() for s in scores], ks)
    for i, (g, w, k) in enumerate(zip(got, want, ks)):
        assert g.dtype == torch.bool and g.shape == scores[i].shape
        assert int(g.sum()) == k, f"layer {i}"
        assert torch.equal(g.cpu(), w), f"layer {i}: mask differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_random_segments_odd_sizes(dtype):
    g = gen(1)
    sizes = [1, 37, 4097, 300, 2, 5000]  # not multiples of any block size, 1-element layers included
    scores = [torch.randn(n, generator=g).to(dtype).to(DEVICE) for n in sizes]
    ks = [1, 11, 4097, 0, 1, 2500]  # k = p, k = 0, in-between
    _check_topk(scores, ks)


def test_topk_ties_and_signed_zeros():
    g = gen(2)
    few = torch.randint(-2, 3, (3001,), generator=g).float()  # 5 distinct values: massive ties
    zeros = torch.zeros(513)
    zeros[torch.randperm(513, generator=g)[:200]] = -0.0  # -0.0 and +0.0 must tie, lower index wins
    zeros[::50] = -1e-30
    halves = torch.randint(0, 2, (700, 3), generator=g).to(torch.float16) * 0.5
    scores = [t.to(DEVICE) for t in (few, zeros, halves)]
    for ks in ([1500, 300, 1000], [7, 512, 1], [3001, 0, 2100]):
        _check_topk(scores, ks)


def test_topk_constant_layer_resolves_by_index_over_several_digits():
    # 70_000 equal scores: the threshold key has more copies than slots, so the lower-index rule
    # must be resolved on indices wider than 16 bits.
    s = torch.full((70_000,), 0.25, device=DEVICE)
    _check_topk([s, torch.randn(3, device=DEVICE)], [40_001, 2])


def test_topk_views_and_non_contiguous_layers_untouched():
    flat = torch.randn(1000, generator=gen(3)).to(DEVICE)
    before = flat.clone()
    scores = [flat[:10].view(2, 5), flat[10:700].view(30, 23).t(), flat[700:]]  # middle one strided
    _check_topk(scores, [3, 345, 300])
    assert torch.equal(flat, before)


def test_topk_nan_raises_naming_layer():
    scores = [torch.randn(50, device=DEVICE), torch.randn(40, device=DEVICE)]
    scores[1][17] = float("nan")
    with pytest.raises(ValueError, match="'dec.conv'"):
        topk_mod.topk_mask(scores, [5, 5], ["enc.conv", "dec.conv"])
    # Without the check there is no host synchronisation and the NaN-free layer is still exact.
    masks = topk_mod.topk_mask(scores, [5, 5], check_nan=False)
    assert torch.equal(masks[0].cpu(), R.topk_mask_ref([scores[0].cpu()], [5])[0])


def test_topk_float64_falls_back_to_reference():
    s = [torch.randn(33, dtype=torch.float64, device=DEVICE)]
    assert torch.equal(topk_mod.topk_mask(s, [9])[0].cpu(), R.topk_mask_ref([s[0].cpu()], [9])[0])


def test_topk_through_ops_dispatch():
    scores = [torch.randn(65, 3, device=DEVICE), torch.randn(9, device=DEVICE)]
    got = ops.topk_mask(scores, [17, 9], backend="triton")
    want = R.topk_mask_ref([s.cpu() for s in scores], [17, 9])
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))


# -------------------------------------------------------------------------------------- sam_weight
@pytest.mark.parametrize("wd,vd,sd", [(torch.float32,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
                                      (torch.float16, torch.float32, torch.float32),
                                      (torch.bfloat16, torch.float16, torch.float32),
                                      (torch.float32, torch.float32, torch.float64)])
def test_sam_weight_forward_backward(wd, vd, sd):
    g = gen(4)
    shape = (7, 3, 101)  # 2121 elements: one full block plus a ragged one
    w = torch.randn(shape, generator=g).to(wd)
    w.view(-1)[:4] = torch.tensor([-0.0, float("nan"), float("inf"), 1e-40]).to(wd)
    m = torch.rand(shape, generator=g) < 0.3
    m.view(-1)[:4] = False  # unmasked: these bit patterns must pass through untouched
    v = torch.randn(shape, generator=g).to(vd)
    w, m, v = w.to(DEVICE), m.to(DEVICE), v.to(DEVICE)
    out = sam_weight.sam_weight_forward(w, m, v)
    ref = R.sam_weight_forward_ref(w, m, v)
    assert out.dtype == wd and out.shape == shape
    assert torch.equal(bits(out)[~m], bits(w)[~m])
    assert torch.equal(bits(out), bits(ref)), "forward must round exactly like the reference"
    grad = torch.randn(shape, generator=g).to(wd).to(DEVICE)
    for mode in R.DELTA_GRAD_MODES:
        gd, gs = sam_weight.sam_weight_backward(grad, m, v, sd, mode)
        rd, rs = R.sam_weight_backward_ref(grad, m, v, sd, mode)
        assert gd.dtype == vd and gs.dtype == sd
        assert torch.equal(bits(gd), bits(rd)), mode
        assert torch.equal(bits(gs), bits(rs)), mode


def test_sam_weight_forward_grouped_matches_per_layer():
    g = gen(14)
    shapes = [(3, 5), (1,), (2049,), (4, 4, 3), (7,)]
    dts = [(torch.float32, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
    ws = [torch.randn(s, generator=g).to(wd).to(DEVICE) for s, (wd, _) in zip(shapes, dts)]
    ms = [(torch.rand(s, generator=g) < 0.4).to(DEVICE) for s in shapes]
    vs = [torch.randn(s, generator=g).to(vd).to(DEVICE) for s, (_, vd) in zip(shapes, dts)]
    outs = sam_weight.sam_weight_forward_grouped(ws, ms, vs)
    for o, w, m, v in zip(outs, ws, ms, vs):
        assert o.shape == w.shape and o.dtype == w.dtype
        assert torch.equal(bits(o), bits(R.sam_weight_forward_ref(w, m, v)))


def test_sam_weight_forward_nan_sum_stays_nan():
    w = torch.tensor([float("nan"), 1.0, -0.0], dtype=torch.bfloat16, device=DEVICE)
    m = torch.tensor([True, True, False], device=DEVICE)
    v = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float16, device=DEVICE)
    out = sam_weight.sam_weight_forward(w, m, v)
    torch.testing.assert_close(out, R.sam_weight_forward_ref(w, m, v), equal_nan=True, rtol=0, atol=0)
    assert bits(out)[2] == bits(w)[2]  # -0.0 survives where unmasked


def test_sam_weight_autograd_through_ops():
    g = gen(5)
    w = torch.randn(5, 9, generator=g).to(DEVICE)
    m = (torch.rand(5, 9, generator=g) < 0.5).to(DEVICE)
    v = torch.randn(5, 9, generator=g).to(DEVICE).requires_grad_()
    s = torch.randn(5, 9, generator=g).to(DEVICE).requires_grad_()
    v2, s2 = v.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    up = torch.randn(5, 9, generator=g).to(DEVICE)
    (ops.sam_weight(w, m, v, s, backend="triton") * up).sum().backward()
    (R.sam_weight_ref(w, m, v2, s2) * up).sum().backward()
    assert torch.equal(v.grad, v2.grad) and torch.equal(s.grad, s2.grad)


# ------------------------------------------------------------------------------------------ convs
CONV_CASES = [  # n, c_in, h, w, c_out, k, stride, padding, dilation, output_padding, bias
    (2, 3, 9, 7, 5, 3, 1, 1, 1, 0, True),
    (1, 5, 8, 8, 3, 3, 2, 1, 1, 1, False),   # stride 2 with output_padding 1 (transposed)
    (2, 3, 7, 6, 7, 3, 1, 2, 2, 1, True),    # dilation 2, odd channel counts
    (1, 4, 5, 5, 17, 1, 2, 0, 1, 1, True),   # 1x1, more output channels than one tile
]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=2e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


def _conv_inputs(case, dtype, transposed, seed):
    n, c, h, w, co, k, *_ = case
    g = gen(seed)
    wshape = (c, co, k, k) if transposed else (co, c, k, k)
    x = torch.randn(n, c, h, w, generator=g).to(dtype)
    wt = torch.randn(wshape, generator=g).to(dtype)
    m = torch.rand(wshape, generator=g) < 0.3
    v = torch.randn(wshape, generator=g).to(dtype)
    b = torch.randn(co, generator=g).to(dtype) if case[-1] else None
    return [t.to(DEVICE) if t is not None else None for t in (x, wt, m, v, b)]


@pytest.fixture(autouse=True)
def _ieee_fp32_convs():
    # Compare float32 convs at float32 accuracy on GPU too (cuDNN and Triton would both use TF32).
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_sam_conv2d_fused(case, dtype):
    _, _, _, _, _, _, s, p, d, _, _ = case
    x, w, m, v, b = _conv_inputs(case, dtype, False, 6)
    out = sam_conv.sam_conv2d_forward(x, w, m, v, b, s, p, d, 1, fused=True)
    error = selftest.conv_error(out, x, R.sam_weight_forward_ref(w, m, v), b, F.conv2d, (s, p, d, 1))
    assert error is None, error


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_sam_conv_transpose2d_fused(case, dtype):
    _, _, _, _, _, _, s, p, d, op, _ = case
    x, w, m, v, b = _conv_inputs(case, dtype, True, 7)
    out = sam_conv.sam_conv_transpose2d_forward(x, w, m, v, b, s, p, op, 1, d, fused=True)
    error = selftest.conv_error(out, x, R.sam_weight_forward_ref(w, m, v), b, F.conv_transpose2d, (s, p, op, 1, d))
    assert error is None, error


def test_sam_conv_declines():
    x, w, m, v, b = _conv_inputs(CONV_CASES[0], torch.float32, False, 8)
    assert sam_conv.sam_conv2d_forward(x, w, m, v, b, 1, 1, 1, 1, fused=False) is None
    assert sam_conv.sam_conv2d_forward(x, w, m, v, b, 1, "same", 1, 1) is None
    x2 = torch.randn(1, 4, 6, 6, device=DEVICE)
    w2 = torch.randn(4, 2, 3, 3, device=DEVICE)
    m2 = torch.ones(4, 2, 3, 3, dtype=torch.bool, device=DEVICE)
    assert sam_conv.sam_conv2d_forward(x2, w2, m2, w2, None, 1, 0, 1, 2, fused=True) is None  # groups
    if DEVICE == "cpu":  # the automatic choice never uses the interpreter for real work
        assert sam_conv.sam_conv2d_forward(x, w, m, v, b, 1, 1, 1, 1) is None


def test_sam_conv_autograd_through_ops(monkeypatch):
    monkeypatch.setenv("SPARSE_SAM_TRITON_CONV", "always")
    monkeypatch.setenv("SPARSE_SAM_FUSED_CONV", "1")
    case = CONV_CASES[1]
    _, _, _, _, _, _, s, p, d, op, _ = case
    x, w, m, v, b = _conv_inputs(case, torch.float32, True, 9)
    sc = torch.randn_like(v)
    leaves = [t.clone().requires_grad_() for t in (x, v, sc)]
    leaves_ref = [t.clone().requires_grad_() for t in (x, v, sc)]
    y = ops.sam_conv_transpose2d(leaves[0], w, m, leaves[1], None, s, p, op, 1, d, scores=leaves[2],
                                 backend="triton")
    assert "SAMConvFunction" in type(y.grad_fn).__name__  # the fused forward ran
    yr = R.sam_conv_transpose2d_ref(leaves_ref[0], w, m, leaves_ref[1], None, s, p, op, 1, d,
                                    scores=leaves_ref[2])
    torch.testing.assert_close(y, yr, **TOL[torch.float32])
    up = torch.randn_like(yr)
    (y * up).sum().backward()
    (yr * up).sum().backward()
    for a, r in zip(leaves, leaves_ref):
        torch.testing.assert_close(a.grad, r.grad, **TOL[torch.float32])


# ------------------------------------------------------------------------------------------- swap
def _swap_case(seed):
    g = gen(seed)
    ws = [torch.randn(50, generator=g), torch.randn(7, 3, generator=g).half(),
          torch.randn(2500, generator=g), torch.randn(4, generator=g).bfloat16(),
          torch.randn(6, generator=g).double(), torch.randn(9, generator=g)]
    ws[0][3] = float("nan")
    ws[0].view(torch.int32)[4] = 0x7FC00123  # NaN with a payload
    ws[2][0] = -0.0
    idx = [torch.tensor([0, 3, 4, 49]), torch.tensor([1, 20], dtype=torch.int32),
           torch.arange(0, 2500, 3), torch.tensor([2]), torch.tensor([0, 5]), torch.tensor([], dtype=torch.int64)]
    vals = [torch.randn(len(i), generator=g).to(w.dtype) for w, i in zip(ws, idx)]
    vals[0].view(torch.int32)[1] = -8388607  # a negative NaN with payload travels into the weight
    vals[2][5] = -0.0
    dev = [[t.to(DEVICE) for t in group] for group in (ws, idx, vals)]
    return dev


def test_swap_bit_exact_and_self_inverse():
    ws, idx, vals = _swap_case(10)
    ws_ref, vals_ref = [w.cpu().clone() for w in ws], [v.cpu().clone() for v in vals]
    before_w, before_v = [bits(w).clone() for w in ws], [bits(v).clone() for v in vals]
    patch_swap.swap_(ws, idx, vals)
    R.swap_ref(ws_ref, [i.cpu() for i in idx], vals_ref)
    for a, r in zip(ws + vals, ws_ref + vals_ref):
        assert torch.equal(bits(a).cpu(), bits(r))
    patch_swap.swap_(ws, idx, vals)
    for a, r in zip(ws + vals, before_w + before_v):
        assert torch.equal(bits(a), r)


def test_swap_kernel_masks_out_of_range_indices():
    # The public op validates; the kernel on its own must still never touch memory out of bounds.
    w = torch.arange(8, dtype=torch.float32, device=DEVICE)
    idx = torch.tensor([-1, 2, 8, 1000], device=DEVICE)
    vals = torch.full((4,), -5.0, device=DEVICE)
    patch_swap.swap_([w], [idx], [vals])
    assert w.tolist() == [0, 1, -5, 3, 4, 5, 6, 7]
    assert vals.tolist() == [-5, 2, -5, -5]


def test_swap_through_ops_rejects_bad_patch_untouched():
    ws, idx, vals = _swap_case(11)
    before = [bits(w).clone() for w in ws]
    idx[2] = idx[2].flip(0)  # unsorted
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.swap_(ws, idx, vals, backend="triton")
    assert all(torch.equal(bits(w), b) for w, b in zip(ws, before))


# --------------------------------------------------------------------------------------- GPU only
@gpu
def test_gpu_topk_large_segments():
    g = torch.Generator(device="cuda").manual_seed(12)
    sizes = [3_000_001, 1, 65_537, 1_000_000, 12_345]
    scores = [torch.randn(n, device="cuda", generator=g) for n in sizes]
    scores[3] = torch.randint(0, 4, (1_000_000,), device="cuda", generator=g).float()  # ties
    ks = [30_000, 1, 65_537, 250_001, 0]
    _check_topk(scores, ks)


@gpu
def test_gpu_sam_weight_and_swap_large():
    n = 5_000_003
    w, v = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    m = torch.rand(n, device="cuda") < 0.01
    assert torch.equal(bits(sam_weight.sam_weight_forward(w, m, v)), bits(R.sam_weight_forward_ref(w, m, v)))
    idx = torch.randperm(n, device="cuda")[:1_000_000].sort().values
    vals = torch.randn(1_000_000, device="cuda")
    w0, v0 = w.clone(), vals.clone()
    patch_swap.swap_([w], [idx], [vals])
    assert torch.equal(w[idx], v0) and torch.equal(vals, w0[idx])


@gpu
@pytest.mark.parametrize("transposed", [False, True])
def test_gpu_conv_autoencoder_shape(transposed):
    case = (32, 64, 16, 16, 128, 3, 2, 1, 1, 1, True)
    _, _, _, _, _, _, s, p, d, op, _ = case
    x, w, m, v, b = _conv_inputs(case, torch.float16, transposed, 13)
    if transposed:
        out = sam_conv.sam_conv_transpose2d_forward(x, w, m, v, b, s, p, op, 1, d, fused=True)
        ref = R.sam_conv_transpose2d_ref(x, w, m, v, b, s, p, op, 1, d)
    else:
        out = sam_conv.sam_conv2d_forward(x, w, m, v, b, s, p, d, 1, fused=True)
        ref = R.sam_conv2d_ref(x, w, m, v, b, s, p, d, 1)
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=5e-2)


# ------------------------------------------------------------------------------- compile for CUDA
def test_kernels_compile_for_sm90_without_gpu():
    """The interpreter accepts code the real compiler rejects; compile every kernel to a cubin."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_compile_check.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


# ---------------------------------------------------------------------- device guards, 32-bit limits
common = importlib.import_module("sparse_sam.kernels.common")
sam_weight_mod = importlib.import_module("sparse_sam.kernels.sam_weight")


class _NoLaunch:
    """Stands in for a kernel that must not be launched."""

    def __getitem__(self, grid):
        raise AssertionError("kernel launched")


def test_topk_layer_above_int32_limit_runs_on_the_threshold_selection(monkeypatch):
    g = gen(20)
    scores, ks = [torch.randn(1500, generator=g).to(DEVICE), torch.randn(7, generator=g).to(DEVICE)], [700, 3]
    monkeypatch.setattr(topk_mod, "_topk_hist_kernel", _NoLaunch())
    with pytest.raises(AssertionError, match="kernel launched"):  # below the limit: the kernel runs
        topk_mod.topk_mask(scores, ks)
    monkeypatch.setattr(common, "INT32_LIMIT", 1499)
    _check_topk(scores, ks)


def test_fused_conv_declines_when_an_int32_offset_could_wrap(monkeypatch):
    x, w, m, v, b = _conv_inputs(CONV_CASES[0], torch.float32, False, 21)
    monkeypatch.setattr(sam_conv, "_run_fused", lambda *a, **k: "ran")
    assert sam_conv.sam_conv2d_forward(x, w, m, v, b, 1, 1, 1, 1, fused=True) == "ran"
    monkeypatch.setattr(common, "INT32_LIMIT", x[0].numel() - 1)  # one input image is too large
    assert sam_conv.sam_conv2d_forward(x, w, m, v, b, 1, 1, 1, 1, fused=True) is None
    xt, wt, mt, vt, bt = _conv_inputs(CONV_CASES[0], torch.float32, True, 22)
    monkeypatch.setattr(common, "INT32_LIMIT", wt.numel() - 1)  # the weight is too large
    assert sam_conv.sam_conv_transpose2d_forward(xt, wt, mt, vt, bt, 1, 1, 0, 1, 1, fused=True) is None


def test_every_launch_runs_under_its_tensors_device_guard(monkeypatch):
    entered = []

    def recording_guard(t):
        entered.append(t.device)
        return common.device_guard(t)

    for mod in (topk_mod, sam_weight_mod, patch_swap, sam_conv):
        monkeypatch.setattr(mod, "device_guard", recording_guard)
    g = gen(23)
    w, v = torch.randn(5, 6, generator=g).to(DEVICE), torch.randn(5, 6, generator=g).to(DEVICE)
    m = (torch.rand(5, 6, generator=g) < 0.5).to(DEVICE)
    sam_weight.sam_weight_forward(w, m, v)
    sam_weight.sam_weight_backward(w, m, v, torch.float32)
    sam_weight.sam_weight_forward_grouped([w, w], [m, m], [v, v])
    patch_swap.swap_([w.clone()], [torch.tensor([1, 3], device=DEVICE)], [torch.randn(2).to(DEVICE)])
    topk_mod.topk_mask([w], [4])
    x, cw, cm, cv, cb = _conv_inputs(CONV_CASES[3], torch.float32, False, 24)
    sam_conv.sam_conv2d_forward(x, cw, cm, cv, cb, 2, 0, 1, 1, fused=True)
    assert len(entered) == 6 and all(d == w.device for d in entered)


def test_grouped_sam_weight_names_the_layer_on_another_device():
    w = torch.randn(3, 4, device=DEVICE)
    m = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"layer #1 is on meta but layer #0 is on"):
        sam_weight.sam_weight_forward_grouped([w, w.to("meta")], [m, m.to("meta")], [w, w.to("meta")])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_ops_on_the_second_device_while_the_first_is_current():
    g = gen(25)
    with torch.cuda.device(0):
        scores = [torch.randn(5000, generator=g).to("cuda:1"), torch.randn(37, generator=g).to("cuda:1")]
        _check_topk(scores, [1234, 5])
        w = torch.randn(64, 33, generator=g).to("cuda:1")
        m = (torch.rand(64, 33, generator=g) < 0.5).to("cuda:1")
        v = torch.randn(64, 33, generator=g).to("cuda:1")
        want = R.sam_weight_forward_ref(w.cpu(), m.cpu(), v.cpu())
        assert torch.equal(sam_weight.sam_weight_forward(w, m, v).cpu(), want)
