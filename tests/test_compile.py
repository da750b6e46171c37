"""The compiled ops under torch.compile: fake kernels, schemas, and a patched model's forward."""
import pytest
import torch

import sparse_sam
from sam_test_models import TinyConvNet


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


def _patched_tiny(seed=0):
    torch.manual_seed(seed)
    model = TinyConvNet()
    handle = sparse_sam.patch(model, 0.05, seed=seed, backend="cpp")
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.delta.normal_()
    return model, handle


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compiled_patched_model_matches_eager(cpp, compile_backend):
    model, handle = _patched_tiny()  # a non-trivial patch: some deltas under the mask
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


def test_patched_forward_compiles_without_graph_breaks(cpp):
    """The whole patched forward is one graph: nothing in the SAM layers forces dynamo back to Python."""
    model, handle = _patched_tiny()
    x = torch.randn(2, 3, 8, 8)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
    sparse_sam.unpatch(model)


def test_compiled_model_sees_masks_updated_by_optimiser_steps(cpp):
    """A compiled forward cannot check the scores itself: the handle refreshes masks after each step."""
    model, handle = _patched_tiny(seed=1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(handle.param_groups(lr_scores=50.0, lr_delta=0.1))
    x = torch.randn(2, 3, 8, 8)
    before = [layer.mask.clone() for layer in handle.layers.values()]
    for _ in range(2):
        opt.zero_grad()
        compiled(x).square().sum().backward()
        opt.step()
    # The step hook has already brought every mask up to date with the new scores ...
    masks = [layer.mask.clone() for layer in handle.layers.values()]
    assert any(not torch.equal(a, b) for a, b in zip(before, masks)), "the scores step flipped no mask entry"
    fresh = sparse_sam.ops.topk_mask([l.scores for l in handle.layers.values()], [l.k for l in handle.layers.values()])
    assert all(torch.equal(a, b) for a, b in zip(masks, fresh))
    # ... so the compiled forward (no version checks inside) equals eager.
    torch.testing.assert_close(compiled(x), model(x))
    sparse_sam.unpatch(model)


def test_step_hook_goes_with_the_handle(cpp):
    """The optimiser step hook fires while patched and is gone after unpatch or once the handle dies."""
    import gc

    model, handle = _patched_tiny()
    calls = []
    handle.refresh_stale_masks = lambda: calls.append(1)
    other = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([other], lr=0.1)
    other.grad = torch.ones(3)
    opt.step()
    assert calls == [1]
    hook = handle._step_hook
    sparse_sam.unpatch(model)
    opt.step()
    assert calls == [1] and hook.id not in hook.hooks_dict_ref()
    model2, handle2 = _patched_tiny()
    hook2 = handle2._step_hook
    assert hook2.id in hook2.hooks_dict_ref()
    del model2, handle2  # a patched model thrown away without unpatch
    gc.collect()
    assert hook2.id not in hook2.hooks_dict_ref()
