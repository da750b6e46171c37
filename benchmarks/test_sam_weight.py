"""sam_weight forward + backward (W + m⊙v and its fused gradients) vs plain PyTorch autograd."""
import pytest
import torch

from sparse_sam import ops
from conftest import DEVICE, providers, run, size


@pytest.mark.parametrize("provider", providers("sam_weight"))
def test_sam_weight_fwd_bwd(benchmark, provider):
    n = size(8_000_000, 10_000)
    w = torch.randn(n, device=DEVICE)
    mask = torch.rand(n, device=DEVICE) < 0.01
    v = torch.randn(n, device=DEVICE, requires_grad=True)
    s = torch.randn(n, device=DEVICE, requires_grad=True)
    g = torch.randn(n, device=DEVICE)

    def plain():  # the straightforward autograd formulation with a straight-through score term
        out = w + mask * v + (s - s.detach()) * v.detach()
        return torch.autograd.grad(out, (v, s), g)

    def sam():
        return torch.autograd.grad(ops.sam_weight(w, mask, v, s, backend=provider), (v, s), g)

    # floor: forward reads W, m, v and writes W_eff; backward reads g, m, v and writes grad_v, grad_s
    run(benchmark, plain if provider == "pytorch" else sam, nbytes=n * (4 + 1 + 4 + 4 + 4 + 1 + 4 + 4 + 4))
