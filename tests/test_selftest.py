"""Self-verification on first use (sparse_sam.selftest via backends.resolve) and ``info --selftest``.

On CPU the mechanism is exercised by listing the ``cpp`` or ``torch`` backend in ``backends.SELFTEST_ON``
(on a GPU it covers ``triton`` and ``cuda``) and breaking one of its kernels with monkeypatch.
"""
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from sparse_sam import backends, info, ops, reference, selftest
from conftest import raw_bits


@pytest.fixture
def verify_on(monkeypatch):
    """Verify the ``cpp`` and ``torch`` backends on CPU; every test starts and ends with no verdicts."""
    monkeypatch.setattr(backends, "SELFTEST_ON", {("cpp", "cpu"), ("torch", "cpu")})
    monkeypatch.delenv("SPARSE_SAM_SELFTEST", raising=False)
    monkeypatch.delenv("SPARSE_SAM_BACKEND", raising=False)
    selftest.clear()
    yield
    selftest.clear()


@pytest.fixture
def cpu_impl(cpp):
    return cpp


def _flip_one(masks):
    """Masks with the last entry of the last non-empty mask inverted: one wrong bit."""
    out = [m.clone() for m in masks]
    flat = out[-1].view(-1)
    flat[-1] = ~flat[-1]
    return out


