"""The gradient window and its life cycle: a ring buffer of m gradients held in storage parts of the kinds in
storage.py and compressed.py, with the m × m system over them (algebra.py). It is made once, from the first
gradient (`GradientWindow.allocate`) or from saved state (`GradientWindow.from_state`), over the optimizer's state
dicts: its own entries under the first parameter, each row-sparse part's under its parameter. Those dicts are the
only owners of its tensors; the window reads them at every pass and writes into them what it replaces. It picks
which matrices are stored row-sparse, moves a part to dense storage when its rows stop paying, counts the stored
gradients (so it knows its next slot), and keeps its scratch buffers. `insert_and_precondition` stores the new
gradient ĝ as the next slot i and returns F⁻¹ĝ = m · Gᵀ K⁻¹ eᵢ for the columns this process keeps.
"""
from __future__ import annotations

from dataclasses import field, fields, make_dataclass, replace
from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from .algebra import GramSystem, accumulate_dtype
from .compressed import CompressedRows, kept_per_block
from .config import FIXED, GRAD_DTYPES, MFACConfig, resolve_grad_dtype, window_keys
from .distributed import check_shard_position
from .kernels import buffer_bytes, passes_for
from .layout import Block, Layout, nonzero_rows
from .phases import phase
from .storage import DenseRows, PartPlan, RowSparseRows

# The kinds that may hold the window's columns besides its row-sparse parts: at most one of them is saved.
WHOLE_KINDS = (DenseRows, CompressedRows)


class StorageKind(Protocol):
    """What the window asks of each storage part. Every part covers some of the window's columns in every slot, and
    keeps its tensors in the state dict it was made with."""

    @classmethod
    def allocate(cls, plan: PartPlan, state: dict[str, Tensor], device: torch.device, passes) -> StorageKind:
        """An empty part for `plan`, its entries written into `state`."""

    @classmethod
    def from_state(cls, plan: PartPlan, state: dict[str, Tensor], passes) -> StorageKind:
        """The part over the entries saved in `state` (used as they are, not copied)."""

    @classmethod
    def saved_in(cls, state: dict[str, Tensor]) -> bool:
        """Whether `state` holds such a part."""

    @staticmethod
    def bound_bytes(plan: PartPlan) -> int:
        """An upper bound of the bytes a part made for `plan` holds (state and scratch), before any gradient."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the slots are stored in."""

    def memory_bytes(self) -> int:
        """The bytes the part holds: its state and its scratch buffers."""

    def saved(self) -> dict[str, Tensor]:
        """The part's entries of its state dict."""

    def store(self, slot: int, gradient: Tensor) -> bool:
        """Stores the part's columns of a gradient in slot `slot`; False (nothing stored) where the part cannot hold
        it well: a row-sparse part whose gradient has too many rows to pay."""

    def dots(self, slot: int, filled: int) -> Tensor:
        """⟨slot j, slot `slot`⟩ over the part's columns for each of the first `filled` slots j, in float64 (the
        others are empty: zero)."""

    def combine(self, coefficients: Tensor) -> Tensor:
        """Σⱼ cⱼ · slot j over the part's columns and the first len(c) slots, in the accumulation dtype (a buffer
        the next call may overwrite)."""

    def to_dense(self) -> Tensor:
        """The stored slots as dense rows over the part's columns."""


class WindowSettingsMethods:
    """What `WindowSettings` does besides holding its fields."""

    @classmethod
    def of(cls, group: dict, precision: torch.dtype = torch.float32) -> WindowSettings:
        return cls(**{key: group[key] for key in window_keys()}, precision=precision)

    @property
    def dtype(self) -> torch.dtype:
        return GRAD_DTYPES[self.grad_dtype]


# What defines the one window shared by all param groups: the settings config.py marks shared or fixed (the fields
# are made from that declaration), and `precision`, the dtype of the algebra and the direction (float64 for float64
# parameters, else fp32).
WindowSettings = make_dataclass(
    "WindowSettings", [(f.name, f.type) for f in fields(MFACConfig) if f.name in window_keys()] +
    [("precision", "torch.dtype", field(default=torch.float32))], bases=(WindowSettingsMethods,), frozen=True,
    namespace={"__module__": __name__})


