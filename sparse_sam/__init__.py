"""sparse_sam: zero-forget domain adaptation with sparse additive weight modifications.

A pre-trained model adapts through ``W* + m ⊙ v`` with a learned top-k mask ``m`` per weight; the
modification exports as a tiny patch that switches on and off in place, bit-exactly::

    handle = sparse_sam.patch(model, sparsity=0.01)
    opt = torch.optim.Adam(handle.param_groups(lr_scores=1.0, lr_delta=1e-3))
    ...  # train on local data
    patch = handle.export(); sparse_sam.unpatch(model)   # model is bit-identical to before
    with patch.applied(model): ...                        # adapted model
"""
from . import backends, ops, reference
from .budget import layer_budgets
from .modules import PatchedWeight, SAMConv2d, SAMConvTranspose2d, SAMLayer, SAMLinear
from .patchfile import PatchFileError, PatchMismatchError, SparsePatch, applied_patch, load_patch, switch
from .patching import SAMConfig, SAMHandle, patch, patched, resume, unpatch
from .server import PatchServer

__version__ = "0.2.0"

__all__ = [
    "patch", "unpatch", "patched", "resume", "SAMConfig", "SAMHandle", "SparsePatch", "load_patch", "switch",
    "applied_patch", "PatchServer", "layer_budgets", "PatchFileError", "PatchMismatchError", "PatchedWeight", "SAMLayer",
    "SAMConv2d", "SAMConvTranspose2d", "SAMLinear", "backends", "ops", "reference", "__version__",
]
