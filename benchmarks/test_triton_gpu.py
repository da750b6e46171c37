"""GPU-scale benchmarks of the Triton kernels against PyTorch baselines measured in the same run.

Run on a CUDA machine: ``pytest benchmarks/test_triton_gpu.py --benchmark-only`` (``benchmarks/gpu_run.sh``
does it and stores the results). Every case has a ``provider`` parameter; the PyTorch provider is the
baseline a speed-up is measured against. ``benchmark.extra_info`` carries:

* ``bytes``: the bytes the op must move at minimum (its memory floor), and ``GB/s`` achieved on them;
* ``copy_floor_ms``: time of a device-to-device copy of that many bytes on this GPU, measured in the
  same process: the practical lower bound for a memory-bound op (``pct_of_copy`` = floor / time);
* ``TFLOP/s`` for convolutions.
"""
import importlib

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need CUDA", allow_module_level=True)
pytest.importorskip("triton", reason="Triton is not installed")

from sparse_sam import reference as R  # noqa: E402
from sparse_sam.kernels import patch_swap, sam_conv, sam_weight  # noqa: E402

topk = importlib.import_module("sparse_sam.kernels.topk_mask")
DEV = "cuda"
_copy_ms: dict[int, float] = {}


def _time_ms(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def copy_floor_ms(nbytes: int) -> float:
    """Measured time of a device-to-device copy that reads and writes ``nbytes`` in total."""
    if nbytes not in _copy_ms:
        src = torch.empty(max(nbytes // 2, 1), dtype=torch.uint8, device=DEV)
        dst = torch.empty_like(src)
        _copy_ms[nbytes] = _time_ms(lambda: dst.copy_(src))
    return _copy_ms[nbytes]


def run(benchmark, fn, nbytes=None, flop=None, **info):
    """Time ``fn`` (synchronised) and record bandwidth / throughput next to the floors."""
    def timed():
        fn()
        torch.cuda.synchronize()

    timed()  # compile / autotune outside the measurement
    benchmark.pedantic(timed, rounds=20, warmup_rounds=3, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once as a test, nothing to report
        return
    mean = benchmark.stats.stats.mean
    extra = dict(info, device=torch.cuda.get_device_name())
    if nbytes:
        floor = copy_floor_ms(nbytes)
        extra.update({"bytes": nbytes, "GB/s": round(nbytes / mean / 1e9, 1), "copy_floor_ms": round(floor, 4),
                      "pct_of_copy": round(100 * floor / (mean * 1e3), 1)})
    if flop:
        extra.update({"flop": flop, "TFLOP/s": round(flop / mean / 1e12, 2)})
    benchmark.extra_info.update(extra)


# ------------------------------------------------------------------------------------------ top-k
def _model_sizes(n_layers, total, seed=0):
    """Layer sizes spread over three orders of magnitude, summing to about ``total``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.exp(torch.rand(n_layers, generator=g) * 7.0)
    return [max(1, int(x)) for x in (w / w.sum() * total).tolist()]


TOPK_MODELS = {
    "200_layers_50M": _model_sizes(200, 50_000_000),
    "12_layers_2.4M": [768 * 3072] * 12,  # ViT-B MLP matrices, every layer >= 1M
}


def _topk_loop(scores, ks):
    """The per-layer PyTorch baseline: torch.topk + scatter into a zero mask, one layer at a time."""
    out = []
    for s, k in zip(scores, ks):
        m = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
        m[torch.topk(s.reshape(-1), k, sorted=False).indices] = True
        out.append(m.view(s.shape))
    return out


@pytest.mark.parametrize("provider", ["triton", "triton_no_nan_check", "torch_topk_loop"])
@pytest.mark.parametrize("model", list(TOPK_MODELS))
def test_topk_mask(benchmark, model, provider):
    sizes = TOPK_MODELS[model]
    flat = torch.randn(sum(sizes), device=DEV)
    scores = list(torch.split(flat, sizes))
    ks = [max(1, n // 100) for n in sizes]  # 1 % budget per layer
    fn = {"triton": lambda: topk.topk_mask(scores, ks),
          "triton_no_nan_check": lambda: topk.topk_mask(scores, ks, check_nan=False),
          "torch_topk_loop": lambda: _topk_loop(scores, ks)}[provider]
    if provider != "torch_topk_loop":  # exact at benchmark scale (random floats do tie at 50M scores)
        assert all(torch.equal(a, b) for a, b in zip(fn(), R.topk_mask_ref(scores, ks)))
    # Floor: read the float32 scores once, write the bool mask once.
    run(benchmark, fn, nbytes=flat.numel() * 5, layers=len(sizes), scores=flat.numel())


# ------------------------------------------------------------------------------------- sam_weight
@pytest.mark.parametrize("provider", ["triton", "torch_reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sam_weight_fwd_bwd(benchmark, dtype, provider):
    n = 64 * 2 ** 20
    w, v, g = (torch.randn(n, device=DEV, dtype=dtype) for _ in range(3))
    m = torch.rand(n, device=DEV) < 0.01
    impl = sam_weight if provider == "triton" else None

    def step():
        if impl is None:
            R.sam_weight_forward_ref(w, m, v)
            R.sam_weight_backward_ref(g, m, v, dtype, "masked")
        else:
            impl.sam_weight_forward(w, m, v)
            impl.sam_weight_backward(g, m, v, dtype, "masked")

    es = w.element_size()
    # forward: read W, m, v, write W_eff; backward: read g, m, v, write grad_v, grad_s.
    run(benchmark, step, nbytes=n * (3 * es + 1) + n * (4 * es + 1), elements=n)


@pytest.mark.parametrize("provider", ["triton_grouped", "triton_per_layer", "torch_per_layer"])
def test_sam_weight_forward_200_layers(benchmark, provider):
    """Does one grouped launch beat 200 small launches? (Launch overhead dominates small layers.)"""
    sizes = _model_sizes(200, 20_000_000, seed=1)
    ws = [torch.randn(n, device=DEV) for n in sizes]
    ms = [torch.rand(n, device=DEV) < 0.01 for n in sizes]
    vs = [torch.randn(n, device=DEV) for n in sizes]
    fn = {"triton_grouped": lambda: sam_weight.sam_weight_forward_grouped(ws, ms, vs),
          "triton_per_layer": lambda: [sam_weight.sam_weight_forward(*a) for a in zip(ws, ms, vs)],
          "torch_per_layer": lambda: [R.sam_weight_forward_ref(*a) for a in zip(ws, ms, vs)]}[provider]
    run(benchmark, fn, nbytes=sum(sizes) * 13, layers=len(sizes))


# ------------------------------------------------------------------------------------------ convs
# The project's autoencoder (sparse_sam.experiments.autoencoder, width 32, semantics 8x8x8):
# (name, transposed, c_in, c_out, kernel, stride, padding, input size)
AUTOENCODER = [
    ("enc1", False, 3, 32, 3, 1, 1, 32), ("enc2", False, 32, 32, 3, 2, 1, 32),
    ("enc3", False, 32, 64, 3, 1, 1, 16), ("enc4", False, 64, 64, 3, 2, 1, 16),
    ("enc5", False, 64, 64, 3, 1, 1, 8), ("enc6", False, 64, 8, 3, 1, 1, 8),
    ("dec1", True, 8, 64, 3, 1, 1, 8), ("dec2", True, 64, 64, 3, 1, 1, 8),
    ("dec3", True, 64, 64, 4, 2, 1, 8), ("dec4", True, 64, 32, 3, 1, 1, 16),
    ("dec5", True, 32, 32, 4, 2, 1, 16), ("dec6", True, 32, 3, 3, 1, 1, 32),
]


@pytest.mark.parametrize("provider", ["triton_fused", "materialise_cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layer", AUTOENCODER, ids=[l[0] for l in AUTOENCODER])
def test_sam_conv_autoencoder_b256(benchmark, layer, dtype, provider):
    name, transposed, cin, cout, k, s, p, hw = layer
    x = torch.randn(256, cin, hw, hw, device=DEV, dtype=dtype)
    wshape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    w, v = torch.randn(wshape, device=DEV, dtype=dtype), torch.randn(wshape, device=DEV, dtype=dtype)
    m = torch.rand(wshape, device=DEV) < 0.05
    if transposed:
        fused = lambda: sam_conv.sam_conv_transpose2d_forward(x, w, m, v, None, s, p, 0, 1, 1, fused=True)
        mat = lambda: torch.nn.functional.conv_transpose2d(x, sam_weight.sam_weight_forward(w, m, v), None, s, p)
    else:
        fused = lambda: sam_conv.sam_conv2d_forward(x, w, m, v, None, s, p, 1, 1, fused=True)
        mat = lambda: torch.nn.functional.conv2d(x, sam_weight.sam_weight_forward(w, m, v), None, s, p)
    out = mat()
    torch.testing.assert_close(fused(), out, rtol=2e-2, atol=5e-2)
    flop = 2 * out.numel() * cin * k * k if not transposed else 2 * x.numel() * cout * k * k
    heuristic = (sam_conv.sam_conv_transpose2d_forward(x, w, m, v, None, s, p, 0, 1, 1) if transposed
                 else sam_conv.sam_conv2d_forward(x, w, m, v, None, s, p, 1, 1)) is not None
    run(benchmark, fused if provider == "triton_fused" else mat, flop=flop, layer=name,
        heuristic_picks="fused" if heuristic else "materialise")


# ------------------------------------------------------------------------------------------- swap
@pytest.mark.parametrize("provider", ["triton", "torch_per_layer"])
def test_swap_k1m(benchmark, provider):
    sizes = _model_sizes(200, 50_000_000, seed=2)
    total_k = 1_000_000
    ws = [torch.randn(n, device=DEV) for n in sizes]
    idx = [torch.randperm(n, device=DEV)[:max(1, n * total_k // sum(sizes))].sort().values for n in sizes]
    vals = [torch.randn(i.numel(), device=DEV) for i in idx]
    fn = {"triton": lambda: patch_swap.swap_(ws, idx, vals),
          "torch_per_layer": lambda: R.swap_bits_unchecked_(ws, idx, vals)}[provider]
    k = sum(i.numel() for i in idx)
    # Per entry: read index (8 B) and value, read and write the weight element, write the value.
    run(benchmark, fn, nbytes=k * (8 + 4 * 4), layers=len(sizes), k=k)