def plan_parts(layout: Layout, num_grads: int, dtype: torch.dtype, density: float, accumulate: torch.dtype,
               rows_used: Callable[[Block], int]) -> tuple[Layout, PartPlan, dict[int, PartPlan]]:
    """The one place that decides what the window is made of, for a window being made (from its first gradient)
    and for the memory bound (from a bound of the rows a gradient uses): (the layout with its row-sparse blocks,
    the plan of the part over the other columns, each row-sparse block's plan). A compressed window covers every
    coordinate and has no row-sparse parts; a dense one keeps row-sparse each matrix block for which the
    `rows_used(block)` rows pay (layout.row_sparse_pays). A block no row of which is used (a gradient that is zero
    there: LoRA's A while B is still zero) says nothing about its rows, and stays dense."""
    if density < 1:
        layout = replace(layout, row_sparse=frozenset())
        return layout, PartPlan(CompressedRows, num_grads, layout.local_size, dtype, accumulate, density=density), {}
    layout = layout.with_row_sparse_where_it_pays(lambda block: rows_used(block) or block.rows, dtype.itemsize)
    sparse = {block.index: row_sparse_plan(block, rows_used(block), num_grads, dtype, accumulate)
              for block in layout.sparse_blocks}
    return layout, PartPlan(DenseRows, num_grads, layout.dense_size, dtype, accumulate), sparse


def row_sparse_plan(block: Block, rows: int, num_grads: int, dtype: torch.dtype, accumulate: torch.dtype) -> PartPlan:
    """A row-sparse part of `block`'s matrix, `rows` of them stored per slot."""
    return PartPlan(RowSparseRows, num_grads, block.columns, dtype, accumulate, rows=block.rows, capacity=max(rows, 1))


