"""An upper bound of MFAC's memory before any gradient exists, so that a window that cannot fit is refused before
a model loads (run_glue.py, and the Trainer glue in hf/preflight.py). The window plans its parts as it would make
them (window.plan_parts), each part's kind bounds its bytes from its plan, and this adds them up with the m × m
system's and the optimizer's own buffers."""
from __future__ import annotations

from typing import Union

import torch

from .algebra import GramSystem, accumulate_dtype
from .config import GRAD_DTYPES, resolve_grad_dtype
from .layout import Block, Layout, row_sparse_pays
from .window import plan_parts, row_sparse_plan


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
    dtype = GRAD_DTYPES[resolve_grad_dtype(grad_dtype)]
    layouts = [Layout(tuple(shapes), rank, world_size) for rank in range(world_size)]
    total, local = layouts[0].total_size, layouts[0].largest_local_size
    accumulate = accumulate_dtype(num_grads, total)
    bounds = [window_bound(layout, max_rows, num_grads, dtype, density, accumulate) for layout in layouts]
    window, row_sparse = max(bytes_ for bytes_, _ in bounds), any(sparse for _, sparse in bounds)
    buffers = (8 * total  # the flat gradient and its fp32 pieces
               + 4 * local * momentum  # the momentum
               + 4 * local * row_sparse)  # the direction put together from the dense and row-sparse parts
    if world_size > 1:
        buffers += 4 * ((world_size + 1) * local + total)  # all-gather pieces and the full direction
    return window + GramSystem.bound_bytes(num_grads) + buffers


def window_bound(layout: Layout, max_rows: dict[int, int], num_grads: int, dtype: torch.dtype, density: float,
                 accumulate: torch.dtype) -> tuple[int, bool]:
    """(bytes, whether any part may be row-sparse) of one process's window with its row-sparse parts.

    The parts are plan_parts', from the bound of each block's rows. A matrix whose bound pays is row-sparse from its
    first gradient on, and no later gradient moves it (the same rule keeps it). One in `max_rows` whose bound does
    not pay may still start row-sparse, if its first gradient touches few rows, and move to dense storage later: it
    is counted both ways, plus the move's peak, when the old and the new dense window coexist.
    """
    def rows_bound(block: Block) -> int:
        return min(max_rows.get(block.index, block.rows), block.rows)

    made, whole, sparse = plan_parts(layout, num_grads, dtype, density, accumulate, rows_bound)
    # A block where even one row does not pay (a token-type embedding of 2 rows) is never row-sparse: it cannot move.
    may_move = [block for block in made.dense_blocks if density == 1 and block.index in max_rows and block.is_matrix
                and row_sparse_pays(1, block.rows, block.columns, dtype.itemsize)]
    plans = [whole, *sparse.values(),
             *(row_sparse_plan(block, rows_bound(block), num_grads, dtype, accumulate) for block in may_move)]
    move_peak = num_grads * whole.columns * dtype.itemsize if may_move else 0
    return sum(plan.kind.bound_bytes(plan) for plan in plans) + move_peak, bool(sparse or may_move)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors any torch optimizer keeps in its state in this process (MFAC's window, Gram matrix and
    momentum; AdamW's moments)."""
    return sum(value.numel() * value.element_size() for state in optimizer.state.values() for value in state.values()
               if torch.is_tensor(value))
