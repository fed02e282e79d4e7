"""An upper bound of MFAC's memory before any gradient exists, so that a window that cannot fit is refused before
a model loads (run_glue.py, and the Trainer glue in hf/preflight.py). Each part of the window bounds its own bytes
(storage.py, compressed.py, algebra.py); this adds them up with the optimizer's own buffers."""
from __future__ import annotations

from typing import Union

import torch

from .algebra import GramSystem, accumulate_dtype
from .compressed import CompressedRows
from .hyperparameters import GRAD_DTYPES, resolve_grad_dtype
from .layout import Block, Layout, row_sparse_pays
from .storage import DenseRows, RowSparseRows
from .window import window_makeup


def memory_bound_bytes(shapes: list[torch.Size], max_rows: dict[int, int], num_grads: int,
                       grad_dtype: Union[str, torch.dtype] = torch.float32, momentum: bool = False,
                       world_size: int = 1, density: float = 1.0) -> int:
    """An upper bound, before any gradient is seen, of the bytes one process of MFAC needs: its state (window,
    Gram matrix and factor, momentum) plus the buffers of a step.

    `shapes` are the parameters' shapes in order. `max_rows[i]` bounds how many rows of matrix parameter i one
    gradient can touch (an embedding: the tokens in a batch), so that its row-sparse storage is bounded with its
    capacity's growth. Every other parameter is counted as dense: its gradients are taken to touch all rows. With
    density < 1 the compressed window replaces both.
    """
    element_size = GRAD_DTYPES[resolve_grad_dtype(grad_dtype)].itemsize
    layouts = [Layout(tuple(shapes), rank, world_size) for rank in range(world_size)]
    total, local = layouts[0].total_size, layouts[0].largest_local_size
    accumulate_size = accumulate_dtype(num_grads, total).itemsize
    if density < 1:
        window, row_sparse = CompressedRows.bound_bytes(num_grads, local, density, element_size), False
    else:
        bounds = [dense_window_bound(layout, max_rows, num_grads, element_size, accumulate_size) for layout in layouts]
        window, row_sparse = max(bytes_ for bytes_, _ in bounds), any(sparse for _, sparse in bounds)
    buffers = (8 * total  # the flat gradient and its fp32 pieces
               + 4 * local * momentum  # the momentum
               + 4 * local * row_sparse)  # the direction put together from the dense and row-sparse parts
    if world_size > 1:
        buffers += 4 * ((world_size + 1) * local + total)  # all-gather pieces and the full direction
    return window + GramSystem.bound_bytes(num_grads) + buffers


def dense_window_bound(layout: Layout, max_rows: dict[int, int], num_grads: int, element_size: int,
                       accumulate_size: int) -> tuple[int, bool]:
    """(bytes, whether any part may be row-sparse) of one process's dense window with its row-sparse parts.

    The makeup is window_makeup's, from the bound of each block's rows. A matrix whose bound pays is row-sparse
    from its first gradient on, and no later gradient moves it (the same rule keeps it). One in `max_rows` whose
    bound does not pay may still start row-sparse, if its first gradient touches few rows, and move to dense
    storage later: it is counted both ways, plus the move's peak, when the old and the new dense window coexist.
    """
    def rows_bound(block: Block) -> int:
        return min(max_rows.get(block.index, block.rows), block.rows)

    made = window_makeup(layout, 1.0, element_size, rows_bound)
    # A block where even one row does not pay (a token-type embedding of 2 rows) is never row-sparse: it cannot move.
    may_move = [block for block in made.dense_blocks if block.index in max_rows and block.is_matrix
                and row_sparse_pays(1, block.rows, block.columns, element_size)]
    sparse = sum(RowSparseRows.bound_bytes(num_grads, rows_bound(block), block.rows, block.columns, element_size,
                                           accumulate_size) for block in made.sparse_blocks + may_move)
    dense = DenseRows.bound_bytes(num_grads, made.dense_size, element_size, accumulate_size)
    move_peak = num_grads * made.dense_size * element_size if may_move else 0
    return dense + sparse + move_peak, bool(made.row_sparse or may_move)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors any torch optimizer keeps in its state in this process (MFAC's window, Gram matrix and
    momentum; AdamW's moments)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))
