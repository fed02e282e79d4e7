"""The gradient window and its life cycle: a ring buffer of m gradients held in storage parts of the kinds in
storage.py and compressed.py, with the m × m system over them (algebra.py). It is made once, from the first
gradient (`GradientWindow.allocate`) or from saved state (`GradientWindow.from_state`), and then owns its parts:
it picks which matrices are stored row-sparse, moves a part to dense storage when its rows stop paying, keeps its
scratch buffers, and gives back the tensors the optimizer saves (`state`). `insert_and_precondition` stores the new
gradient ĝ as slot i and returns F⁻¹ĝ = m · Gᵀ K⁻¹ eᵢ for the columns this process keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from .algebra import GramSystem, accumulate_dtype
from .compressed import CompressedRows, kept_per_block
from .hyperparameters import GRAD_DTYPES, WINDOW_KEYS, resolve_grad_dtype
from .layout import Block, Layout, nonzero_rows
from .phases import phase
from .storage import DenseRows, RowSparseRows


class StorageKind(Protocol):
    """What the window asks of each storage part. Every part covers some of the window's columns in every slot."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the slots are stored in."""

    def covers(self, columns: int) -> bool:
        """Whether the part is made for `columns` columns (a saved part, against the parameters it is loaded for)."""

    def memory_bytes(self) -> int:
        """The bytes the part holds: its state and its scratch buffers."""

    def store(self, slot: int, gradient: Tensor) -> bool:
        """Stores the part's columns of a gradient in slot `slot`; False (nothing stored) where the part cannot hold
        it well: a row-sparse part whose gradient has too many rows to pay."""

    def dots(self, slot: int, filled: int) -> Tensor:
        """⟨slot j, slot `slot`⟩ over the part's columns for each of the first `filled` slots j, in float64 (the
        others are empty: zero)."""

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σⱼ cⱼ · slot j over the part's columns and the first len(c) slots, in fp32 (a buffer the next call may
        overwrite)."""

    def to_dense(self) -> Tensor:
        """The stored slots as dense rows over the part's columns."""

    def state(self) -> dict[str, Tensor]:
        """The tensors the part owns, under the names the optimizer saves them by."""


@dataclass(frozen=True)
class WindowSettings:
    """What defines the one window shared by all param groups."""

    num_grads: int
    damp: float
    grad_dtype: str
    density: float
    shard: bool
    precision: torch.dtype = torch.float32  # of the algebra and the direction: float64 for float64 parameters

    @classmethod
    def of(cls, group: dict, precision: torch.dtype = torch.float32) -> WindowSettings:
        return cls(**{key: group[key] for key in WINDOW_KEYS}, precision=precision)

    @property
    def dtype(self) -> torch.dtype:
        return GRAD_DTYPES[self.grad_dtype]

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize


def window_makeup(layout: Layout, density: float, element_size: int, rows_used: Callable[[Block], int]) -> Layout:
    """The one place that decides what the window is made of, for a window being made (from its first gradient)
    and for the memory bound (from a bound of the rows a gradient uses): a compressed window covers every
    coordinate and has no row-sparse parts; a dense one keeps row-sparse each matrix block for which the
    `rows_used(block)` rows pay (layout.row_sparse_pays). A block no row of which is used (a gradient that is zero
    there: LoRA's A while B is still zero) says nothing about its rows, and stays dense."""
    if density < 1:
        return replace(layout, row_sparse=frozenset())
    return layout.with_row_sparse_where_it_pays(lambda block: rows_used(block) or block.rows, element_size)


