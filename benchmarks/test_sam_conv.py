"""Forward of the SAM conv / transposed conv vs materialising W + m⊙v and calling PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from sparse_sam import ops
from conftest import DEVICE, providers, run, size


@pytest.mark.parametrize("transposed", [False, True], ids=["conv2d", "conv_transpose2d"])
@pytest.mark.parametrize("provider", providers("sam_conv2d"))
def test_sam_conv_forward(benchmark, provider, transposed):
    n, c, h = size(128, 2), 64, size(16, 8)
    x = torch.randn(n, c, h, h, device=DEVICE)
    w = torch.randn(c, c, 4 if transposed else 3, 4 if transposed else 3, device=DEVICE)
    mask = torch.rand(w.shape, device=DEVICE) < 0.01
    v = torch.randn(w.shape, device=DEVICE)
    if transposed:
        plain = lambda: F.conv_transpose2d(x, w + mask * v, None, 2, 1)
        sam = lambda: ops.sam_conv_transpose2d(x, w, mask, v, None, 2, 1, backend=provider)
    else:
        plain = lambda: F.conv2d(x, w + mask * v, None, 1, 1)
        sam = lambda: ops.sam_conv2d(x, w, mask, v, None, 1, 1, backend=provider)
    flops = 2 * n * c * c * w.shape[2] * w.shape[3] * h * h * (4 if transposed else 1)
    with torch.no_grad():
        run(benchmark, plain if provider == "pytorch" else sam, GFLOP=flops / 1e9)
