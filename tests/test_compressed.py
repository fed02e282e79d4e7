"""The compressed window (top-k with error feedback) against float64 references written here from the method's
definition: what is stored, what the error buffer keeps, which entries are kept, and the step F⁻¹c."""
import io

import pytest
import torch

from mfac_optim import MFAC, memory_bound_bytes
from mfac_optim.compressed import BLOCK, CompressedRows, kept_of
from mfac_optim.kernels import cpu_passes
from mfac_optim.kernels.torch_passes import TorchPasses
from mfac_optim.storage import PartPlan
from mfac_optim.layout import Layout

TOLERANCE = 1e-4


class TwoParameters(torch.nn.Module):
    """A vector spanning three blocks and a bit, and a small matrix: 3 · 32768 + 100 + 350 coordinates."""

    def __init__(self):
        super().__init__()
        self.vector = torch.nn.Parameter(torch.randn(3 * BLOCK + 100))
        self.matrix = torch.nn.Parameter(torch.randn(50, 7))


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def set_gradients(model, generator, scales=(1.0, 1.0)):
    """Gradients whose entries vary in size (a heavy-tailed mix), so that top-k is a real choice."""
    for p, scale in zip(model.parameters(), scales):
        magnitude = torch.exp(2 * torch.randn(p.shape, generator=generator))
        p.grad = (scale * magnitude * torch.randn(p.shape, generator=generator)).to(p.dtype)


def make(density=0.01, num_grads=4, damp=1e-3, seed=0, weight_decay=0.01, dtype=torch.float32, **kwargs):
    """A float64 model lets a test read the direction from the parameters' change: an fp32 parameter would round
    away the smallest entries of lr · u."""
    torch.manual_seed(seed)
    model = TwoParameters().to(dtype)
    groups = [{"params": [model.vector], "weight_decay": 0.0},
              {"params": [model.matrix], "weight_decay": weight_decay, "lr": 5e-3, "momentum": 0.0}]
    return model, MFAC(groups, lr=1e-2, num_grads=num_grads, damp=damp, density=density, **kwargs)


def error_fed(optimizer, model) -> torch.Tensor:
    """a = e + g, formed in fp32 as the optimizer forms it (no weight decay here)."""
    state = optimizer.state[model.vector]
    gradient = flat([model.vector.grad, model.matrix.grad]).float()
    return (state["error"][:gradient.numel()] + gradient) if "error" in state else gradient


