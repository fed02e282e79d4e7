"""The gradient window: a ring buffer of m gradients in its storage kinds (a dense part and row-sparse parts), with
the m × m system over them. `insert_and_precondition` stores the new gradient ĝ as slot i and returns F⁻¹ĝ =
m · Gᵀ K⁻¹ eᵢ for the columns this process keeps. It works on the tensors it is handed: the optimizer keeps
them in its state.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .algebra import GramSystem
from .storage import DenseRows, RowSparseRows


class GradientWindow:
    def __init__(self, dense: DenseRows, sparse: dict[int, RowSparseRows], system: GramSystem,
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.dense = dense
        self.sparse = sparse  # parameter index -> its row-sparse part
        self.system = system
        # When the columns are sharded across processes: adds up each process's partial dot products, so that
        # every process holds the same Gram matrix and coefficients.
        self.sum_shards = sum_shards

    @property
    def num_grads(self) -> int:
        return self.system.num_grads

    def insert_and_precondition(self, dense_grad: Tensor, sparse_grads: dict[int, tuple[Tensor, Tensor]], slot: int
                                ) -> tuple[Tensor, dict[int, Tensor]]:
        """Stores the gradient in slot `slot` and returns F⁻¹ĝ in fp32 (dense part, and each row-sparse matrix),
        where ĝ is the stored (possibly rounded) gradient. `sparse_grads` maps a parameter index to its gradient
        matrix and the indices of its non-zero rows."""
        self.dense.store(slot, dense_grad)
        for index, (grad, rows) in sparse_grads.items():
            self.sparse[index].store(slot, grad, rows)
        dots = self.dense.dots(slot) + sum((part.dots(slot) for part in self.sparse.values()),
                                           torch.zeros_like(self.system.gram[0]))
        if self.sum_shards is not None:
            dots = self.sum_shards(dots)
        coefficients = self.num_grads * self.system.insert(slot, dots)
        return self.dense.combine(coefficients), {index: part.combine(coefficients) for index, part in self.sparse.items()}
