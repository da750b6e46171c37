"""One training step of the paper-shaped autoencoder at batch 128: dense fine-tuning vs a ZFDA step.

The ratio sam / dense is the overhead of adapting through a sparse patch instead of all weights.
``dense`` trains the normalisation layers as plain fine-tuning does (batch statistics, running
statistics updated); ``dense_frozen_norm`` normalises with the running statistics as a ZFDA step does
(``norm="frozen"``), which isolates the cost of the SAM layers themselves.
"""
import pytest
import torch
import torch.nn.functional as F

import sparse_sam
from conftest import DEVICE, run, size
from sam_test_models import PaperAutoEncoder


@pytest.mark.parametrize("mode", ["dense", "dense_frozen_norm", "sam"])
def test_train_step(benchmark, mode):
    torch.manual_seed(0)
    model = PaperAutoEncoder(w=size(32, 4)).to(DEVICE)
    if mode == "sam":
        handle = sparse_sam.patch(model, 0.01, seed=0)
        params = handle.param_groups(lr_scores=1.0, lr_delta=1e-4)
    else:
        params = [{"params": list(model.parameters()), "lr": 1e-4}]
    opt = torch.optim.Adam(params)
    x = torch.rand(size(128, 4), 3, 32, 32, device=DEVICE)
    model.train()
    if mode == "dense_frozen_norm":
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()

    def step():
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    loss = run(benchmark, step, batch=x.shape[0], mode=mode)
    assert torch.isfinite(loss)