def test_stored_rows_are_the_kept_error_fed_entries_and_the_error_loses_nothing():
    model, optimizer = make(num_grads=8, grad_dtype="bfloat16", weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    total = 0
    for step in range(6):  # no wrap: the window holds every stored row
        set_gradients(model, generator)
        accumulated = error_fed(optimizer, model)
        total = total + flat([model.vector.grad, model.matrix.grad]).double()
        optimizer.step()
        row = optimizer.stored_gradients()[step]
        kept = row != 0
        # Stored: a rounded to bf16 on the support; zero elsewhere.
        assert torch.equal(row[kept], accumulated[kept].to(torch.bfloat16).float())
        accumulated = accumulated.double()
        # kept per block: the largest |a| (the padded tail of the last block holds zeros, never larger).
        padded = torch.zeros(4 * BLOCK, dtype=torch.float64)
        padded[:row.numel()] = accumulated
        mask = torch.zeros(4 * BLOCK, dtype=torch.bool)
        mask[:row.numel()] = kept
        for block in range(4):
            values, chosen = padded[block * BLOCK:(block + 1) * BLOCK].abs(), mask[block * BLOCK:(block + 1) * BLOCK]
            assert chosen.sum() <= kept_of(0.01, min(BLOCK, row.numel() - block * BLOCK))  # last block: 450 real
            assert values[chosen].min() >= values[~chosen].max()
    state = optimizer.state[model.vector]
    error = state["error"][:row.numel()].double()
    stored = optimizer.stored_gradients()[:6].double().sum(0)
    # Σ stored + e = Σ g, up to the fp32 rounding of each a = e + g.
    torch.testing.assert_close(stored + error, total, rtol=0, atol=1e-6 * total.abs().max().item())
    assert torch.all(state["error"][row.numel():] == 0)


def reference_direction(stored: torch.Tensor, slot: int, damp: float) -> torch.Tensor:
    """F⁻¹c for c = row `slot` of the stored rows C, F = λI + CᵀC/m, in float64. d is too large for a d × d solve,
    so through the m × m system: since c = Cᵀeᵢ, F⁻¹c = m · Cᵀ (mλI + CCᵀ)⁻¹ eᵢ (the form without cancellation)."""
    m = stored.shape[0]
    kernel = m * damp * torch.eye(m, dtype=torch.float64) + stored @ stored.T
    return m * stored.T @ torch.linalg.solve(kernel, torch.eye(m, dtype=torch.float64)[slot])


def fisher_residual(stored: torch.Tensor, slot: int, damp: float, direction: torch.Tensor) -> float:
    """‖F u − c‖ / ‖c‖, F applied without inverting anything: an independent check of the direction."""
    applied = damp * direction + stored.T @ (stored @ direction) / stored.shape[0]
    return ((applied - stored[slot]).norm() / stored[slot].norm()).item()


@pytest.mark.parametrize("grad_dtype,damp", [("float32", 1e-3), ("bfloat16", 1e-3), ("bfloat16", 1e-6)])
def test_updates_equal_a_dense_float64_solve_over_the_stored_rows_across_wraps(update_form, grad_dtype, damp):
    model, optimizer = make(num_grads=4, damp=damp, grad_dtype=grad_dtype, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    worst = 0.0
    for step in range(26):  # six wrap-arounds of 4 slots, gradient scales varying by 100×
        set_gradients(model, generator, scales=(10.0 ** (step % 3 - 1), 1.0))
        before = flat(model.parameters()).detach().double()
        optimizer.step()
        moved = (before - flat(model.parameters()).detach().double())
        lrs = torch.cat([torch.full((model.vector.numel(),), 1e-2), torch.full((model.matrix.numel(),), 5e-3)]).double()
        stored = optimizer.stored_gradients().double()
        expected = reference_direction(stored, step % 4, damp)
        error = ((moved / lrs - expected).norm() / expected.norm()).item()
        worst = max(worst, error, fisher_residual(stored, step % 4, damp, moved / lrs))
    assert worst < TOLERANCE, worst
    assert int(optimizer.state[model.vector]["refactorizations"]) == 1  # the m × m factor was only updated


def test_density_one_is_the_dense_optimizer_bit_for_bit():
    trajectories = []
    for density in (None, 1.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(200, 8), torch.nn.Flatten(), torch.nn.Linear(24, 2))
        optimizer = MFAC(model.parameters(), num_grads=3, **({} if density is None else {"density": density}))
        generator = torch.Generator().manual_seed(3)
        for _ in range(5):
            optimizer.zero_grad()
            model(torch.randint(0, 200, (4, 3), generator=generator)).square().sum().backward()
            optimizer.step()
        assert "window" in optimizer.state[model[0].weight] and "error" not in optimizer.state[model[0].weight]
        trajectories.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trajectories))


