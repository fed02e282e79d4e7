"""Window passes for GPU tensors, in Triton: the dense window's dots and combine, the compressed window's dots and
combine, and the row-sparse dots and combine. Each reads the window once, in its storage dtype; sums are fp32 per tile and
float64 across tiles (float64 throughout for the compressed dots, as on the CPU). No atomics, so results are
deterministic. Offsets into a window are int64, since Triton's int32 wraps past 2³¹ entries (bert-mini's dense
window at m = 1024 has 3.4 billion). The functions have the names and signatures of the compiled CPU module's, so
the storage kinds call any of them without knowing which. The tests run them on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import triton
import triton.language as tl
import torch

# The compressed store's selection is torch's top-k on a GPU (the only pass without a Triton kernel).
from .torch_passes import compressed_select  # noqa: F401  (part of this backend's functions)

ROWS = 16  # window rows per program: one load of the new row's segment serves them all
COLUMNS = 512  # columns per inner iteration
SPLIT = 1 << 15  # columns per program of the dot products: fp32 sums over at most 32,768 products
# The combines' partial sums (one per run of consecutive slots): at most this many bytes of them.
PARTIAL_BYTES = 1 << 28
SPARSE_ROWS, SPARSE_COLUMNS = 64, 64  # stored rows × columns per inner iteration of the row-sparse combine


@triton.jit
def _dots_kernel(window, new_row, partial, rows, columns, stride, ROWS: tl.constexpr, COLUMNS: tl.constexpr,
                 SPLIT: tl.constexpr):
    """partial[split, row] = Σ over the split's columns of window[row, col] · new_row[col], in fp32."""
    row_tile, split = tl.program_id(0), tl.program_id(1)
    row_index = row_tile * ROWS + tl.arange(0, ROWS)
    row_mask = row_index < rows
    row_start = row_index.to(tl.int64) * stride
    total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    for offset in range(0, SPLIT, COLUMNS):
        column_index = split * SPLIT + offset + tl.arange(0, COLUMNS)
        column_mask = column_index < columns
        new = tl.load(new_row + column_index, mask=column_mask, other=0.0).to(tl.float32)
        block = tl.load(window + row_start[:, None] + column_index[None, :],
                        mask=row_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
        total += block * new[None, :]
    tl.store(partial + split * rows + row_index, tl.sum(total, axis=1), mask=row_mask)


@triton.jit
def _combine_kernel(window, coefficients, result, rows, columns, stride, ROWS: tl.constexpr,
                    COLUMNS: tl.constexpr):
    """result[col] = Σ_row coefficients[row] · window[row, col], in fp32, rows in order."""
    column_index = tl.program_id(0) * COLUMNS + tl.arange(0, COLUMNS)
    column_mask = column_index < columns
    total = tl.zeros([COLUMNS], dtype=tl.float32)
    for start in range(0, rows, ROWS):
        row_index = start + tl.arange(0, ROWS)
        row_mask = row_index < rows
        scale = tl.load(coefficients + row_index, mask=row_mask, other=0.0)
        block = tl.load(window + row_index.to(tl.int64)[:, None] * stride + column_index[None, :],
                        mask=row_mask[:, None] & column_mask[None, :], other=0.0).to(tl.float32)
        total += tl.sum(block * scale[:, None], axis=0)
    tl.store(result + column_index, total, mask=column_mask)


def window_dots(window: torch.Tensor, slot: int) -> torch.Tensor:
    """G ĝ in float64, ĝ = row `slot` of the (m, n) window: fp32 sums per split of columns, added in float64."""
    rows, columns = window.shape
    splits = triton.cdiv(columns, SPLIT)
    partial = torch.empty(splits, rows, dtype=torch.float32, device=window.device)
    _dots_kernel[(triton.cdiv(rows, ROWS), splits)](window, window[slot], partial, rows, columns, window.stride(0),
                                                   ROWS=ROWS, COLUMNS=COLUMNS, SPLIT=SPLIT)
    return partial.sum(dim=0, dtype=torch.float64)


def window_combine(window: torch.Tensor, coefficients: torch.Tensor, result: torch.Tensor) -> None:
    """result = Gᵀc in fp32 (coefficients fp32, one per row)."""
    rows, columns = window.shape
    _combine_kernel[(triton.cdiv(columns, COLUMNS),)](window, coefficients, result, rows, columns, window.stride(0),
                                                      ROWS=ROWS, COLUMNS=COLUMNS)


@triton.jit
def _compressed_combine_kernel(values, offsets, coefficients, partial, slots, filled, size, KEPT: tl.constexpr,
                               KEPT_TILE: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """partial[run, block] = Σ over the run's SLOTS slots (of the first `filled` of `slots`), in order, of c_j · slot
    j's kept entries in the block (`size` entries per partial). A slot's offsets in a block are distinct, so its lanes never collide; the barrier
    orders one slot's writes before the next slot's reads."""
    block, run = tl.program_id(0), tl.program_id(1)
    out = partial + run.to(tl.int64) * size + block * BLOCK
    entry = tl.arange(0, KEPT_TILE)
    mask = entry < KEPT
    for index in range(0, SLOTS):
        slot = run * SLOTS + index
        if slot < filled:
            scale = tl.load(coefficients + slot)
            base = (block.to(tl.int64) * slots + slot) * KEPT
            position = tl.load(offsets + base + entry, mask=mask, other=0).to(tl.int32)
            value = tl.load(values + base + entry, mask=mask, other=0.0).to(tl.float32)
            current = tl.load(out + position, mask=mask, other=0.0)
            tl.store(out + position, current + scale * value, mask=mask)
            tl.debug_barrier()


def compressed_combine(values: torch.Tensor, offsets: torch.Tensor, coefficients: torch.Tensor,
                       result: torch.Tensor, block: int, filled: int) -> None:
    """result (blocks · block, fp32) = Σ_j c_j · slot j over the first `filled` slots of the (blocks, m, kept)
    compressed window."""
    blocks, slots, kept = values.shape

    def launch(partial: torch.Tensor, runs: int, per_run: int) -> None:
        _compressed_combine_kernel[(blocks, runs)](values, offsets, coefficients, partial, slots, filled,
                                                   result.numel(), KEPT=kept, KEPT_TILE=triton.next_power_of_2(kept),
                                                   BLOCK=block, SLOTS=per_run)

    _combine_in_runs(filled, result, launch)


def _combine_in_runs(slots: int, result: torch.Tensor, launch) -> None:
    """A combine without atomics that is still parallel over the slots: runs of consecutive slots are summed in
    parallel, each into its own partial sum (PARTIAL_BYTES bound them all), which are then added in run order, so
    the result is deterministic. `launch(partial, runs, slots_per_run)` adds each run into partial[run]."""
    runs = max(1, min(slots, PARTIAL_BYTES // (4 * result.numel())))
    per_run = triton.cdiv(slots, runs)
    runs = triton.cdiv(slots, per_run)
    if runs == 1:
        launch(result.zero_().unsqueeze(0), 1, per_run)
        return
    partial = torch.zeros(runs, *result.shape, dtype=torch.float32, device=result.device)
    launch(partial, runs, per_run)
    torch.sum(partial, dim=0, out=result)


@triton.jit
def _compressed_dots_kernel(values, offsets, new, partial, slots, filled, KEPT: tl.constexpr,
                            KEPT_TILE: tl.constexpr, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
    """partial[block, slot] = Σ over slot's kept entries of the block of value · new[block, offset], in float64, for
    the first `filled` of `slots` slots."""
    block, slot_tile = tl.program_id(0), tl.program_id(1)
    entry = tl.arange(0, KEPT_TILE)
    mask = entry < KEPT
    for index in range(0, SLOTS):
        slot = slot_tile * SLOTS + index
        if slot < filled:
            base = (block.to(tl.int64) * slots + slot) * KEPT
            position = tl.load(offsets + base + entry, mask=mask, other=0).to(tl.int32)
            value = tl.load(values + base + entry, mask=mask, other=0.0).to(tl.float64)
            other = tl.load(new + block * BLOCK + position, mask=mask, other=0.0)
            tl.store(partial + block * filled + slot, tl.sum(value * other, axis=0))


def compressed_dots(values: torch.Tensor, offsets: torch.Tensor, slot: int, block: int,
                    filled: int) -> torch.Tensor:
    """⟨slot j, slot `slot`⟩ for the first `filled` slots j of the (blocks, m, kept) compressed window, in float64:
    the new slot is scattered into a dense float64 copy of its blocks (its offsets are distinct), which every slot
    gathers from."""
    blocks, slots, kept = values.shape
    new = torch.zeros(blocks, block, dtype=torch.float64, device=values.device)
    new.scatter_(1, offsets[:, slot].long(), values[:, slot].double())
    partial = torch.empty(blocks, filled, dtype=torch.float64, device=values.device)
    _compressed_dots_kernel[(blocks, triton.cdiv(filled, ROWS))](values, offsets, new, partial, slots, filled,
                                                                 KEPT=kept, KEPT_TILE=triton.next_power_of_2(kept),
                                                                 BLOCK=block, SLOTS=ROWS)
    return partial.sum(dim=0)


@triton.jit
def _sparse_dots_kernel(indices, values, new, partial, capacity, columns, tiles, ROWS: tl.constexpr,
                        COLUMNS: tl.constexpr):
    """partial[slot, tile] = Σ over the tile's ROWS stored rows of slot of ⟨row values, new[row index]⟩, in fp32."""
    slot, tile = tl.program_id(0), tl.program_id(1)
    row = tile * ROWS + tl.arange(0, ROWS)
    row_mask = row < capacity
    index = tl.load(indices + slot * capacity + row, mask=row_mask, other=0)
    total = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    for start in range(0, columns, COLUMNS):
        column = start + tl.arange(0, COLUMNS)
        mask = row_mask[:, None] & (column < columns)[None, :]
        stored = tl.load(values + (slot.to(tl.int64) * capacity + row[:, None]) * columns + column[None, :],
                         mask=mask, other=0.0).to(tl.float32)
        other = tl.load(new + index[:, None] * columns + column[None, :], mask=mask, other=0.0)
        total += stored * other
    tl.store(partial + slot * tiles + tile, tl.sum(tl.sum(total, axis=1), axis=0))


def sparse_dots(indices: torch.Tensor, values: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Dots of every row-sparse slot ((m, capacity) row indices, (m, capacity, columns) values) with the dense fp32
    matrix `new`, in float64: fp32 sums over tiles of ROWS stored rows, added in float64."""
    slots, capacity, columns = values.shape
    tiles = triton.cdiv(capacity, ROWS)
    partial = torch.empty(slots, tiles, dtype=torch.float32, device=values.device)
    _sparse_dots_kernel[(slots, tiles)](indices, values, new, partial, capacity, columns, tiles, ROWS=ROWS,
                                        COLUMNS=triton.next_power_of_2(min(columns, COLUMNS)))
    return partial.sum(dim=1, dtype=torch.float64)


@triton.jit
def _sparse_combine_kernel(indices, values, coefficients, partial, slots, capacity, columns, num_rows,
                           SLOTS: tl.constexpr, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    """partial[run] = Σ over the run's SLOTS slots, in order, of c_j · slot j scattered into rows. A slot's stored
    rows are increasing and padded with row 0 after its first position (zero values, masked here), so within a slot
    no two lanes touch one row; the barrier orders one slot's writes before the next slot's reads."""
    run, column_tile = tl.program_id(0), tl.program_id(1)
    column = column_tile * COLUMNS + tl.arange(0, COLUMNS)
    column_mask = column < columns
    out = partial + run.to(tl.int64) * num_rows * columns
    for index in range(0, SLOTS):
        slot = run * SLOTS + index
        if slot < slots:
            scale = tl.load(coefficients + slot)
            first = slot.to(tl.int64) * capacity
            for start in range(0, capacity, ROWS):
                position = start + tl.arange(0, ROWS)
                row = tl.load(indices + first + position, mask=position < capacity, other=0)
                stored = (position < capacity) & ((row != 0) | (position == 0))
                mask = stored[:, None] & column_mask[None, :]
                value = tl.load(values + (first + position[:, None]) * columns + column[None, :], mask=mask,
                                other=0.0).to(tl.float32)
                target = out + row[:, None] * columns + column[None, :]
                current = tl.load(target, mask=mask, other=0.0)
                tl.store(target, current + scale * value, mask=mask)
            tl.debug_barrier()


def sparse_combine(indices: torch.Tensor, values: torch.Tensor, coefficients: torch.Tensor,
                   result: torch.Tensor) -> None:
    """result (rows × columns, fp32) = Σ_j c_j · row-sparse slot j scattered."""
    slots, capacity, columns = values.shape

    def launch(partial: torch.Tensor, runs: int, per_run: int) -> None:
        _sparse_combine_kernel[(runs, triton.cdiv(columns, SPARSE_COLUMNS))](
            indices, values, coefficients, partial, slots, capacity, columns, result.shape[0], SLOTS=per_run,
            ROWS=SPARSE_ROWS, COLUMNS=SPARSE_COLUMNS)

    _combine_in_runs(slots, result, launch)