class GradientWindow:
    """The window and its m × m system over the state dicts it was made with. The optimizer asks `saved_in`,
    `HOST_KEYS` and `upgrade_saved` about its state, without knowing the keys."""

    # Window entries the host reads at every step, kept on the CPU: the count of stored gradients, the position of
    # this process's shard, and the factor's bookkeeping.
    COUNTERS = ("step", "shard_rank", "shard_world_size")
    HOST_KEYS = COUNTERS + GramSystem.HOST_KEYS

    def __init__(self, layout: Layout, settings: WindowSettings, shared: dict[str, Tensor], dense: StorageKind,
                 sparse: dict[int, RowSparseRows], system: GramSystem, passes,
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.layout = layout  # which blocks are row-sparse changes when a part moves to dense storage
        self.settings = settings
        self._shared = shared
        self.dense = dense  # the part over every column that is not in a row-sparse part
        self.sparse = sparse  # parameter index -> its row-sparse part
        self.system = system
        self._passes = passes
        # When the columns are sharded across processes: adds up each process's partial dot products, so that
        # every process holds the same Gram matrix and coefficients.
        self.sum_shards = sum_shards
        self._direction: Optional[Tensor] = None  # the assembled direction, kept from step to step

    # ---------------------------------------------------------------------------------------------- making it
    @classmethod
    def allocate(cls, layout: Layout, settings: WindowSettings, first_gradient: Tensor, shared: dict[str, Tensor],
                 param_states: list[dict[str, Tensor]],
                 sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> GradientWindow:
        """An empty window for gradients like `first_gradient`, its entries written into `shared` and the states of
        the row-sparse parameters (`param_states`, in parameter order): row-sparse parts for the matrices whose
        gradient has few non-zero rows (where that pays), unless the window is compressed."""
        device, accumulate = first_gradient.device, cls._accumulate_dtype(layout, settings)
        layout, dense_plan, sparse_plans = plan_parts(
            layout, settings.num_grads, settings.dtype, settings.density, accumulate,
            lambda block: len(nonzero_rows(layout.matrix(first_gradient, block))))
        passes = passes_for(device, settings.dtype, accumulate)
        dense = dense_plan.kind.allocate(dense_plan, shared, device, passes)
        sparse = {index: RowSparseRows.allocate(plan, param_states[index], device, passes)
                  for index, plan in sparse_plans.items()}
        system = GramSystem.allocate(settings.num_grads, settings.damp, shared, device)
        shared.update(step=torch.tensor(0, dtype=torch.int64),
                      shard_rank=torch.tensor(layout.rank, dtype=torch.int64),
                      shard_world_size=torch.tensor(layout.world_size, dtype=torch.int64))
        return cls(layout, settings, shared, dense, sparse, system, passes, sum_shards)

    @classmethod
    def from_state(cls, layout: Layout, settings: WindowSettings, shared: dict[str, Tensor],
                   param_states: list[dict[str, Tensor]],
                   sum_shards: Optional[Callable[[Tensor], Tensor]] = None) -> GradientWindow:
        """The window over saved entries (used as they are, not copied): `layout` is this process's, the saved
        state says which blocks are row-sparse."""
        check_shard_position(shared, layout)
        layout = replace(layout, row_sparse=frozenset(
            index for index, state in enumerate(param_states) if RowSparseRows.saved_in(state)))
        accumulate = cls._accumulate_dtype(layout, settings)
        kind = next((kind for kind in WHOLE_KINDS if kind.saved_in(shared)), DenseRows)
        passes = passes_for(shared["gram"].device, settings.dtype, accumulate)
        dense_plan = PartPlan(kind, settings.num_grads, layout.dense_size, settings.dtype, accumulate,
                              density=settings.density)
        dense = kind.from_state(dense_plan, shared, passes)
        sparse = {block.index: RowSparseRows.from_state(
            row_sparse_plan(block, 0, settings.num_grads, settings.dtype, accumulate), param_states[block.index],
            passes) for block in layout.sparse_blocks}
        system = GramSystem(shared, settings.damp)
        check_saved_window_matches(dense, layout.dense_size, system, settings)
        return cls(layout, settings, shared, dense, sparse, system, passes, sum_shards)

    @staticmethod
    def _accumulate_dtype(layout: Layout, settings: WindowSettings) -> torch.dtype:
        return accumulate_dtype(settings.num_grads, layout.total_size, settings.precision)

    @staticmethod
    def saved_in(shared: dict[str, Tensor]) -> bool:
        """Whether the optimizer's shared state holds a window (it is made at the first stored gradient)."""
        return GramSystem.saved_in(shared)

    @staticmethod
    def upgrade_saved(shared: dict[str, Tensor]) -> None:
        """In place: a window saved by an earlier version gets the entries this one needs."""
        GramSystem.upgrade_saved(shared)

    # ---------------------------------------------------------------------------------------------- using it
    @property
    def num_grads(self) -> int:
        return self.system.num_grads

    @property
    def stored(self) -> int:
        """The gradients stored so far (the last m of them are in the window)."""
        return int(self._shared["step"])

    def follow(self, settings: WindowSettings, rank: int, world_size: int) -> None:
        """The param groups' settings at this step, with this process's position: λ may change (the factor is
        remade for it), the fixed settings may not, nor may the position of a shard."""
        for key in window_keys(FIXED):
            if getattr(settings, key) != getattr(self.settings, key):
                refuse_change(key, getattr(settings, key), getattr(self.settings, key))
        if (rank, world_size) != (self.layout.rank, self.layout.world_size):
            check_shard_position(self._shared, replace(self.layout, rank=rank, world_size=world_size))
        self.settings = settings
        self.system.damp = settings.damp

    def insert_and_precondition(self, grad: Tensor) -> Tensor:
        """Stores the flat local gradient as the next one (the oldest slot: stored mod m) and returns F⁻¹ĝ over
        this process's columns, in local order and in the settings' precision, where ĝ is the stored (possibly
        rounded or compressed) gradient. Until the window is full, the passes and the algebra cover only the
        filled slots: the empty ones hold zeros, so leaving them out is exact."""
        stored = self.stored
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
        self._shared["step"] += 1
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
        if self.settings.density < 1 or layout.world_size > 1:
            raise ValueError("MFAC: a compressed or sharded window cannot take parameters added after it was made; "
                             "make a new optimizer, or add the parameters before the first step")
        old = self.dense.window
        window = old.new_zeros(old.shape[0], old.shape[1] + layout.total_size - self.layout.total_size)
        window[:, :old.shape[1]] = old
        self.layout = replace(layout, row_sparse=self.layout.row_sparse)
        self.dense.replace(window)
        self._direction = None

    def _move_to_dense(self, index: int) -> None:
        """A row-sparse part whose rows stopped paying (e.g. weight decay was turned on) goes into the dense
        storage, at its block's place among the dense columns, and leaves its parameter's state."""
        part = self.sparse.pop(index)
        self.layout = self.layout.without_row_sparse(index)
        column, size = self.layout.dense_column(index), part.num_rows * part.columns
        old = self.dense.window  # a compressed window has no row-sparse parts
        window = old.new_empty(old.shape[0], old.shape[1] + size)
        window[:, :column] = old[:, :column]
        window[:, column + size:] = old[:, column:]
        part.to_dense(out=window[:, column:column + size])  # no third copy: the peak is the old and new windows
        part.forget()
        self.dense.replace(window)

    def stored_bytes(self) -> int:
        """The bytes of the stored slots (each part's rows and their indices, not a compressed window's error
        buffer): what each of a step's two passes over the window reads."""
        return sum(tensor.numel() * tensor.element_size() for part in [self.dense, *self.sparse.values()]
                   for name, tensor in part.saved().items() if name != "error")

    def buffer_bytes(self) -> int:
        """The scratch buffers the window keeps between steps, beyond the state it saves (with the torch passes'
        converted block)."""
        parts = [self.dense, *self.sparse.values()]
        saved = sum(tensor.numel() * tensor.element_size() for part in parts for tensor in part.saved().values())
        direction = 0 if self._direction is None else self._direction.numel() * self._direction.element_size()
        return sum(part.memory_bytes() for part in parts) - saved + direction + buffer_bytes(self._passes)

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
    fixed = ", ".join(window_keys(FIXED))
    raise ValueError(f"Invalid {key}: {value!r} (the window was made with {made}; {fixed} cannot change once it "
                     "exists, damp can)")