def _no_warnings(fn):
    """``fn()``, failing on any self-test warning it emits."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", backends.SelfTestWarning)
        return fn()


def test_broken_topk_is_caught_and_falls_back_once(verify_on, cpu_impl, monkeypatch):
    good = cpu_impl.topk_mask
    monkeypatch.setattr(cpu_impl, "topk_mask", lambda s, k, n=None: _flip_one(good(s, k, n)))
    g = torch.Generator().manual_seed(0)
    scores, ks = [torch.randn(33, 7, generator=g), torch.randn(5, generator=g)], [40, 2]
    with pytest.warns(backends.SelfTestWarning, match=r"cpp backend failed its self-test for topk_mask on cpu "
                                                       r"\(torch.float32\).*differ"):
        out = ops.topk_mask(scores, ks)
    want = reference.topk_mask_ref(scores, ks)
    assert all(torch.equal(a, b) for a, b in zip(out, want))
    assert backends.resolve("topk_mask", scores[0])[0] == "torch"
    out = _no_warnings(lambda: ops.topk_mask(scores, ks))  # the verdict is remembered: no second warning
    assert all(torch.equal(a, b) for a, b in zip(out, want))
    # Another dtype is another key: checked (and found broken) again.
    with pytest.warns(backends.SelfTestWarning, match="float64"):
        assert backends.resolve("topk_mask", scores[0].double())[0] == "torch"


def test_raising_kernel_is_caught(verify_on, cpu_impl, monkeypatch):
    def boom(*args):
        raise RuntimeError("illegal memory access (simulated)")

    monkeypatch.setattr(cpu_impl, "sam_weight_forward", boom)
    g = torch.Generator().manual_seed(1)
    w, v = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    m = torch.rand(6, 5, generator=g) < 0.5
    with pytest.warns(backends.SelfTestWarning,
                      match="cpp backend failed its self-test for sam_weight on cpu.*RuntimeError: illegal memory"):
        out = ops.sam_weight(w, m, v)
    assert torch.equal(raw_bits(out), raw_bits(reference.sam_weight_forward_ref(w, m, v)))
    # sam_linear and the convs run the same kernels: they share the verdict, without another warning.
    x = torch.randn(3, 5, generator=g)
    y = _no_warnings(lambda: ops.sam_linear(x, w, m, v))
    assert torch.equal(raw_bits(y), raw_bits(F.linear(x, reference.sam_weight_forward_ref(w, m, v))))


def test_forced_backend_that_fails_raises(verify_on, cpu_impl, monkeypatch):
    monkeypatch.setattr(cpu_impl, "swap_", lambda w, i, v: None)  # writes nothing
    w, idx, val = torch.randn(10), torch.tensor([1, 4]), torch.randn(2)
    before = raw_bits(w)
    with pytest.warns(backends.SelfTestWarning), \
            pytest.raises(backends.BackendUnavailable, match="'cpp' was forced for swap_.*self-test.*differ"):
        ops.swap_([w], [idx], [val], backend="cpp")
    assert torch.equal(raw_bits(w), before)


def test_passing_backend_is_checked_once_and_kept(verify_on, cpu_impl):
    w = torch.randn(4, 4)
    assert _no_warnings(lambda: backends.resolve("swap_", w))[0] == "cpp"
    assert selftest._verdicts == {("cpp", "swap_", "cpu", torch.float32): None}


def test_opt_out(verify_on, cpu_impl, monkeypatch):
    good = cpu_impl.topk_mask
    monkeypatch.setattr(cpu_impl, "topk_mask", lambda s, k, n=None: _flip_one(good(s, k, n)))
    monkeypatch.setenv("SPARSE_SAM_SELFTEST", "0")
    scores = [torch.randn(9, 9)]
    out = _no_warnings(lambda: ops.topk_mask(scores, [30]))
    assert not torch.equal(out[0], reference.topk_mask_ref(scores, [30])[0])  # the broken kernel ran
    assert not selftest._verdicts
    monkeypatch.setenv("SPARSE_SAM_SELFTEST", "maybe")
    with pytest.raises(ValueError, match="SPARSE_SAM_SELFTEST must be 0 or 1"):
        ops.topk_mask(scores, [30])


def _corrupting(op):
    """The torch backend with ``op``'s result changed in one element's lowest bit."""
    t = backends.get("torch")

    def nudge(x):
        x = x.clone()
        if x.dtype == torch.bool:
            x.view(-1)[-1] = ~x.view(-1)[-1]
        else:
            b = reference.bits_view(x).view(-1)
            b[x.numel() // 2] ^= 1
        return x

    impl = types.SimpleNamespace(**{k: getattr(t, k) for k in
                                    ("topk_mask", "sam_weight_forward", "sam_weight_backward", "swap_")})
    if op == "topk_mask":
        impl.topk_mask = lambda s, k, n: [nudge(m) for m in t.topk_mask(s, k, n)]
    elif op == "sam_weight_forward":
        impl.sam_weight_forward = lambda w, m, v: nudge(t.sam_weight_forward(w, m, v))
    elif op == "sam_weight_backward":
        impl.sam_weight_backward = lambda *a: (lambda r: (r[0], nudge(r[1])))(t.sam_weight_backward(*a))
    else:
        def swap(ws, idx, vals):
            t.swap_(ws, idx, vals)
            vals[-1].copy_(nudge(vals[-1]))
        impl.swap_ = swap
    return impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op,broken", [("topk_mask", "topk_mask"), ("sam_weight", "sam_weight_forward"),
                                       ("sam_weight", "sam_weight_backward"), ("swap_", "swap_"),
                                       ("sam_conv_transpose1d", "sam_weight_forward")])
def test_each_check_catches_one_wrong_bit(op, broken, dtype):
    selftest.check(op, backends.get("torch"), "cpu", dtype)  # the reference itself passes
    with pytest.raises(selftest.SelfTestMismatch, match=r"differ.*\(seed \d+\)"):
        selftest.check(op, _corrupting(broken), "cpu", dtype)


def _fake_fused(scale):
    """A backend whose fused conv2d is PyTorch's conv of the reference W_eff, scaled by ``scale``."""
    t = backends.get("torch")
    return types.SimpleNamespace(
        sam_weight_forward=t.sam_weight_forward, sam_weight_backward=t.sam_weight_backward,
        sam_conv2d_forward=lambda x, w, m, v, b, st, p, d, gr, fused: scale * F.conv2d(
            x, reference.sam_weight_forward_ref(w, m, v), b, st, p, d, gr))


def test_conv_check_uses_the_documented_tolerance():
    tol = selftest.conv_tolerance(torch.float32)
    selftest.check("fused_sam_conv2d", _fake_fused(1.0), "cpu", torch.float32)
    selftest.check("fused_sam_conv2d", _fake_fused(1 + tol / 4), "cpu", torch.float32)
    with pytest.raises(selftest.SelfTestMismatch, match="exceeds"):
        selftest.check("fused_sam_conv2d", _fake_fused(1 + 4 * tol), "cpu", torch.float32)
    assert selftest.conv_tolerance(torch.float32, tf32=True) > tol


