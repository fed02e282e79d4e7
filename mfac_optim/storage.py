"""The window's storage kinds. Each holds its slots' values for some of the columns and answers the two passes
of a step: the dot products of every slot with the newly stored one, and the combination Σⱼ cⱼ · slotⱼ. Kinds:

- `DenseRows`: slot j is row j of an (m, n) tensor over the dense blocks' columns;
- `CompressedRows` (compressed.py): top-k entries per block of every slot, with error feedback;
- `RowSparseRows`: one matrix parameter whose gradients are zero outside a few rows (a word embedding), stored as
  (row indices, row values) per slot.

A part keeps no tensor of its own: its entries live in the optimizer's state dict it is handed (the window's under
the first parameter, a row-sparse part's under its parameter), which it reads at every pass and into which it
writes a tensor it replaces. Every kind answers the same class methods, from a `PartPlan` (what it is made for):
`allocate` (empty, into a state dict), `from_state` (over saved entries, shared through `StoredPart`) and
`bound_bytes` (its memory before any gradient exists: memory.py adds up the plans' bounds). The passes are the
window's backend's (kernels.passes_for), picked once per window.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import huge_pages
from .kernels.torch_passes import BLOCK_COLUMNS
from .layout import nonzero_rows, row_sparse_pays


@dataclass(frozen=True)
class PartPlan:
    """What a storage part is made for: its kind, m, its columns (per row of a row-sparse matrix), the storage and
    accumulation dtypes; a row-sparse part's matrix rows and stored rows per slot (a bound of them, for the memory
    bound), a compressed one's density."""

    kind: type
    num_grads: int
    columns: int
    dtype: torch.dtype
    accumulate_dtype: torch.dtype
    rows: int = 0
    capacity: int = 0
    density: float = 1.0

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def accumulate_size(self) -> int:
        return self.accumulate_dtype.itemsize


class StateEntry:
    """A part's tensor, read at each use from the state dict the part was handed (its `_state`), the tensor's only
    owner: `indices = StateEntry("row_indices")`."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, part: object, owner: type = None) -> Tensor:
        return self if part is None else part._state[self.key]


class StoredPart:
    """What the storage kinds share: their entries are `KEYS` of the state dict a part is handed (its `_state`); the
    first key marks a saved part of the kind. A kind's `__init__(state, plan, passes)` only reads what is there."""

    KEYS: tuple[str, ...] = ()
    _state: dict[str, Tensor]

    @classmethod
    def from_state(cls, plan: PartPlan, state: dict[str, Tensor], passes) -> StoredPart:
        return cls(state, plan, passes)

    @classmethod
    def saved_in(cls, state: dict[str, Tensor]) -> bool:
        return cls.KEYS[0] in state

    def saved(self) -> dict[str, Tensor]:
        return {key: self._state[key] for key in self.KEYS}


