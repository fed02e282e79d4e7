"""The m × m algebra of a step: the Gram matrix S = GGᵀ of the stored gradients (float64) and the solve of
K y = eᵢ with K = mλI + S, whose solution gives the direction u = m · Gᵀ y (see ../shared/DESIGN.md).

Each step replaces one slot, so S changes in one row and column; the solve refactors K (a float64 Cholesky,
O(m³/3)), which is small next to the window passes while d ≫ m.
"""
from __future__ import annotations

import torch
from torch import Tensor


def accumulate_dtype(num_grads: int, dim: int) -> torch.dtype:
    """The dtype of the window passes' sums. When d is not far above m, the window is (nearly) rank-deficient:
    σ_min(G) ∝ √d − √m for gradient-like data, and exactly 0 once d < m. Then y = K⁻¹eᵢ has components of size up
    to 1/(mλ) along (near-)null directions of Gᵀ, which must cancel in Gᵀy, and fp32 passes lose up to three digits
    at λ = 1e-6. Such a window holds at most 4m² numbers, so float64 passes cost less than the Cholesky."""
    return torch.float64 if dim < 4 * num_grads else torch.float32


class FisherKernel:
    """K = mλI + S over the Gram matrix `gram` (a state tensor, updated in place)."""

    def __init__(self, gram: Tensor, damp: float) -> None:
        self.gram = gram
        self.damp = damp

    @property
    def num_grads(self) -> int:
        return self.gram.shape[0]

    def replace_slot(self, slot: int, dots: Tensor) -> None:
        """Row and column `slot` of S become the new gradient's dot products with every stored one."""
        self.gram[slot, :] = dots
        self.gram[:, slot] = dots

    def inverse_column(self, slot: int) -> Tensor:
        """y = K⁻¹ eᵢ, by a float64 Cholesky factorisation of K."""
        kernel = self.gram.clone()
        kernel.diagonal().add_(self.num_grads * self.damp)
        unit = torch.zeros(self.num_grads, 1, dtype=torch.float64, device=self.gram.device)
        unit[slot] = 1.0
        return torch.cholesky_solve(unit, torch.linalg.cholesky(kernel)).squeeze(1)
