"""The compiled ops under torch.compile: fake kernels, schemas, and a patched model's forward."""
import pytest
import torch
import torch.nn as nn

import sparse_sam
from sparse_sam import backends


@pytest.fixture(scope="module")
def cpp():
    ok, why = backends.available("cpp", "cpu", "topk_mask")
    if not ok:
        pytest.skip(f"cpp backend unavailable: {why}")
    return backends.get("cpp")


def _sam_inputs(shape=(6, 5, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g), torch.rand(shape, generator=g) < 0.3, torch.randn(shape, generator=g))


@pytest.mark.parametrize("case", ["topk_mask", "sam_weight_forward", "sam_weight_backward", "swap_"])
def test_opcheck(cpp, case):
    """Schema (incl. mutation annotations), fake kernel and real kernel agree (torch.library.opcheck)."""
    w, m, v = _sam_inputs()
    args = {
        "topk_mask": ([w, v.view(-1)[:7]], [9, 7]),
        "sam_weight_forward": (w, m, v),
        "sam_weight_backward": (w, m, v.double(), torch.float32, False),
        "swap_": ([w.clone(), v.clone()], [torch.tensor([0, 4, 9]), torch.tensor([2, 3])], [torch.randn(3), torch.randn(2)]),
    }[case]
    torch.library.opcheck(getattr(torch.ops.sparse_sam, case), args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_compiled_functional_ops_match_eager(cpp):
    w, m, v = _sam_inputs()
    x = torch.randn(2, 5, 9, 9)

    def f(x, w, m, v):
        return torch.nn.functional.conv2d(x, torch.ops.sparse_sam.sam_weight_forward(w, m, v), padding=1).relu()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, w, m, v), f(x, w, m, v))


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.fc = nn.Linear(4 * 16 * 16, 5)

    def forward(self, x):
        return self.fc(self.up(self.conv(x).relu()).flatten(1))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_patched_model_matches_eager(cpp, compile_backend):
    torch.manual_seed(0)
    model = _Tiny()
    handle = sparse_sam.patch(model, 0.05, seed=0, backend="cpp")
    with torch.no_grad():  # a non-trivial patch: some deltas under the mask
        for layer in handle.layers.values():
            layer.delta.normal_()
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    compiled = torch.compile(model, backend=compile_backend)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    # Gradients flow to delta and scores through the compiled graph as in eager mode.
    grads = []
    for fn in (model, compiled):
        for layer in handle.layers.values():
            layer.delta.grad = layer.scores.grad = None
        fn(x).square().sum().backward()
        grads.append([(l.delta.grad.clone(), l.scores.grad.clone()) for l in handle.layers.values()])
    for (gd_e, gs_e), (gd_c, gs_c) in zip(*grads):
        torch.testing.assert_close(gd_c, gd_e)
        torch.testing.assert_close(gs_c, gs_e)
    sparse_sam.unpatch(model)