class DenseRows(StoredPart):
    """The dense part of the window: row j holds the stored gradient j restricted to the dense parameters."""

    KEYS = ("window",)

    def __init__(self, state: dict[str, Tensor], plan: PartPlan, passes) -> None:
        self._state = state  # the window's state dict, where "window" is the (m, n) rows in the storage dtype
        self.accumulate_dtype = plan.accumulate_dtype
        self._passes = passes
        self._direction: Optional[Tensor] = None  # the combine's result, reused (page faults otherwise)

    @classmethod
    def allocate(cls, plan: PartPlan, state: dict[str, Tensor], device: torch.device, passes) -> DenseRows:
        state["window"] = huge_pages.zeros((plan.num_grads, plan.columns), dtype=plan.dtype, device=device)
        return cls(state, plan, passes)

    @staticmethod
    def bound_bytes(plan: PartPlan) -> int:
        """The rows, the combine's result, and the torch passes' block in the accumulation dtype."""
        return plan.columns * (plan.num_grads * plan.element_size + plan.accumulate_size) + \
            plan.num_grads * min(BLOCK_COLUMNS, plan.columns) * plan.accumulate_size

    window = StateEntry("window")

    def replace(self, window: Tensor) -> None:
        """The rows become `window` (wider: a part moved in, or parameters joined)."""
        self._state["window"] = window
        self._direction = None

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def covers(self, columns: int) -> bool:
        return self.window.shape[1] == columns

    def to_dense(self) -> Tensor:
        return self.window

    def memory_bytes(self) -> int:
        return tensor_bytes(self.window, self._direction)

    def store(self, slot: int, grad: Tensor) -> bool:
        self.window[slot].copy_(grad)
        return True

    def dots(self, slot: int, filled: int) -> Tensor:
        """G ĝ in float64 over these columns for the first `filled` slots, ĝ = the stored row `slot` (first pass over
        the window: the filled rows only, a contiguous view)."""
        return self._passes.window_dots(self.window[:filled], slot)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Gᵀ c over these columns, in the accumulation dtype, for c over the first len(c) slots (second pass over
        the window), in a buffer the next call overwrites."""
        if self._direction is None:
            self._direction = torch.empty(self.window.shape[1], dtype=self.accumulate_dtype, device=self.window.device)
        self._passes.window_combine(self.window[:len(coefficients)], coefficients.to(self.accumulate_dtype),
                                    self._direction)
        return self._direction


class RowSparseRows(StoredPart):
    """The window restricted to one matrix parameter whose gradients are zero outside a few rows (a word
    embedding: only the rows of the batch's tokens). Slot j keeps (row indices, row values), its rows increasing,
    padded to a common capacity with row 0 and zero values, which add nothing to any dot product or combination, so
    all stay exact.
    """

    # A slot with more rows than the capacity grows it by at least this factor (5/4), so that a slowly rising
    # row count does not reallocate the window at every step.
    GROWTH_NUMERATOR, GROWTH_DENOMINATOR = 5, 4
    # The state entries of a part, saved under its parameter: (row indices, row values).
    KEYS = ("row_indices", "row_values")

    def __init__(self, state: dict[str, Tensor], plan: PartPlan, passes) -> None:
        self._state = state  # the parameter's state dict: (m, capacity) int64 indices, (m, capacity, columns) values
        self.num_rows = plan.rows
        self.accumulate_dtype = plan.accumulate_dtype
        self._passes = passes
        # A rows × columns matrix in the accumulation dtype kept from step to step (a fresh one costs page faults at
        # every step on the CPU): the new slot made dense for the dots, then the combine's result, which is only
        # valid until the next dots.
        self._scratch: Optional[Tensor] = None

    @classmethod
    def allocate(cls, plan: PartPlan, state: dict[str, Tensor], device: torch.device, passes) -> RowSparseRows:
        """Empty slots of `plan.capacity` rows each, of a rows × columns matrix."""
        state.update(zip(cls.KEYS, cls._slots(plan.num_grads, plan.capacity, plan.columns, plan.dtype, device)))
        return cls(state, plan, passes)

    @staticmethod
    def _slots(num_grads: int, capacity: int, columns: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        return (torch.zeros(num_grads, capacity, dtype=torch.int64, device=device),
                huge_pages.zeros((num_grads, capacity, columns), dtype=dtype, device=device))

    @classmethod
    def bound_bytes(cls, plan: PartPlan) -> int:
        """Slots of at most `plan.capacity` rows (the capacity grows by at most 5/4 past them), their int64 indices,
        and the scratch matrix."""
        return plan.num_grads * cls.capacity_bound(plan.capacity, plan.rows) * (plan.columns * plan.element_size + 8) \
            + plan.rows * plan.columns * plan.accumulate_size

    @classmethod
    def capacity_bound(cls, max_rows: int, rows: int) -> int:
        return min(rows, -(-max_rows * cls.GROWTH_NUMERATOR // cls.GROWTH_DENOMINATOR))

    indices = StateEntry("row_indices")
    values = StateEntry("row_values")

    @property
    def columns(self) -> int:
        return self.values.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def forget(self) -> None:
        """Its entries leave the parameter's state (the part moved to dense storage)."""
        for key in self.KEYS:
            del self._state[key]

    def memory_bytes(self) -> int:
        return tensor_bytes(self.indices, self.values, self._scratch)

    def store(self, slot: int, grad: Tensor) -> bool:
        """Stores the non-zero rows of `grad` (rows × columns), growing the capacity if needed; False, storing
        nothing, when they are so many that dense storage would take less room."""
        rows = nonzero_rows(grad)  # on a GPU, a host synchronisation: the row count sizes the storage
        if not row_sparse_pays(len(rows), self.num_rows, grad.shape[1], self.values.element_size()):
            return False
        if len(rows) > self.indices.shape[1]:
            self._grow(len(rows))
        indices, values = self.indices, self.values
        indices[slot].zero_()
        values[slot].zero_()
        indices[slot, :len(rows)] = rows
        values[slot, :len(rows)] = grad[rows]
        return True

    def _grow(self, needed: int) -> None:
        # Growth happens only when `needed` exceeds the capacity, so the capacity stays below 5/4 of the most rows
        # one gradient has touched (capacity_bound).
        old_indices, old_values = self.indices, self.values
        grown = old_indices.shape[1] * self.GROWTH_NUMERATOR // self.GROWTH_DENOMINATOR
        capacity = min(self.num_rows, max(needed, grown))
        indices, values = self._slots(old_indices.shape[0], capacity, self.columns, old_values.dtype, old_values.device)
        indices[:, :old_indices.shape[1]] = old_indices
        values[:, :old_values.shape[1]] = old_values
        self._state.update(zip(self.KEYS, (indices, values)))

    def dots(self, slot: int, filled: int) -> Tensor:
        """s_j = Σ over the rows of slot j of ⟨stored row, new gradient's row⟩, in float64, for the first `filled`
        slots."""
        indices, values = self.indices, self.values
        new = self._scratch_matrix().zero_()
        new.index_add_(0, indices[slot], values[slot].to(self.accumulate_dtype))  # padding adds zeros
        return self._passes.sparse_dots(indices[:filled], values[:filled], new)

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σ_j c_j · (slot j scattered into a rows × columns matrix) over the first len(c) slots, in the
        accumulation dtype, in a scratch buffer the next call overwrites."""
        filled, result = len(coefficients), self._scratch_matrix()
        self._passes.sparse_combine(self.indices[:filled], self.values[:filled], coefficients.to(self.accumulate_dtype),
                                    result)
        return result

    def _scratch_matrix(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.num_rows, self.columns, dtype=self.accumulate_dtype,
                                        device=self.values.device)
        return self._scratch

    def to_dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The same window as dense rows (m × rows·columns), exactly; written into `out` (a view may do) if given."""
        indices, values = self.indices, self.values
        if out is None:
            out = values.new_empty(indices.shape[0], self.num_rows * self.columns)
        dense = out.view(indices.shape[0], self.num_rows, self.columns).zero_()
        dense.scatter_add_(1, indices[:, :, None].expand_as(values), values)  # padding adds zeros
        return out


def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)
