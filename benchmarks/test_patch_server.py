"""PatchServer on a mixed batch vs one plain forward of the same samples (see server_table.py).

Cases: ``few`` (8 patches + base in the batch) and ``many`` (64 patches), baseline ``base_forward``;
``one`` (1 patch for the whole batch), baseline ``applied_forward``. ``grouped_apply`` is the
straightforward per-id apply → forward → remove. Compare each provider's time with the baseline of the
same case in the same run (``python benchmarks/server_table.py`` prints the ratios).
"""
import pytest
import torch

from conftest import run, size
from server_table import cases, make_model, providers

WIDTH, BATCH = size(32, 4), size(256, 24)
FEW, MANY = size(8, 2), size(64, 6)
CASE_IDS = ("few", "many", "one")


@pytest.fixture(scope="module")
def setup():
    if torch.cuda.is_available():
        pytest.skip("CPU table; the model and patches here live on the CPU")
    model = make_model(WIDTH)
    x = torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, x, dict(zip(CASE_IDS, cases(model, BATCH, FEW, MANY)))


@pytest.mark.parametrize("provider", ["baseline", "server", "grouped_apply"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_server(benchmark, setup, case, provider):
    model, x, all_cases = setup
    c = all_cases[case]
    fns = providers(model, c, x)
    fn = fns[{"baseline": c["baseline"], "server": "server", "grouped_apply": "grouped apply"}[provider]]
    with torch.no_grad():
        if provider == "server":  # what is timed must be exact: the grouped way, bit for bit
            assert torch.equal(fn().view(torch.int32), fns["grouped apply"]().view(torch.int32))
        run(benchmark, lambda: fn(), case=c["case"], baseline=c["baseline"], width=WIDTH, batch=BATCH)
