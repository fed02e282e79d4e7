"""The m × m algebra of a step: the Gram matrix S = GGᵀ of the stored gradients (float64, in slot order) and the
solve of K y = eᵢ with K = mλI + S, whose solution gives the direction u = m · Gᵀ y (see docs/design.md).

The solve keeps an upper Cholesky factor R, RᵀR = K, with the slots in chronological order (oldest first). The slot
a step replaces is always the oldest, so the new factor is the old one without its first row and column (a positive
rank-1 update of the rest) plus a last row and column for the newest slot (one triangular solve): O(m²), where a
fresh factorisation costs O(m³/3). Then K⁻¹e_newest = R⁻¹(e_last / R_last,last) is one more triangular solve.
Rounding accumulates in an updated factor, and the gradients' scale can shrink far below the one it was built
at, so every solve's residual ‖Ky − eᵢ‖ is checked against S (O(m²)); when it is too large, the factor is
recomputed from S, as it is when λ changes or the state predates the factor.

That update runs on the CPU. On other devices the factor is made afresh from S at every step (`refactors_every_step`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import cpu_passes
from .storage import StateEntry

# A solve is accepted while ‖Ky − eᵢ‖∞ ≤ RESIDUAL_TOLERANCE · max(diag K) · ‖y‖∞. Updated factors stay near ε
# (below 1.5e-15 over 20 wraps with λ = 1e-6 and gradient norms varying 100×: the rank-1 updates are of principal
# blocks, so each column's rounding scales with its own slot's norm). The check is the net for what rounding has
# not shown: a factor several orders of magnitude off, or a NaN pivot.
RESIDUAL_TOLERANCE = 1e-10

# Columns per panel of the device-generic factor update: it launches a few kernels per panel, not per column.
PANEL_COLUMNS = 128


def accumulate_dtype(num_grads: int, dim: int, precision: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the window passes' sums: float64 for float64 parameters (`precision`), else fp32 unless d is
    not far above m. Then the window is (nearly) rank-deficient: σ_min(G) ∝ √d − √m for gradient-like data, and
    exactly 0 once d < m, so y = K⁻¹eᵢ has components of size up to 1/(mλ) along (near-)null directions of Gᵀ,
    which must cancel in Gᵀy, and fp32 passes lose up to three digits at λ = 1e-6. Such a window holds at most 4m²
    numbers, so float64 passes cost less than the m × m algebra."""
    return torch.float64 if precision == torch.float64 or dim < 4 * num_grads else torch.float32


def chronological(values: Tensor, newest: int, dims: tuple[int, ...] = (0,)) -> Tensor:
    """`values` indexed by slot, reordered oldest first: position p holds slot (newest + 1 + p) mod m."""
    return torch.roll(values, shifts=(-(newest + 1),) * len(dims), dims=dims)


def by_slot(values: Tensor, newest: int) -> Tensor:
    """The inverse of `chronological` along dimension 0."""
    return torch.roll(values, shifts=newest + 1, dims=0)


def refactors_every_step(device: torch.device) -> bool:
    """Whether the factor is made from S at every step rather than updated. On a GPU a float64 Cholesky is one
    cuSOLVER call (H100: 0.6 ms at m = 1024, 9.0 ms at 8192), where the panel update launches a QR per panel and
    took 7.8 and 47 ms (scripts/bench_mfac.py --algebra). A fresh factor needs no residual check either."""
    return device.type != "cpu"


def drop_oldest_append_newest(factor: Tensor, column: Tensor, diagonal: Tensor, filled: int) -> None:
    """In place: R (upper, RᵀR = K over slots oldest first) becomes the factor of K without its first slot and with
    a new last one, whose entries of K are `column` (against the m − 1 kept slots, oldest first) and `diagonal`.
    `filled` slots hold gradients after it: while the window fills, the first slot is an empty one, and only the
    last `filled` rows and columns change (GramSystem.insert). A non-positive last pivot (only from a ruined
    factor) leaves NaN there, for the residual check to catch."""
    kernels = cpu_passes() if factor.device.type == "cpu" else None
    if kernels is not None:
        kernels.factor_drop_oldest_append_newest(factor, column, float(diagonal), filled)
    else:
        _drop_oldest_append_newest_by_panels(factor, column, diagonal, filled)


