"""Shared test helpers: raw-bit comparisons, small models, backend parametrisation."""
from __future__ import annotations

import os

import torch

# Without a GPU the Triton backend runs CPU tensors through the interpreter; triton reads this when
# kernels are defined, so it must be set before anything imports sparse_sam.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch.nn as nn

from sparse_sam import backends
from sparse_sam.reference import bits_view
from sam_test_models import PaperAutoEncoder


def raw_bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, for bit-exact comparisons (NaN payloads, -0.0 and denormals included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


def state_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: raw_bits(v) for k, v in model.state_dict().items()}


def assert_same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b), f"state_dict keys differ: {set(a) ^ set(b)}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"tensors not bit-identical: {bad}"


def backend_params(op: str, device_type: str = "cpu"):
    """pytest params for every backend, skipped with the registry's reason where it cannot run."""
    out = []
    for name in backends.BACKENDS:
        if name == "cuda" and device_type != "cuda":
            continue  # never serves CPU tensors; listing it would only add noise
        ok, why = backends.available(name, device_type, op)
        out.append(pytest.param(name, id=name, marks=() if ok else pytest.mark.skip(reason=f"{name}: {why}")))
    return out


def _backend_or_skip(name: str, device_type: str):
    ok, why = backends.available(name, device_type, "topk_mask")
    if not ok:
        pytest.skip(f"{name} backend unavailable: {why}")
    return backends.get(name)


@pytest.fixture(scope="session")
def cpp():
    """The compiled CPU backend; tests that use it skip with the registry's reason when it is missing."""
    return _backend_or_skip("cpp", "cpu")


@pytest.fixture(scope="session")
def cuda_backend():
    """The compiled CUDA backend; skips with the registry's reason without a GPU or a CUDA build."""
    return _backend_or_skip("cuda", "cuda")


@pytest.fixture
def paper_ae():
    torch.manual_seed(0)
    return PaperAutoEncoder()


__all__ = ["raw_bits", "state_bits", "assert_same_bits", "backend_params", "PaperAutoEncoder", "bits_view"]