def test_state_dict_round_trip_nonfinite_skip_and_momentum():
    model, optimizer = make(num_grads=3, grad_dtype="bfloat16", momentum=0.5)
    generator = torch.Generator().manual_seed(4)
    for _ in range(4):
        set_gradients(model, generator)
        optimizer.step()
    error = optimizer.state[model.vector]["error"].clone()
    model.matrix.grad[0, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf"):
        optimizer.step()
    assert torch.equal(optimizer.state[model.vector]["error"], error)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed_model, resumed = make(num_grads=3, grad_dtype="bfloat16", momentum=0.5, seed=9)
    resumed_model.load_state_dict(saved["model"])
    resumed.load_state_dict(saved["optimizer"])
    assert resumed.state[resumed_model.vector]["compressed_offsets"].dtype == torch.int16
    for generator_seed in (5, 6, 7):
        for m, o in ((model, optimizer), (resumed_model, resumed)):
            set_gradients(m, torch.Generator().manual_seed(generator_seed))
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_passes_equal_the_torch_passes_and_float64(dtype, kernel_threads):
    generator = torch.Generator().manual_seed(5)
    blocks, m, kept, size = 3, 5, 40, 3 * BLOCK
    offsets = torch.stack([torch.randperm(BLOCK, generator=generator)[:kept].sort().values
                           for _ in range(blocks * m)]).view(blocks, m, kept)
    offsets[0, 0, -1] = BLOCK - 1  # the largest offset an int16 holds
    values = torch.randn(blocks, m, kept, generator=generator).to(dtype)
    assert cpu_passes() is not None, "the fused CPU kernels must build on the CI machine"
    saved = {"compressed_values": values, "compressed_offsets": offsets.to(torch.int16),
             "error": torch.zeros(blocks * BLOCK)}
    plan = PartPlan(CompressedRows, m, size, dtype, torch.float32, density=kept / BLOCK)
    part = CompressedRows.from_state(plan, saved, cpu_passes())
    dense = part.to_dense().double()
    assert dense[0, BLOCK - 1] == values[0, 0, -1].double()
    coefficients = torch.randn(m, dtype=torch.float64, generator=generator)
    passes = {}
    for form in ("fused", "unfused"):
        if form == "unfused":
            part = CompressedRows.from_state(plan, saved, TorchPasses(torch.float32))
        # Every slot, and the first 3 (a window still filling: its passes visit the filled slots only).
        passes[form] = [(filled, part.dots(2, filled), part.combine(coefficients[:filled]).clone()) for filled in (m, 3)]
    for filled, dots, combined in passes["fused"] + passes["unfused"]:
        torch.testing.assert_close(dots, dense[:filled] @ dense[2], rtol=1e-12, atol=1e-12)  # float64 sums
        torch.testing.assert_close(combined.double(), coefficients[:filled] @ dense[:filled], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_store_selects_and_feeds_back_as_the_torch_store(dtype, kernel_threads):
    size = 3 * BLOCK + 1000
    generator = torch.Generator().manual_seed(6)
    plan = PartPlan(CompressedRows, 4, size, dtype, torch.float32, density=0.01)
    assert cpu_passes() is not None
    fused = CompressedRows.allocate(plan, {}, torch.device("cpu"), cpu_passes())
    unfused = CompressedRows.allocate(plan, {}, torch.device("cpu"), TorchPasses(torch.float32))
    for slot in range(6):  # wraps once
        gradient = torch.randn(size, generator=generator) * torch.exp(2 * torch.randn(size, generator=generator))
        gradient[:5000] = 0  # a stretch where only the error feeds the selection
        # Blocks mostly zero, as word-embedding rows a batch did not touch: the second has fewer non-zero coordinates
        # than it keeps (its selection's threshold is 0), the third more (its sample is nearly all zero).
        gradient[BLOCK:2 * BLOCK - 100] = 0
        gradient[2 * BLOCK:3 * BLOCK][torch.rand(BLOCK, generator=generator) < 0.95] = 0
        fused.store(slot % 4, gradient)
        unfused.store(slot % 4, gradient)
        assert torch.equal(fused.to_dense(), unfused.to_dense()) and torch.equal(fused.error, unfused.error)


def kept_entries(size: int, density: float, fused: bool) -> int:
    """Entries one store keeps of a gradient without zeros over `size` coordinates."""
    plan = PartPlan(CompressedRows, 2, size, torch.float32, torch.float32, density=density)
    rows = CompressedRows.allocate(plan, {}, torch.device("cpu"), cpu_passes() if fused else TorchPasses(torch.float32))
    rows.store(0, torch.randn(size, generator=torch.Generator().manual_seed(size)) + 3.0)  # no zero entry
    return int((rows.to_dense()[0] != 0).sum())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("size", [1, 100, 2247, 32767, 32769, 3 * BLOCK + 450])
def test_density_is_the_fraction_kept_in_every_block_whatever_its_size(size, fused):
    density = 0.05
    full, last = divmod(size, BLOCK)
    expected = full * kept_of(density, BLOCK) + (kept_of(density, last) if last else 0)
    assert kept_entries(size, density, fused) == expected  # by hand: 1 → 1, 100 → 5, 2247 → 113, 32769 → 1639 + 1
    if density * size >= 1:
        assert 0.5 <= expected / (density * size) <= 2


def test_density_holds_for_each_shard_of_a_split_window():
    density, shapes = 0.05, (torch.Size([2247]),)
    for rank in range(3):  # 749 coordinates each
        local = Layout(shapes, rank=rank, world_size=3).local_size
        assert local == 749 and kept_entries(local, density, fused=True) == kept_of(density, 749) == 38


def test_memory_bound_follows_the_kept_entries_of_a_small_window():
    # 100 coordinates: 5 entries a slot at density 0.05 and 1 at 0.01 (a full block's share: 1,639 and 328).
    bounds = [memory_bound_bytes([torch.Size([100])], {}, 4, "bfloat16", density=density) for density in (0.05, 0.01)]
    assert bounds[0] - bounds[1] == 4 * (5 - 1) * (2 + 2)  # m slots × the extra entries × (bf16 value + int16 offset)