class GradientWindow:
    """The window and its m × m system. It owns the names and places of its state: the optimizer saves what
    `save_into` writes, and asks `saved_in`, `HOST_KEYS` and `upgrade_saved` about it, without knowing the keys."""

    # Window entries the host reads at every step: kept on the CPU.
    HOST_KEYS = GramSystem.HOST_KEYS

    def __init__(self, layout: Layout, settings: WindowSettings, dense: StorageKind,
                 sparse: dict[int, RowSparseRows], system: GramSystem,
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.layout = layout  # which blocks are row-sparse changes when a part moves to dense storage
        self.settings = settings
        self.dense = dense
        self.sparse = sparse  # parameter index -> its row-sparse part
        self.system = system
        # When the columns are sharded across processes: adds up each process's partial dot products, so that
        # every process holds the same Gram matrix and coefficients.
        self.sum_shards = sum_shards
        self._direction: Optional[Tensor] = None  # the assembled direction, kept from step to step

    # ---------------------------------------------------------------------------------------------- making it
    @classmethod
    def allocate(cls, layout: Layout, settings: WindowSettings, first_gradient: Tensor,
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> GradientWindow:
        """An empty window for gradients like `first_gradient`: row-sparse parts for the matrices whose gradient
        has few non-zero rows (where that pays), unless the window is compressed (it covers every coordinate)."""
        m, dtype, device = settings.num_grads, settings.dtype, first_gradient.device
        accumulate = accumulate_dtype(m, layout.total_size, settings.precision)
        layout = window_makeup(layout, settings.density, settings.element_size,
                               lambda block: len(nonzero_rows(layout.matrix(first_gradient, block))))
        if settings.density < 1:
            dense = CompressedRows.allocate(m, layout.local_size, settings.density, dtype, accumulate, device)
        else:
            dense = DenseRows.allocate(m, layout.dense_size, dtype, accumulate, device)
        sparse = {block.index: RowSparseRows.allocate(
            m, max(len(nonzero_rows(layout.matrix(first_gradient, block))), 1), block.rows, block.columns, dtype,
            accumulate, device) for block in layout.sparse_blocks}
        system = GramSystem.allocate(m, settings.damp, device)
        return cls(layout, settings, dense, sparse, system, sum_shards)

    @classmethod
    def from_state(cls, layout: Layout, settings: WindowSettings, shared: dict[str, Tensor],
                   parts: dict[int, dict[str, Tensor]],
                   sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> GradientWindow:
        """The window over saved tensors (used as they are, not copied). `layout` names the row-sparse blocks,
        `parts` their tensors by parameter index; `shared` holds the rest."""
        accumulate = accumulate_dtype(settings.num_grads, layout.total_size, settings.precision)
        dense = DenseRows.from_state(shared, accumulate) if DenseRows.saved_in(shared) else \
            CompressedRows.from_state(shared, layout.local_size, settings.density, accumulate)
        sparse = {block.index: RowSparseRows.from_state(parts[block.index], block.rows, accumulate)
                  for block in layout.sparse_blocks}
        system = GramSystem.from_state(shared, settings.damp)
        check_saved_window_matches(dense, layout.dense_size, system, settings)
        return cls(layout, settings, dense, sparse, system, sum_shards)

    def state(self) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
        """(the window's own tensors, each row-sparse part's tensors by parameter index)."""
        return {**self.dense.state(), **self.system.state()}, {index: part.state() for index, part in self.sparse.items()}

    def save_into(self, shared: dict[str, Tensor], param_states: list[dict[str, Tensor]]) -> None:
        """In place: the window's tensors into the optimizer's state, its own under the first parameter (`shared`)
        and each row-sparse part's under its parameter (`param_states`, in parameter order); a part that moved to
        dense storage leaves its parameter's state. A step may have replaced tensors (a part grew or moved)."""
        own, parts = self.state()
        shared.update(own)
        for index, state in enumerate(param_states):
            if index in parts:
                state.update(parts[index])
            else:
                RowSparseRows.forget(state)

    @staticmethod
    def saved_in(shared: dict[str, Tensor]) -> bool:
        """Whether the optimizer's shared state holds a window (it is made at the first stored gradient)."""
        return GramSystem.saved_in(shared)

    @staticmethod
    def upgrade_saved(shared: dict[str, Tensor]) -> None:
        """In place: a window saved by an earlier version gets the entries this one needs."""
        GramSystem.upgrade_saved(shared)

    @staticmethod
    def holds_row_sparse_part(param_state: dict[str, Tensor]) -> bool:
        """Whether a parameter's saved state holds a row-sparse part of the window."""
        return RowSparseRows.saved_in(param_state)

    # ---------------------------------------------------------------------------------------------- using it
    @property
    def num_grads(self) -> int:
        return self.system.num_grads

    def follow(self, settings: WindowSettings) -> None:
        """The param groups' settings at this step: λ may change (the factor is remade for it), num_grads,
        grad_dtype and density may not (shard moves the process's position, which the optimizer checks)."""
        for key in ("num_grads", "grad_dtype", "density"):
            if getattr(settings, key) != getattr(self.settings, key):
                refuse_change(key, getattr(settings, key), getattr(self.settings, key))
        self.settings = settings
        self.system.damp = settings.damp

    def insert_and_precondition(self, grad: Tensor, stored: int) -> Tensor:
        """Stores the flat local gradient as the window's gradient number `stored` (0-based; the ring's slot
        `stored` mod m) and returns F⁻¹ĝ over this process's columns, in local order and in the settings'
        precision, where ĝ is the stored (possibly rounded or compressed) gradient. Until the window is full, the
        passes and the algebra cover only the filled slots: the empty ones hold zeros, so leaving them out is
        exact."""
        slot, filled = stored % self.num_grads, min(stored + 1, self.num_grads)
        with phase("store"):
            self._store(grad, slot)
        with phase("dots"):
            dots = torch.zeros_like(self.system.gram[0])
            dots[:filled] = self.dense.dots(slot, filled) + sum(
                (part.dots(slot, filled) for part in self.sparse.values()), dots[:filled])
            if self.sum_shards is not None:
                dots = self.sum_shards(dots)
        with phase("m×m"):
            coefficients = self.num_grads * self.system.insert(slot, dots, filled)[:filled]
        with phase("combine"):
            dense_direction = self.dense.combine(coefficients)
            if not self.sparse:
                return dense_direction.to(self.settings.precision)
            sparse_directions = {index: part.combine(coefficients) for index, part in self.sparse.items()}
            if self._direction is None or self._direction.numel() != self.layout.local_size:
                self._direction = torch.empty(self.layout.local_size, dtype=self.settings.precision,
                                              device=grad.device)
            return self.layout.assemble(dense_direction, sparse_directions, self._direction)

    def _store(self, grad: Tensor, slot: int) -> None:
        for block in self.layout.sparse_blocks:
            if not self.sparse[block.index].store(slot, self.layout.matrix(grad, block)):
                self._move_to_dense(block.index)
        self.dense.store(slot, self.layout.dense_part(grad))

    def take_new_parameters(self, layout: Layout) -> None:
        """Parameters added after the window was made (a param group added for gradual unfreezing) join it with no
        history: their columns are zero in every stored slot, so the Gram matrix and its factor stay as they are
        and the next steps are the exact M-FAC steps over the stored gradients. `layout` is the new one, whose
        parameters begin with the window's; the new ones join the dense storage, after its columns (they come
        last in flat order)."""
        if isinstance(self.dense, CompressedRows) or layout.world_size > 1:
            raise ValueError("MFAC: a compressed or sharded window cannot take parameters added after it was made; "
                             "make a new optimizer, or add the parameters before the first step")
        old = self.dense.window
        window = old.new_zeros(old.shape[0], old.shape[1] + layout.total_size - self.layout.total_size)
        window[:, :old.shape[1]] = old
        self.layout = replace(layout, row_sparse=self.layout.row_sparse)
        self.dense = DenseRows(window, accumulate_dtype(self.num_grads, layout.total_size, self.settings.precision))
        self._direction = None

    def _move_to_dense(self, index: int) -> None:
        """A row-sparse part whose rows stopped paying (e.g. weight decay was turned on) goes into the dense
        storage, at its block's place among the dense columns."""
        part = self.sparse.pop(index)
        self.layout = self.layout.without_row_sparse(index)
        column, size = self.layout.dense_column(index), part.num_rows * part.columns
        old = self.dense.window  # a compressed window has no row-sparse parts
        window = old.new_empty(old.shape[0], old.shape[1] + size)
        window[:, :column] = old[:, :column]
        window[:, column + size:] = old[:, column:]
        part.to_dense(out=window[:, column:column + size])  # no third copy: the peak is the old and new windows
        self.dense = DenseRows(window, self.dense.accumulate_dtype)

    def stored_bytes(self) -> int:
        """The bytes of the stored slots (each part's rows and their indices, not a compressed window's error
        buffer): what each of a step's two passes over the window reads."""
        return sum(tensor.numel() * tensor.element_size() for part in [self.dense, *self.sparse.values()]
                   for name, tensor in part.state().items() if name != "error")

    def buffer_bytes(self) -> int:
        """The scratch buffers the window keeps between steps, beyond the state it saves."""
        parts = [self.dense, *self.sparse.values()]
        saved = sum(tensor.numel() * tensor.element_size() for part in parts for tensor in part.state().values())
        direction = 0 if self._direction is None else self._direction.numel() * 4
        return sum(part.memory_bytes() for part in parts) - saved + direction

    def stored_rows(self) -> Tensor:
        """The window as float32 rows over all parameters in flat order (other processes' columns zero)."""
        return self.layout.to_flat(self.dense.to_dense(), {index: part.to_dense() for index, part in self.sparse.items()})


def check_saved_window_matches(dense: StorageKind, columns: int, system: GramSystem,
                               settings: WindowSettings) -> None:
    """A saved window fixes num_grads, grad_dtype and density (damp may change: the factor is remade for it). A
    different setting would be ignored, so it is an error naming the key."""
    if not dense.covers(columns):
        raise ValueError(f"MFAC: the saved window was not made for these parameters ({columns} coordinates require "
                         "grad): they must be the ones that required grad when it was made")
    made = {"num_grads": system.num_grads, "grad_dtype": resolve_grad_dtype(dense.dtype)}
    for key, value in made.items():
        if getattr(settings, key) != value:
            refuse_change(key, getattr(settings, key), value)
    compressed = isinstance(dense, CompressedRows)
    if compressed != (settings.density < 1) or compressed and dense.kept != kept_per_block(settings.density, dense.size):
        refuse_change("density", settings.density, "another density")


def refuse_change(key: str, value, made) -> None:
    raise ValueError(f"Invalid {key}: {value!r} (the window was made with {made}; num_grads, grad_dtype and density "
                     "cannot change once it exists, damp can)")
