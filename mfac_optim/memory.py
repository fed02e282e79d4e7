"""An upper bound of MFAC's memory before any gradient exists, so that a window that cannot fit is refused before
a model loads (run_glue.py, and the Trainer glue in hf_trainer.py). Each part of the window bounds its own bytes
(storage.py, compressed.py, algebra.py); this adds them up with the optimizer's own buffers."""
from __future__ import annotations

from typing import Union

import torch

from .algebra import GramSystem, accumulate_dtype
from .compressed import CompressedRows
from .hyperparameters import GRAD_DTYPES, resolve_grad_dtype
from .layout import Block, Layout, row_sparse_pays
from .storage import DenseRows, RowSparseRows


def memory_bound_bytes(shapes: list[torch.Size], max_rows: dict[int, int], num_grads: int,
                       grad_dtype: Union[str, torch.dtype] = torch.float32, momentum: bool = False,
                       world_size: int = 1, density: float = 1.0) -> int:
    """An upper bound, before any gradient is seen, of the bytes one process of MFAC needs: its state (window,
    Gram matrix and factor, momentum) plus the buffers of a step.

    `shapes` are the parameters' shapes in order. `max_rows[i]` bounds how many rows of matrix parameter i one
    gradient can touch (an embedding: the tokens in a batch), so that its row-sparse storage is bounded with its
    capacity's growth; every other parameter is counted as dense. With density < 1 the compressed window replaces
    both.
    """
    element_size = GRAD_DTYPES[resolve_grad_dtype(grad_dtype)].itemsize
    layout = Layout(tuple(shapes), world_size=world_size)
    total, local = layout.total_size, layout.largest_local_size
    accumulate_size = accumulate_dtype(num_grads, total).itemsize
    if density < 1:
        window, row_sparse = CompressedRows.bound_bytes(num_grads, local, density, element_size), False
    else:
        window, row_sparse = dense_window_bound(layout, max_rows, num_grads, element_size, accumulate_size)
    buffers = (8 * total  # the flat gradient and its fp32 pieces
               + 4 * local * momentum  # the momentum
               + 4 * local * row_sparse)  # the direction put together from the dense and row-sparse parts
    if world_size > 1:
        buffers += 4 * ((world_size + 1) * local + total)  # all-gather pieces and the full direction
    return window + GramSystem.bound_bytes(num_grads) + buffers


def dense_window_bound(layout: Layout, max_rows: dict[int, int], num_grads: int, element_size: int,
                       accumulate_size: int) -> tuple[int, bool]:
    """(bytes, whether any part is row-sparse) of the dense and row-sparse window of the process with the largest
    shard of each parameter."""
    dense_columns, sparse_bytes, row_sparse = 0, 0, False
    for index, shards in enumerate(zip(*(layout.blocks_of(rank) for rank in range(layout.world_size)))):
        largest: Block = max(shards, key=lambda block: block.size)
        if index in max_rows and largest.is_matrix:
            sparse = RowSparseRows.bound_bytes(num_grads, max_rows[index], largest.rows, largest.columns,
                                               element_size, accumulate_size)
            capacity = RowSparseRows.capacity_bound(max_rows[index], largest.rows)
            if row_sparse_pays(capacity, largest.rows, largest.columns, element_size):
                sparse_bytes, row_sparse = sparse_bytes + sparse, True
                continue
            sparse_bytes += sparse  # it may start row-sparse and move to dense storage later
        dense_columns += largest.size
    return DenseRows.bound_bytes(num_grads, dense_columns, element_size, accumulate_size) + sparse_bytes, row_sparse


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors any torch optimizer keeps in its state in this process (MFAC's window, Gram matrix and
    momentum; AdamW's moments)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))
