"""topk_mask for a whole model at once vs the per-layer loop of ``torch.topk(k, sorted=False)`` into
preallocated outputs + ``index_fill_`` of a preallocated mask (``baselines.topk_loop``)."""
import pytest
import torch

from sparse_sam import ops
from baselines import topk_loop
from conftest import DEVICE, providers, run, size


def layer_sizes(n_layers: int, total: int) -> list[int]:
    g = torch.Generator().manual_seed(0)
    w = torch.rand(n_layers, generator=g) + 0.1
    return [max(1, int(total * x)) for x in (w / w.sum()).tolist()]


@pytest.mark.parametrize("layers,total", [(12, size(10_000_000, 20_000)), (200, size(2_000_000, 20_000))],
                         ids=["12_layers", "200_layers"])
@pytest.mark.parametrize("provider", providers("topk_mask"))
def test_topk_mask(benchmark, provider, layers, total):
    sizes = layer_sizes(layers, total)
    scores = [torch.randn(n, device=DEVICE) for n in sizes]
    ks = [max(1, n // 100) for n in sizes]  # γ = 1%
    fn = topk_loop(scores, ks) if provider == "pytorch" else (lambda: ops.topk_mask(scores, ks, backend=provider))
    masks = run(benchmark, fn, nbytes=sum(sizes) * (2 * 4 + 1), layers=layers, scores=sum(sizes))
    assert [int(m.sum()) for m in masks] == ks
