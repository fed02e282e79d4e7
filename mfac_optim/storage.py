"""The window's storage kinds. Each holds its slots' values for some of the columns and answers the two passes
of a step: the dot products of every slot with the newly stored one, and the combination Σⱼ cⱼ · slotⱼ. Kinds:

- `DenseRows`: slot j is row j of an (m, n) tensor over the dense blocks' columns;
- `CompressedRows` (compressed.py): top-k entries per block of every slot, with error feedback;
- `RowSparseRows`: one matrix parameter whose gradients are zero outside a few rows (a word embedding), stored as
  (row indices, row values) per slot.

Every kind has the methods of `window.StorageKind`, and reports its memory: `bound_bytes(...)` before any gradient
exists (memory.py adds them up), `memory_bytes()` of what it holds. Sums of one block are accumulated in fp32 and
the blocks summed in float64, which bounds the rounding error by the block length rather than by d.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import Tensor

from .kernels import fused_passes_for, triton_passes_for
from .layout import nonzero_rows, row_sparse_pays

# Columns per block in the torch (unfused) passes.
BLOCK_COLUMNS = 1 << 16


class DenseRows:
    """The dense part of the window: row j holds the stored gradient j restricted to the dense parameters."""

    def __init__(self, window: Tensor, accumulate_dtype: torch.dtype) -> None:
        self.window = window  # (m, n), storage dtype
        self.accumulate_dtype = accumulate_dtype
        self._block_buffer: Optional[Tensor] = None
        self._direction_buffer: Optional[Tensor] = None
        self._compiled = fused_passes_for(window, accumulate_dtype) or triton_passes_for(window, accumulate_dtype)

    @classmethod
    def allocate(cls, num_grads: int, columns: int, dtype: torch.dtype, accumulate_dtype: torch.dtype,
                 device: torch.device) -> DenseRows:
        return cls(torch.zeros(num_grads, columns, dtype=dtype, device=device), accumulate_dtype)

    @classmethod
    def from_state(cls, saved: dict[str, Tensor], accumulate_dtype: torch.dtype) -> DenseRows:
        return cls(saved["window"], accumulate_dtype)

    @staticmethod
    def saved_in(state: dict[str, Tensor]) -> bool:
        return "window" in state

    @property
    def dtype(self) -> torch.dtype:
        return self.window.dtype

    def covers(self, columns: int) -> bool:
        return self.window.shape[1] == columns

    def state(self) -> dict[str, Tensor]:
        return {"window": self.window}

    def to_dense(self) -> Tensor:
        return self.window

    @staticmethod
    def bound_bytes(num_grads: int, columns: int, element_size: int, accumulate_size: int) -> int:
        """The rows, the fused combine's fp32 result, and the unfused passes' block in the accumulation dtype."""
        return num_grads * columns * element_size + 4 * columns + num_grads * min(BLOCK_COLUMNS, columns) * accumulate_size

    def memory_bytes(self) -> int:
        return tensor_bytes(self.window, self._block_buffer, self._direction_buffer)

    def store(self, slot: int, grad: Tensor) -> bool:
        self.window[slot].copy_(grad)
        return True

    def dots(self, slot: int, filled: int) -> Tensor:
        """G ĝ in float64 over these columns for the first `filled` slots, ĝ = the stored row `slot` (first pass over
        the window: the filled rows only, a contiguous view)."""
        if self._compiled is not None:
            return self._compiled.window_dots(self.window[:filled], slot)
        stored = self.window[slot]
        dots = torch.zeros(filled, dtype=torch.float64, device=self.window.device)
        for columns, block in self._column_blocks(filled):
            dots += torch.mv(block, stored[columns].to(self.accumulate_dtype))
        return dots

    def combine(self, coefficients: Tensor) -> Tensor:
        """Gᵀ c over these columns, in the accumulation dtype, for c over the first len(c) slots (second pass over
        the window)."""
        filled = len(coefficients)
        if self._compiled is not None:
            if self._direction_buffer is None:
                self._direction_buffer = torch.empty(self.window.shape[1], dtype=torch.float32,
                                                     device=self.window.device)
            self._compiled.window_combine(self.window[:filled], coefficients.float(), self._direction_buffer)
            return self._direction_buffer
        result = torch.empty(self.window.shape[1], dtype=self.accumulate_dtype, device=self.window.device)
        coefficients = coefficients.to(self.accumulate_dtype)
        for columns, block in self._column_blocks(filled):
            result[columns] = torch.mv(block.t(), coefficients)
        return result

    def _column_blocks(self, filled: int) -> Iterator[tuple[slice, Tensor]]:
        """The first `filled` rows in blocks of columns, in the accumulation dtype. A block of another dtype is
        converted into one reused buffer: fresh allocations of this size cost more in page faults than the
        conversion."""
        for start in range(0, self.window.shape[1], BLOCK_COLUMNS):
            columns = slice(start, start + BLOCK_COLUMNS)
            block = self.window[:filled, columns]
            if block.dtype != self.accumulate_dtype:
                if self._block_buffer is None:
                    self._block_buffer = torch.empty(self.window.shape[0], min(BLOCK_COLUMNS, self.window.shape[1]),
                                                     dtype=self.accumulate_dtype, device=self.window.device)
                block = self._block_buffer[:filled, :block.shape[1]].copy_(block)
            yield columns, block


class RowSparseRows:
    """The window restricted to one matrix parameter whose gradients are zero outside a few rows (a word
    embedding: only the rows of the batch's tokens). Slot j keeps (row indices, row values), its rows increasing,
    padded to a common capacity with row 0 and zero values, which add nothing to any dot product or combination, so
    all stay exact.
    """

    # Slots per gather in the passes: bounds the temporary (slots × capacity × columns) fp32 block.
    SLOTS_PER_CHUNK = 64
    # A slot with more rows than the capacity grows it by at least this factor (5/4), so that a slowly rising
    # row count does not reallocate the window at every step.
    GROWTH_NUMERATOR, GROWTH_DENOMINATOR = 5, 4
    # The state entries of a part, saved under its parameter: (row indices, row values).
    KEYS = ("row_indices", "row_values")

    def __init__(self, indices: Tensor, values: Tensor, num_rows: int, accumulate_dtype: torch.dtype) -> None:
        self.indices = indices  # (m, capacity) int64
        self.values = values  # (m, capacity, columns), storage dtype
        self.num_rows = num_rows
        self.accumulate_dtype = accumulate_dtype
        # A rows × columns matrix in the accumulation dtype kept from step to step (a fresh one costs page faults at
        # every step on the CPU): the new slot made dense for the dots, then the combine's result, which is only
        # valid until the next dots.
        self._scratch: Optional[Tensor] = None
        self._compiled = fused_passes_for(values, accumulate_dtype) or triton_passes_for(values, accumulate_dtype)

    @classmethod
    def allocate(cls, num_grads: int, capacity: int, num_rows: int, columns: int, dtype: torch.dtype,
                 accumulate_dtype: torch.dtype, device: torch.device) -> RowSparseRows:
        """Empty slots of `capacity` rows each, of a num_rows × columns matrix."""
        return cls(*cls._slots(num_grads, capacity, columns, dtype, device), num_rows, accumulate_dtype)

    @classmethod
    def from_state(cls, saved: dict[str, Tensor], num_rows: int, accumulate_dtype: torch.dtype) -> RowSparseRows:
        return cls(saved[cls.KEYS[0]], saved[cls.KEYS[1]], num_rows, accumulate_dtype)

    @classmethod
    def saved_in(cls, state: dict[str, Tensor]) -> bool:
        return cls.KEYS[0] in state

    @classmethod
    def forget(cls, state: dict[str, Tensor]) -> None:
        """In place: a parameter's state without the entries of a row-sparse part (it moved to dense storage)."""
        for key in cls.KEYS:
            state.pop(key, None)

    @staticmethod
    def _slots(num_grads: int, capacity: int, columns: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        return (torch.zeros(num_grads, capacity, dtype=torch.int64, device=device),
                torch.zeros(num_grads, capacity, columns, dtype=dtype, device=device))

    @classmethod
    def bound_bytes(cls, num_grads: int, max_rows: int, rows: int, columns: int, element_size: int,
                    accumulate_size: int) -> int:
        """Slots of at most `max_rows` rows (the capacity grows by at most 5/4 past them), their int64 indices, and
        the scratch matrix."""
        return num_grads * cls.capacity_bound(max_rows, rows) * (columns * element_size + 8) + \
            rows * columns * accumulate_size

    @classmethod
    def capacity_bound(cls, max_rows: int, rows: int) -> int:
        return min(rows, -(-max_rows * cls.GROWTH_NUMERATOR // cls.GROWTH_DENOMINATOR))

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
        self.indices[slot].zero_()
        self.values[slot].zero_()
        self.indices[slot, :len(rows)] = rows
        self.values[slot, :len(rows)] = grad[rows]
        return True

    def _grow(self, needed: int) -> None:
        # Growth happens only when `needed` exceeds the capacity, so the capacity stays below 5/4 of the most rows
        # one gradient has touched (capacity_bound).
        capacity = min(self.num_rows, max(needed, self.indices.shape[1] * self.GROWTH_NUMERATOR // self.GROWTH_DENOMINATOR))
        indices, values = self._slots(self.indices.shape[0], capacity, self.values.shape[2], self.values.dtype,
                                      self.values.device)
        indices[:, :self.indices.shape[1]] = self.indices
        values[:, :self.values.shape[1]] = self.values
        self.indices, self.values = indices, values

    def dots(self, slot: int, filled: int) -> Tensor:
        """s_j = Σ over the rows of slot j of ⟨stored row, new gradient's row⟩, in float64, for the first `filled`
        slots."""
        new = self._scratch_matrix().zero_()
        new.index_add_(0, self.indices[slot], self.values[slot].to(self.accumulate_dtype))  # padding adds zeros
        if self._compiled is not None:
            return self._compiled.sparse_dots(self.indices[:filled], self.values[:filled], new)
        dots = torch.empty(filled, dtype=torch.float64, device=self.values.device)
        for chunk in slot_chunks(filled, self.SLOTS_PER_CHUNK):
            products = new[self.indices[chunk]] * self.values[chunk].to(self.accumulate_dtype)
            dots[chunk] = products.sum(dim=(1, 2), dtype=torch.float64)
        return dots

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σ_j c_j · (slot j scattered into a rows × columns matrix) over the first len(c) slots, in the
        accumulation dtype (fp32 or better), in a scratch buffer the next call overwrites."""
        filled = len(coefficients)
        if self._compiled is not None:  # they write every entry, in fp32 (their accumulation dtype)
            result = self._scratch_matrix()
            self._compiled.sparse_combine(self.indices[:filled], self.values[:filled], coefficients.float(), result)
            return result
        result = self._scratch_matrix().zero_()
        coefficients = coefficients.to(self.accumulate_dtype)
        with _adding_in_a_fixed_order(self.values.device):
            for chunk in slot_chunks(filled, self.SLOTS_PER_CHUNK):
                scaled = self.values[chunk].to(self.accumulate_dtype) * coefficients[chunk, None, None]
                result.index_add_(0, self.indices[chunk].reshape(-1), scaled.reshape(-1, self.values.shape[2]))
        return result

    def state(self) -> dict[str, Tensor]:
        return dict(zip(self.KEYS, (self.indices, self.values)))

    def _scratch_matrix(self) -> Tensor:
        if self._scratch is None:
            self._scratch = torch.empty(self.num_rows, self.values.shape[2], dtype=self.accumulate_dtype,
                                        device=self.values.device)
        return self._scratch

    @property
    def columns(self) -> int:
        return self.values.shape[2]

    def to_dense(self, out: Optional[Tensor] = None) -> Tensor:
        """The same window as dense rows (m × rows·columns), exactly; written into `out` (a view may do) if given."""
        if out is None:
            out = self.values.new_empty(self.indices.shape[0], self.num_rows * self.columns)
        dense = out.view(self.indices.shape[0], self.num_rows, self.columns).zero_()
        dense.scatter_add_(1, self.indices[:, :, None].expand_as(self.values), self.values)  # padding adds zeros
        return out

def slot_chunks(filled: int, per_chunk: int) -> Iterator[slice]:
    """The first `filled` slots in runs of at most `per_chunk`: what the torch passes take at a time."""
    for start in range(0, filled, per_chunk):
        yield slice(start, min(start + per_chunk, filled))


def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)


@contextmanager
def _adding_in_a_fixed_order(device: torch.device) -> Iterator[None]:
    """index_add_ on CUDA adds with float atomics, in no fixed order, unless deterministic algorithms are on: they
    are, for the combine (then restored), so that a resumed run repeats it bit for bit. Elsewhere it changes nothing.
    Only a GPU without Triton gets here, and slowly: this index_add_ sorts and serialises repeated rows (about 170 ms
    a step on bert-mini on an H100, against a few ms for the Triton combine)."""
    if device.type != "cuda":
        yield
        return
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
