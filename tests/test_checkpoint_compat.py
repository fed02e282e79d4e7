"""Optimizer state written before mfac_optim became a package (commit 66979aa, one file) still resumes. That state has
no factor of the m × m system (it was refactored every step then): the first step makes it from the saved Gram
matrix, and the float64 solves agree with the old ones far below the fp32 parameters' resolution. On the machine
that wrote the fixture the continuation is bit for bit; another CPU or torch build orders float sums differently
(an H100 machine with torch 2.11 did), so the test allows fp32 rounding."""
import io
from pathlib import Path

import torch

from mfac_optim import MFAC
from test_mfac_optim import BagOfWords

FIXTURE = Path(__file__).parent / "fixtures" / "mfac_state_single_file.pt"


def make_optimizer(model: BagOfWords) -> MFAC:
    groups = [{"params": [model.hidden.weight, model.out.weight], "weight_decay": 0.01, "momentum": 0.5},
              {"params": [model.embedding.weight, model.hidden.bias, model.out.bias], "weight_decay": 0.0}]
    return MFAC(groups, lr=1e-2, num_grads=4, damp=1e-4, grad_dtype="bfloat16")


def train(model: BagOfWords, optimizer: MFAC, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        tokens, labels = torch.randint(0, 300, (8, 6), generator=generator), torch.randint(0, 2, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()


def write_fixture() -> None:
    """How the fixture was made (run once with the single-file mfac_optim.py): 6 steps (the window wraps), the
    state saved, then 3 more steps whose parameters the resumed optimizer must reproduce."""
    torch.manual_seed(0)
    model = BagOfWords(vocabulary=300, width=8, hidden=6)
    optimizer = make_optimizer(model)
    train(model, optimizer, 6, seed=1)
    snapshot = io.BytesIO()  # state_dict() holds references to tensors that later steps change in place
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, snapshot)
    saved = torch.load(io.BytesIO(snapshot.getvalue()), weights_only=True)
    train(model, optimizer, 3, seed=2)
    torch.save({**saved, "after_three_more_steps": model.state_dict()}, FIXTURE)


def test_state_from_the_single_file_optimizer_resumes_where_it_left_off():
    fixture = torch.load(FIXTURE, weights_only=True)
    model = BagOfWords(vocabulary=300, width=8, hidden=6)
    model.load_state_dict(fixture["model"])
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(fixture["optimizer"])
    train(model, optimizer, 3, seed=2)
    for name, expected in fixture["after_three_more_steps"].items():
        torch.testing.assert_close(model.state_dict()[name], expected, rtol=1e-6, atol=1e-7, msg=name)


def test_an_old_checkpoint_is_upgraded_when_loaded_not_at_the_next_step():
    fixture = torch.load(FIXTURE, weights_only=True)
    saved_group = fixture["optimizer"]["param_groups"][0]
    assert "density" not in saved_group and "factor" not in fixture["optimizer"]["state"][0]  # written before both
    model = BagOfWords(vocabulary=300, width=8, hidden=6)
    optimizer = make_optimizer(model)
    optimizer.load_state_dict(fixture["optimizer"])
    assert all(group["density"] == 1.0 and group["shard"] is False for group in optimizer.param_groups)
    shared = optimizer.state[optimizer.param_groups[0]["params"][0]]  # the window's state
    assert shared["factor"].shape == shared["gram"].shape and torch.isnan(shared["factor_damp"])
    assert int(shared["refactorizations"]) == 0  # the first step makes the factor from the Gram matrix
