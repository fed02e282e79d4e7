"""Where each piece of the flat gradient lives: the parameters in param-group order, each one's range in the flat
vector of all parameters, the rows of it this process keeps when the window is sharded, and which blocks the window
stores row-sparse. Every offset in the package is computed here and nowhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Callable, Iterator

import torch
from torch import Tensor


@dataclass(frozen=True)
class Block:
    """The rows of one parameter (seen as a rows × columns matrix; a vector is a column) that this process keeps,
    where they lie in the flat gradient of all parameters, and where in this process's own (local) vector."""

    index: int  # of the parameter, in the order of the param groups
    flat: slice
    local: slice
    rows: int
    columns: int
    is_matrix: bool  # the parameter is 2-D, so its block may be stored row-sparse

    @property
    def size(self) -> int:
        return self.rows * self.columns


def nonzero_rows(matrix: Tensor) -> Tensor:
    return (matrix != 0).any(dim=1).nonzero().squeeze(1)


# A block is stored row-sparse while its rows plus their int64 indices take less than this fraction of it dense:
# past half, the few bytes saved do not pay for the gathers and scatters of the row-sparse passes.
ROW_SPARSE_MARGIN = 0.5


def row_sparse_pays(rows_used: int, rows: int, columns: int, element_size: int) -> bool:
    """The row-sparse rule, for choosing a block's storage and for keeping it: whether `rows_used` of its `rows`
    rows plus their indices take less than ROW_SPARSE_MARGIN of the dense block."""
    return rows_used * (columns * element_size + 8) < ROW_SPARSE_MARGIN * rows * columns * element_size


@dataclass(frozen=True)
class Layout:
    """This process's blocks of every parameter, and which of them are stored row-sparse (parameter indices)."""

    shapes: tuple[torch.Size, ...]
    rank: int = 0
    world_size: int = 1
    row_sparse: frozenset[int] = frozenset()

    @cached_property
    def blocks(self) -> list[Block]:
        return self.blocks_of(self.rank)

    def blocks_of(self, rank: int) -> list[Block]:
        """Rank `rank`'s block of every parameter: each parameter's rows (elements, for a vector) are split into
        `world_size` contiguous ranges of near-equal length, so each rank keeps 1/world_size of the window to within
        one row per parameter, and of every embedding matrix."""
        blocks, offset, local = [], 0, 0
        for index, shape in enumerate(self.shapes):
            numel = math.prod(shape)
            rows, columns = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (numel, 1)
            first, last = rows * rank // self.world_size, rows * (rank + 1) // self.world_size
            size = (last - first) * columns
            blocks.append(Block(index, slice(offset + first * columns, offset + last * columns),
                                slice(local, local + size), last - first, columns, len(shape) == 2))
            offset, local = offset + numel, local + size
        return blocks

    @property
    def total_size(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)

    @property
    def local_size(self) -> int:
        return sum(block.size for block in self.blocks)

    @property
    def largest_local_size(self) -> int:
        return max(sum(block.size for block in self.blocks_of(rank)) for rank in range(self.world_size))

    @property
    def dense_blocks(self) -> list[Block]:
        return [block for block in self.blocks if block.index not in self.row_sparse]

    @property
    def sparse_blocks(self) -> list[Block]:
        return [block for block in self.blocks if block.index in self.row_sparse]

    @property
    def dense_size(self) -> int:
        return sum(block.size for block in self.dense_blocks)

    def param_slices(self) -> Iterator[tuple[int, slice]]:
        """(parameter index, its range in the flat vector of all parameters)."""
        offset = 0
        for index, shape in enumerate(self.shapes):
            yield index, slice(offset, offset + math.prod(shape))
            offset += math.prod(shape)

    def with_row_sparse_where_it_pays(self, rows_used: Callable[[Block], int], element_size: int) -> Layout:
        """Row-sparse storage for each matrix block whose gradient uses few enough rows (`rows_used(block)`) for
        the row-sparse rule (word embeddings; not under weight decay)."""
        chosen = {block.index for block in self.blocks
                  if block.is_matrix and row_sparse_pays(rows_used(block), block.rows, block.columns, element_size)}
        return replace(self, row_sparse=frozenset(chosen))

    def without_row_sparse(self, index: int) -> Layout:
        return replace(self, row_sparse=self.row_sparse - {index})

    def dense_column(self, index: int) -> int:
        """Where parameter `index`'s block starts (or would start) among the dense window's columns."""
        return sum(block.size for block in self.dense_blocks if block.index < index)

    @staticmethod
    def matrix(grad: Tensor, block: Block) -> Tensor:
        """The block's rows of the flat gradient, as a rows × columns view."""
        return grad[block.flat].view(block.rows, block.columns)

    def dense_part(self, grad: Tensor) -> Tensor:
        """The dense blocks of the flat gradient, concatenated in block order (the dense window's columns)."""
        dense = self.dense_blocks
        if self.dense_size == grad.numel():
            return grad
        if not dense:  # every block row-sparse (an embedding alone)
            return grad.new_empty(0)
        return torch.cat([grad[block.flat] for block in dense])

    def assemble(self, dense_direction: Tensor, sparse_directions: dict[int, Tensor], out: Tensor) -> Tensor:
        """This process's blocks of the direction, in local order, from the dense part and the row-sparse parts: one
        concatenation of the row-sparse parts and the runs of dense blocks between them (a copy per block would be a
        kernel launch per parameter on a GPU), into `out` (local_size fp32)."""
        pieces, dense_offset, run = [], 0, 0
        for block in self.blocks:
            if block.index in sparse_directions:
                pieces.append(dense_direction[dense_offset:dense_offset + run])
                dense_offset, run = dense_offset + run, 0
                pieces.append(sparse_directions[block.index].reshape(-1))
            else:
                run += block.size
        pieces.append(dense_direction[dense_offset:dense_offset + run])
        return torch.cat(pieces, out=out)

    def to_flat(self, dense_rows: Tensor, sparse_rows: dict[int, Tensor]) -> Tensor:
        """Rows over this process's columns (the dense part's columns, and each row-sparse block made dense) as
        fp32 rows over all parameters in flat order; other processes' columns stay zero."""
        flat = torch.zeros(dense_rows.shape[0], self.total_size, device=dense_rows.device)
        dense_offset = 0
        for block in self.blocks:
            if block.index in sparse_rows:
                flat[:, block.flat] = sparse_rows[block.index].float()
            else:
                flat[:, block.flat] = dense_rows[:, dense_offset:dense_offset + block.size].float()
                dense_offset += block.size
        return flat

    def scatter_gathered(self, pieces: list[Tensor], direction: Tensor) -> Tensor:
        """Writes each rank's local vector (`pieces[rank]`, padded) into its places in the full flat `direction`."""
        for rank, piece in enumerate(pieces):
            for block in self.blocks_of(rank):
                direction[block.flat] = piece[block.local]
        return direction
