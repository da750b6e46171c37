"""swap_ of a sparse patch into the weights vs the per-layer index loop (``baselines.swap_loop``)."""
import pytest
import torch

from sparse_sam import ops
from baselines import swap_loop
from conftest import DEVICE, providers, run, size


@pytest.mark.parametrize("provider", providers("swap_"))
def test_swap(benchmark, provider):
    n, k, layers = size(10_000_000, 10_000), size(100_000, 100), 12
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n // layers, device=DEVICE) for _ in range(layers)]
    idx = [torch.sort(torch.randperm(n // layers, generator=g)[: k // layers]).values.int().to(DEVICE)
           for _ in range(layers)]
    vals = [torch.randn(k // layers, device=DEVICE) for _ in range(layers)]

    # floor: read + write k weights, k indices and k values
    fn = swap_loop(ws, idx, vals) if provider == "pytorch" else (lambda: ops.swap_(ws, idx, vals, backend=provider))
    run(benchmark, fn, nbytes=(k // layers) * layers * (4 * 2 + 4 + 4 * 2), k=k)
