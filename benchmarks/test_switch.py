"""Switching a loaded patch on and off (apply + remove) vs the plain per-weight index loop, on a ViT.

The full-size comparison with its table is ``python benchmarks/switching.py``.
"""
import pytest

from conftest import SMALL, run
from switching import make_patch, plain_loop, vit


@pytest.fixture(scope="module")
def model_and_patch():
    pytest.importorskip("transformers")
    model = vit(hidden=48, layers=2, image=32) if SMALL else vit()
    return model, make_patch(model)


@pytest.mark.parametrize("provider", ["pytorch", "sparse_sam"])
def test_switch_apply_remove(benchmark, provider, model_and_patch):
    model, patch = model_and_patch
    if provider == "pytorch":
        apply, remove = plain_loop(model, patch, "index_copy")
        fn = lambda: (apply(), remove())  # noqa: E731
    else:
        patch.apply(model)  # first apply prepares (hash, values); switching is what is timed
        patch.remove(model)
        fn = lambda: (patch.apply(model), patch.remove(model))  # noqa: E731
    run(benchmark, fn, entries=patch.num_modified)