def _drop_oldest_append_newest_by_panels(factor: Tensor, column: Tensor, diagonal: Tensor, filled: int) -> None:
    """The device-generic form of the update, on the last `filled` rows and columns (the first of which is the
    slot that leaves). R without its first column is upper Hessenberg, and the R of its QR factorisation is the
    factor of K without the first slot; the QR goes by panels of columns, each a small Householder QR whose
    orthogonal factor is then applied to the panel's rows right of it as one matmul."""
    factor, column = factor[-filled:, -filled:], column[len(column) - (filled - 1):]
    n = factor.shape[0]
    hessenberg = factor[:, 1:]  # row k + 1 carries the rotated remainder of the oldest slot into the next panel
    for start in range(0, n - 1, PANEL_COLUMNS):
        stop = min(start + PANEL_COLUMNS, n - 1)
        rows = hessenberg[start:stop + 1]
        orthogonal, triangle = torch.linalg.qr(rows[:, start:stop], mode="complete")
        signs = torch.where(triangle.diagonal() < 0, -1.0, 1.0).to(factor.dtype)  # the factor's positive diagonal
        rotation = orthogonal.T
        rotation[:stop - start] *= signs[:, None]
        rows[:, stop:] = rotation @ rows[:, stop:]
        rows[:, start:stop] = 0
        rows[:stop - start, start:stop] = triangle[:stop - start] * signs[:, None]
    kept = hessenberg[:n - 1].clone()
    newest = torch.linalg.solve_triangular(kept.T, column.reshape(-1, 1).to(factor.dtype), upper=False).squeeze(1)
    factor.zero_()
    factor[:n - 1, :n - 1] = kept
    factor[:n - 1, n - 1] = newest
    factor[n - 1, n - 1] = torch.sqrt(diagonal - newest @ newest)


