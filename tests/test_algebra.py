"""The m × m algebra (mfac_optim/algebra.py) against float64 references: one factor update against a fresh Cholesky
of the next window's K, K⁻¹eᵢ against a dense solve over many wrap-arounds, and the drift check. Both forms of the
update run: the compiled CPU kernel and the device-generic panel form (what other devices use)."""
import pytest
import torch

from mfac_optim import algebra
from mfac_optim.algebra import PANEL_COLUMNS, GramSystem, chronological
from mfac_optim.kernels import cpu_passes


def compiled_update(factor, column, diagonal, filled):
    cpu_passes().factor_drop_oldest_append_newest(factor, column, float(diagonal), filled)


def panels_on_cuda(factor, column, diagonal, filled):
    on_device = factor.cuda()
    algebra._drop_oldest_append_newest_by_panels(on_device, column.cuda(), diagonal.cuda(), filled)
    factor.copy_(on_device)


UPDATES = {"compiled": compiled_update, "panels": algebra._drop_oldest_append_newest_by_panels,
           "panels on CUDA": panels_on_cuda}
FORMS = ["compiled", "panels",
         pytest.param("panels on CUDA", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]


def positive_definite(size: int, generator: torch.Generator) -> torch.Tensor:
    """mλI + GGᵀ for gradient-like rows whose norms span 100×, fewer columns than rows (so GGᵀ is singular)."""
    rows = torch.randn(size, size // 2 + 3, generator=generator, dtype=torch.float64)
    rows *= torch.logspace(-1, 1, size, dtype=torch.float64)[torch.randperm(size, generator=generator), None]
    return rows @ rows.T + 1e-3 * torch.eye(size, dtype=torch.float64)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [1, 2, 9, PANEL_COLUMNS + 2, 2 * PANEL_COLUMNS + 1])
def test_one_update_gives_the_factor_of_the_next_window(form, size):
    # Slots 0..size: the factor covers 0..size − 1; the update drops slot 0 and appends slot `size`.
    kernel = positive_definite(size + 1, torch.Generator().manual_seed(size))
    factor = torch.linalg.cholesky(kernel[:size, :size], upper=True).contiguous()
    UPDATES[form](factor, kernel[size, 1:size].clone(), kernel[size, size].clone(), size)
    expected = torch.linalg.cholesky(kernel[1:, 1:], upper=True)
    assert torch.equal(factor.tril(-1), torch.zeros_like(factor))
    assert (factor.diagonal() > 0).all()
    scale = kernel.abs().max()
    assert (factor.T @ factor - kernel[1:, 1:]).abs().max() <= 1e-14 * scale  # backward error: ε-sized
    assert (factor - expected).abs().max() <= 1e-9 * expected.abs().max()  # and the factor itself (cond ≈ 1e5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("filled", [1, 2, 7, PANEL_COLUMNS + 1])
def test_an_update_while_the_window_fills_touches_only_the_filled_slots(form, filled):
    # n positions oldest first: n − filled + 1 empty ones (K = mλ there), then the filled − 1 slots before this
    # step. The update drops an empty one and appends the newest: the factor of K without its first position.
    n, shift = PANEL_COLUMNS + 9, 1e-3
    generator = torch.Generator().manual_seed(filled)
    kernel = shift * torch.eye(n + 1, dtype=torch.float64)
    kernel[n + 1 - filled:, n + 1 - filled:] = positive_definite(filled, generator)
    factor = torch.linalg.cholesky(kernel[:n, :n], upper=True).contiguous()
    swept = factor.clone()
    UPDATES[form](factor, kernel[n, 1:n].clone(), kernel[n, n].clone(), filled)
    expected = torch.linalg.cholesky(kernel[1:, 1:], upper=True)
    assert torch.equal(factor[:n - filled, :], expected[:n - filled, :])  # √(mλ) I and zeros, untouched
    assert (factor - expected).abs().max() <= 1e-9 * expected.abs().max()
    if form == "compiled":  # the rows it skips are the ones a sweep over all n would copy onto themselves
        UPDATES[form](swept, kernel[n, 1:n].clone(), kernel[n, n].clone(), n)
        assert torch.equal(factor, swept)


def new_kernel(num_grads: int, damp: float) -> GramSystem:
    """A kernel as the optimizer makes it: Gram matrix zero, no factor yet (λ NaN)."""
    return GramSystem.allocate(num_grads, damp, {}, torch.device("cpu"))


def reference_solve(rows: torch.Tensor, slot: int, damp: float) -> torch.Tensor:
    m = rows.shape[0]
    kernel = rows @ rows.T + m * damp * torch.eye(m, dtype=torch.float64)
    return torch.linalg.solve(kernel, torch.eye(m, dtype=torch.float64)[slot])


def relative_residual(rows: torch.Tensor, slot: int, damp: float, solution: torch.Tensor) -> float:
    m = rows.shape[0]
    kernel = rows @ rows.T + m * damp * torch.eye(m, dtype=torch.float64)
    residual = kernel @ solution - torch.eye(m, dtype=torch.float64)[slot]
    return (residual.abs().max() / (kernel.diagonal().max() * solution.abs().max())).item()


SCALES = {  # each step's gradient norm: 100× apart across the run, within a wrap, or at random
    "falling": lambda step, steps, generator: 10.0 ** (1 - 2 * step / steps),
    "alternating wraps": lambda step, steps, generator: 10.0 ** (step // 16 % 2 * 2 - 1),
    "random": lambda step, steps, generator: 10.0 ** (2 * torch.rand(1, generator=generator).item() - 1),
}


def solves_over_eight_wraps(scales: str, dim: int) -> GramSystem:
    """Inserts 8 wraps of gradients (m = 16, λ = 1e-6) with norms 100× apart, each solve against a dense one."""
    m, damp, steps = 16, 1e-6, 8 * 16 + 5
    generator = torch.Generator().manual_seed(3)
    kernel, rows = new_kernel(m, damp), torch.zeros(m, dim, dtype=torch.float64)
    worst_direction = worst_residual = 0.0
    for step in range(steps):
        slot = step % m
        rows[slot] = SCALES[scales](step, steps, generator) * torch.randn(dim, generator=generator, dtype=torch.float64)
        solution = kernel.insert(slot, rows @ rows[slot], min(step + 1, m))
        expected = reference_solve(rows, slot, damp)
        # The direction m · Gᵀy is what the step uses; y itself is ill-determined along null directions of Gᵀ.
        error = (rows.T @ (solution - expected)).norm() / (rows.T @ expected).norm()
        worst_direction = max(worst_direction, error.item())
        worst_residual = max(worst_residual, relative_residual(rows, slot, damp, solution))
    assert worst_residual < 1e-14, worst_residual
    assert worst_direction < (1e-10 if dim > m else 1e-4), worst_direction
    return kernel


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("dim", [400, 10])  # d ≫ m, and d < m: a rank-deficient window, K's smallest eigenvalue mλ
def test_solves_equal_a_dense_solve_over_eight_wraps_without_refactoring(update_form, scales, dim):
    kernel = solves_over_eight_wraps(scales, dim)
    assert int(kernel.refactorizations) == 1  # made at the first step, then only updated


@pytest.mark.parametrize("dim", [400, 10])
def test_refactoring_every_step_as_on_a_gpu_equals_a_dense_solve(monkeypatch, dim):
    monkeypatch.setattr(algebra, "refactors_every_step", lambda device: True)
    kernel = solves_over_eight_wraps("random", dim)
    assert int(kernel.refactorizations) == 8 * 16 + 5


def test_the_first_insert_and_a_new_damp_make_the_factor_from_the_gram_matrix(update_form):
    m, generator = 8, torch.Generator().manual_seed(4)
    kernel, rows = new_kernel(m, 1e-3), torch.zeros(m, 50, dtype=torch.float64)
    for slot in range(m):
        rows[slot] = torch.randn(50, generator=generator, dtype=torch.float64)
        kernel.insert(slot, rows @ rows[slot], slot + 1)
    assert int(kernel.refactorizations) == 1
    kernel.damp = 1e-5  # as when a param group's damp is changed between steps
    rows[0] = torch.randn(50, generator=generator, dtype=torch.float64)
    solution = kernel.insert(0, rows @ rows[0], m)
    assert int(kernel.refactorizations) == 2 and float(kernel.factor_damp) == 1e-5
    assert torch.allclose(solution, reference_solve(rows, 0, 1e-5), rtol=1e-10, atol=0)


@pytest.mark.parametrize("damage", ["perturbed", "nan"])
def test_a_damaged_factor_is_caught_by_the_residual_and_remade(update_form, damage):
    m, generator = 12, torch.Generator().manual_seed(5)
    kernel, rows = new_kernel(m, 1e-6), torch.zeros(m, 80, dtype=torch.float64)
    for step in range(2 * m):
        rows[step % m] = torch.randn(80, generator=generator, dtype=torch.float64)
        kernel.insert(step % m, rows @ rows[step % m], min(step + 1, m))
    if damage == "perturbed":  # a factor 1e-6 off: as if rounding had drifted far
        kernel.factor[3:, 3:] *= 1 + 1e-6 * torch.rand(m - 3, m - 3, generator=generator, dtype=torch.float64)
    else:
        kernel.factor[5, 7] = float("nan")
    slot = (2 * m) % m
    rows[slot] = torch.randn(80, generator=generator, dtype=torch.float64)
    solution = kernel.insert(slot, rows @ rows[slot], m)
    assert int(kernel.refactorizations) == 2
    assert relative_residual(rows, slot, 1e-6, solution) < 1e-14
    remade = torch.linalg.cholesky(chronological(rows @ rows.T, slot, dims=(0, 1))
                                   + m * 1e-6 * torch.eye(m, dtype=torch.float64), upper=True)
    assert torch.allclose(kernel.factor, remade, rtol=1e-10, atol=1e-12)