def test_failing_fused_conv_falls_back_to_materialised(verify_on, monkeypatch):
    fake = _fake_fused(1.01)  # 1% off: outside every tolerance
    fake.topk_mask, fake.swap_ = backends.get("torch").topk_mask, backends.get("torch").swap_
    monkeypatch.setattr(backends, "resolve", lambda op, t, backend=None: ("torch", fake))
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, 8, 8, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    m, v = torch.rand(w.shape, generator=g) < 0.5, torch.randn(w.shape, generator=g)
    want = F.conv2d(x, reference.sam_weight_forward_ref(w, m, v), None, 1, 1)
    with pytest.warns(backends.SelfTestWarning, match="fused_sam_conv2d.*exceeds"):
        out = ops.sam_conv2d(x, w, m, v, None, 1, 1, fused=True)
    assert torch.equal(raw_bits(out), raw_bits(want))


def test_info_selftest_passes_and_fails(monkeypatch, capsys, cpu_impl):
    monkeypatch.setattr(backends, "BACKENDS", ("cpp", "torch"))  # the triton checks: test_kernels_triton
    monkeypatch.setattr(selftest, "DTYPES", (torch.float32,))
    assert info.main(["--selftest"]) == 0
    out = capsys.readouterr().out
    for row in ("topk_mask", "sam_weight fwd/bwd", "swap_", "conv 1d/2d/3d (+T)"):
        for name in ("cpp", "torch"):
            assert any(line.split()[:1] == [name] and row in line and "PASS" in line for line in out.splitlines())
    good = cpu_impl.topk_mask
    monkeypatch.setattr(cpu_impl, "topk_mask", lambda s, k, n=None: _flip_one(good(s, k, n)))
    assert info.main(["--selftest"]) == 1
    out = capsys.readouterr().out
    assert any(line.startswith("cpp") and "topk_mask" in line and "FAIL" in line for line in out.splitlines())
    assert "1 failed" in out


def test_info_rejects_unknown_flags(capsys):
    with pytest.raises(SystemExit) as e:
        info.main(["--bogus"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_pytorch_own_conv_meets_the_conv_tolerance(dtype, transposed):
    """The bound is not tighter than PyTorch itself: its CPU conv of W_eff passes on several fresh cases."""
    for _ in range(3):
        selftest.check("sam_conv_transpose2d" if transposed else "sam_conv2d", backends.get("torch"), "cpu", dtype)


def test_verdicts_hold_inside_torch_compile(verify_on, cpu_impl, monkeypatch):
    """A compiled graph (fullgraph) picks the backend the eager verdicts allow, without running a check."""
    def boom(*args):
        raise RuntimeError("broken kernel")

    g = torch.Generator().manual_seed(4)
    w, v, m = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g) < 0.5
    monkeypatch.setattr(cpu_impl, "sam_weight_forward", boom)
    with pytest.warns(backends.SelfTestWarning):
        ops.sam_weight(w, m, v)  # the eager warm-up records the failure
    torch._dynamo.reset()
    f = torch.compile(lambda w, m, v: ops.sam_weight(w, m, v) * 2, fullgraph=True)
    out = _no_warnings(lambda: f(w, m, v))
    assert torch.equal(raw_bits(out), raw_bits(reference.sam_weight_forward_ref(w, m, v) * 2))
    torch._dynamo.reset()


def test_run_all_covers_triton_under_the_interpreter(monkeypatch):
    ok, why = backends.available("triton", "cpu", "topk_mask")
    if not ok:
        pytest.skip(f"triton cannot run CPU tensors here: {why}")
    monkeypatch.setattr(backends, "BACKENDS", ("triton",))
    monkeypatch.setattr(selftest, "_ROWS", selftest._ROWS[:3])  # the fused conv: test_kernels_triton
    results = selftest.run_all(dtypes=(torch.bfloat16,))
    assert [(r.backend, r.op, r.device) for r in results] == [
        ("triton", "topk_mask", "cpu"), ("triton", "sam_weight fwd/bwd", "cpu"), ("triton", "swap_", "cpu")]
    assert all(r.ok for r in results), [r.detail for r in results]