class GramSystem:
    """K = mλI + S over the Gram matrix "gram" and its factor "factor", with their bookkeeping: "factor_damp", the
    λ the factor was made for (NaN: no factor yet), and "refactorizations", how often it was made from S. All are
    entries of the window's state dict it is handed, updated in place, so that a resumed run continues bit for
    bit."""

    KEYS = ("gram", "factor", "factor_damp", "refactorizations")
    # The entries the host reads at every step: kept on the CPU, as torch.optim keeps "step".
    HOST_KEYS = ("factor_damp", "refactorizations")

    def __init__(self, state: dict[str, Tensor], damp: float) -> None:
        self._state = state
        self.damp = damp

    @classmethod
    def allocate(cls, num_grads: int, damp: float, state: dict[str, Tensor], device: torch.device) -> GramSystem:
        """The system of an empty window (S = 0), without a factor yet, into `state`."""
        state["gram"] = torch.zeros(num_grads, num_grads, dtype=torch.float64, device=device)
        state.update(cls.empty_factor(state["gram"]))
        return cls(state, damp)

    @staticmethod
    def saved_in(state: dict[str, Tensor]) -> bool:
        return "gram" in state

    @classmethod
    def upgrade_saved(cls, saved: dict[str, Tensor]) -> None:
        """In place: state saved before the Cholesky factor was kept gets an empty one (made from S at the next
        step)."""
        if "factor" not in saved:
            saved.update(cls.empty_factor(saved["gram"]))

    @staticmethod
    def empty_factor(gram: Tensor) -> dict[str, Tensor]:
        """A factor made for no λ (NaN): the next insert makes it from S, as when λ changes."""
        return {"factor": torch.zeros_like(gram), "factor_damp": torch.tensor(float("nan"), dtype=torch.float64),
                "refactorizations": torch.tensor(0, dtype=torch.int64)}

    gram = StateEntry("gram")
    factor = StateEntry("factor")
    factor_damp = StateEntry("factor_damp")
    refactorizations = StateEntry("refactorizations")

    def saved(self) -> dict[str, Tensor]:
        return {key: self._state[key] for key in self.KEYS}

    @staticmethod
    def bound_bytes(num_grads: int) -> int:
        """S and its factor (float64), and a refactorisation's K in chronological order and new factor."""
        return 4 * 8 * num_grads * num_grads

    @property
    def num_grads(self) -> int:
        return self.gram.shape[0]

    @property
    def shift(self) -> float:
        """mλ, the diagonal K adds to S."""
        return self.num_grads * self.damp

    def insert(self, slot: int, dots: Tensor, filled: int) -> Tensor:
        """Slot `slot`, the oldest, takes the new gradient, whose dot products with every stored one are `dots`;
        `filled` slots hold gradients now. Returns y = K⁻¹ e_slot, in slot order.

        Until the window is full, the filled slots are 0 … filled − 1 and the empty ones come first in
        chronological order: K is mλI on them and S + mλI on the filled ones, so the factor is √(mλ) I and then
        the filled slots' factor, y is zero on the empty slots, and every operation here covers the filled slots
        alone (the factor's empty rows are never touched)."""
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots
        if refactors_every_step(self.factor.device) or float(self.factor_damp) != self.damp:
            self._refactor(slot, filled)
            return self._solve(slot, filled)
        drop_oldest_append_newest(self.factor, chronological(dots, slot)[:-1], dots[slot] + self.shift, filled)
        solution = self._solve(slot, filled)
        if not self._accurate(solution, slot, filled):
            self._refactor(slot, filled)
            solution = self._solve(slot, filled)
        return solution

    def _solve(self, newest: int, filled: int) -> Tensor:
        # Rᵀz = e_last has z = e_last / R_last,last, as Rᵀ is lower triangular; over the filled slots' block.
        factor = self.factor[-filled:, -filled:]
        last = torch.zeros(filled, 1, dtype=factor.dtype, device=factor.device)
        last[-1] = 1.0
        solution = torch.zeros(self.num_grads, dtype=factor.dtype, device=factor.device)
        solution[-filled:] = torch.linalg.solve_triangular(factor, last / factor[-1, -1], upper=True).squeeze(1)
        return by_slot(solution, newest)

    def _accurate(self, solution: Tensor, slot: int, filled: int) -> bool:
        """Whether ‖Ky − e_slot‖∞ is within RESIDUAL_TOLERANCE of the scale ‖K‖‖y‖ (false for NaN), over the filled
        slots (y is zero on the others). On a GPU this is a host synchronisation the step needs: refactoring or
        not is a host decision."""
        gram, solution = self.gram[:filled, :filled], solution[:filled]
        residual = torch.mv(gram, solution).add_(solution, alpha=self.shift)
        residual[slot] -= 1.0
        scale = (gram.diagonal().max() + self.shift) * solution.abs().max()
        return bool(residual.abs().max() <= RESIDUAL_TOLERANCE * scale)

    def _refactor(self, newest: int, filled: int) -> None:
        system = chronological(self.gram, newest, dims=(0, 1))[-filled:, -filled:]
        system.diagonal().add_(self.shift)
        self.factor.zero_()
        self.factor.diagonal().fill_(math.sqrt(self.shift))
        # On a GPU, cholesky's check that K is positive definite is a host synchronisation: a failed factor must
        # stop the run, not turn into a silently wrong step.
        self.factor[-filled:, -filled:] = torch.linalg.cholesky(system, upper=True)
        self.factor_damp.fill_(self.damp)
        self.refactorizations.add_(1)
