"""An upper bound of MFAC's memory before any gradient exists, so that a window that cannot fit is refused before
a model loads (run_glue.py, and the Trainer glue in hf_trainer.py)."""
from __future__ import annotations

import math
from typing import Union

import torch

from .algebra import accumulate_dtype
from .compressed import BLOCK, kept_per_block, num_blocks
from .hyperparameters import GRAD_DTYPES, resolve_grad_dtype
from .layout import Layout, row_sparse_pays
from .storage import BLOCK_COLUMNS, RowSparseRows


def memory_bound_bytes(shapes: list[torch.Size], max_rows: dict[int, int], num_grads: int,
                       grad_dtype: Union[str, torch.dtype] = torch.float32, momentum: bool = False,
                       world_size: int = 1, density: float = 1.0) -> int:
    """An upper bound, before any gradient is seen, of the bytes one process of MFAC needs: its state (window,
    Gram matrix and factor, momentum) plus the buffers of a step.

    `shapes` are the parameters' shapes in order. `max_rows[i]` bounds how many rows of matrix parameter i one
    gradient can touch (an embedding: the tokens in a batch), so that its row-sparse storage is bounded with its
    capacity's growth; every other parameter is counted as dense. With density < 1 the compressed window replaces
    both (values, int16 offsets and the fp32 error buffer, over whole blocks).
    """
    element_size = torch.tensor([], dtype=GRAD_DTYPES[resolve_grad_dtype(grad_dtype)]).element_size()
    layout = Layout(tuple(shapes), world_size=world_size)
    total, local = layout.total_size, layout.largest_local_size
    if density < 1:
        padded = num_blocks(local) * BLOCK
        window_bytes = num_blocks(local) * num_grads * kept_per_block(density, local) * (element_size + 2) + 4 * padded
        local = padded  # the passes' buffers span whole blocks
    else:
        window_bytes = dense_window_bytes(layout, max_rows, num_grads, element_size)
    accumulate_size = accumulate_dtype(num_grads, total).itemsize
    row_sparse = density >= 1 and bool(max_rows)
    buffers = (8 * total  # the flat gradient and its fp32 pieces
               + 4 * local * (2 if momentum else 1)  # the direction, and the momentum
               # With row-sparse parts, also kept between steps: the direction put together from them and the
               # dense part (4 bytes a coordinate), and their scratch matrices, whose share beyond fp32 the term
               # above leaves out (accumulate_size − 4). Together at most accumulate_size a local coordinate.
               + accumulate_size * local * row_sparse
               + num_grads * min(BLOCK_COLUMNS, local) * accumulate_size  # the unfused passes' conversion block
               + 16 * num_grads * num_grads)  # a refactorisation: K in chronological order and its new factor
    if world_size > 1:
        buffers += 4 * ((world_size + 1) * local + total)  # all-gather pieces and the full direction
    return window_bytes + 2 * 8 * num_grads * num_grads + buffers  # + the Gram matrix and its factor (float64)


def dense_window_bytes(layout: Layout, max_rows: dict[int, int], num_grads: int, element_size: int) -> int:
    """The dense and row-sparse window of the process with the largest shard of each parameter."""
    window_bytes = 0
    for index, shard_of_each_rank in enumerate(zip(*(layout.blocks_of(rank) for rank in range(layout.world_size)))):
        largest = max(shard_of_each_rank, key=lambda block: block.size)
        stored = num_grads * largest.size * element_size
        if index in max_rows and largest.is_matrix:
            growth = RowSparseRows.GROWTH_NUMERATOR / RowSparseRows.GROWTH_DENOMINATOR
            capacity = min(largest.rows, math.ceil(max_rows[index] * growth))
            sparse = num_grads * capacity * (largest.columns * element_size + 8)
            # Rows that pay stay row-sparse; others move to dense storage once their slots no longer pay.
            stored = sparse if row_sparse_pays(capacity, largest.rows, largest.columns, element_size) \
                else max(stored, sparse)
        window_bytes += stored
    return window_bytes


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors any torch optimizer keeps in its state in this process (MFAC's window, Gram matrix and
    momentum; AdamW's moments)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))
