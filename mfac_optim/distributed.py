"""Sharding the window across processes (see docs/design.md): each process keeps its rows of every parameter
(`Layout` says which), the dot products are summed over processes so that all solve the same m × m system, and the
processes' directions are gathered into the full one. The math modules never call torch.distributed themselves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Layout


def shard_position(shard: bool) -> tuple[int, int]:
    """(rank, world size) of this process's shard of the window: the default process group's with shard=True."""
    if shard and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_shard_position(state: dict, layout: Layout) -> None:
    """A window shard belongs to one rank of one world size: resuming it elsewhere would mix other columns in."""
    saved = int(state["shard_rank"]), int(state["shard_world_size"])
    rank, world_size = layout.rank, layout.world_size
    if saved != (rank, world_size):
        raise ValueError(
            f"MFAC state holds the window shard of rank {saved[0]} of {saved[1]}, but this process is rank {rank} "
            f"of {world_size}: resume a sharded run with the same number of processes, each loading its own state")


def sum_over_processes(dots: Tensor) -> Tensor:
    dist.all_reduce(dots)
    return dots


class DirectionGather:
    """All-gathers every process's local direction into the full flat one, in buffers reused across steps (fresh
    allocations of d floats cost page faults every step)."""

    def __init__(self) -> None:
        self._buffers: Optional[tuple[Tensor, Tensor]] = None  # (own + gathered pieces, full direction)

    def __call__(self, layout: Layout, local: Tensor) -> Tensor:
        rows = (layout.world_size + 1, layout.largest_local_size)
        if self._buffers is None or self._buffers[0].shape != rows:
            self._buffers = (torch.zeros(rows, device=local.device),
                             torch.empty(layout.total_size, device=local.device))
        pieces, direction = self._buffers
        padded, gathered = pieces[0], list(pieces[1:])
        padded[:local.numel()] = local
        dist.all_gather(gathered, padded)
        return layout.scatter_gathered(gathered, direction)
