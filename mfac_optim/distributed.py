"""Sharding the window across processes (see docs/design.md). Two ways:

- `shard=True` over whole parameters (DDP): each process keeps its rows of every parameter (`Layout` says which),
  the dot products are summed over processes so that all solve the same m × m system, and the processes'
  directions are gathered into the full one;
- parameters that FSDP2 (`fully_shard`) made DTensors: each process keeps the window of its own shards, the dot
  products are summed over the processes that split the parameters, and each process updates its shards alone.

The math modules never call torch.distributed themselves.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .layout import Layout

try:  # torch.distributed.tensor is public from torch 2.4 on; builds without distributed support lack it
    from torch.distributed.tensor import DTensor
except ImportError:
    DTensor = ()  # isinstance(x, ()) is False: no tensor is a DTensor


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


def local_shard(tensor: Tensor) -> Tensor:
    """The part of a tensor this process holds: a DTensor's local shard (FSDP2), any other tensor itself. Updating
    the shard in place updates the parameter."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def fsdp_group(params: Sequence[Tensor]) -> Optional[dist.ProcessGroup]:
    """For parameters that FSDP2 made DTensors: the processes among which the parameters are split (under HSDP the
    replicas hold the same shards: the sharding mesh dimension's processes only). None for plain tensors."""
    dtensors = [p for p in params if isinstance(p, DTensor)]
    if not dtensors:
        return None
    if len(dtensors) != len(params):
        raise ValueError("MFAC: some parameters are DTensors (FSDP2) and some are not; shard the whole model with "
                         "fully_shard, so that every process keeps the window of its own shards")
    mesh, placements = dtensors[0].device_mesh, tuple(dtensors[0].placements)
    if any(p.device_mesh != mesh or tuple(p.placements) != placements for p in dtensors):
        raise ValueError("MFAC: the DTensor parameters lie on different meshes or placements; one window needs them "
                         "all sharded alike (fully_shard over one mesh)")
    sharded = [dim for dim, placement in enumerate(placements) if placement.is_shard()]
    if len(sharded) != 1 or not all(placement.is_replicate() for dim, placement in enumerate(placements)
                                    if dim not in sharded):
        raise ValueError(f"MFAC: DTensor parameters must be sharded along one mesh dimension and replicated along "
                         f"any other (fully_shard, or HSDP), got placements {placements}")
    return mesh.get_group(sharded[0])


def fsdp_sum(params: Sequence[Tensor]) -> Optional[Callable[[Tensor], Tensor]]:
    """For FSDP2 parameters: the sum of each process's partial dot products over the processes among which the
    parameters are split (one all-reduce of m numbers). None for plain tensors."""
    group = fsdp_group(params)
    if group is None:
        return None

    def sum_over_shards(dots: Tensor) -> Tensor:
        dist.all_reduce(dots, group=group)
        return dots

    return sum_over_shards


def window_shard(params: Sequence[Tensor], shard: bool) -> tuple[int, int]:
    """(rank, number) of the window shard this process keeps: its part of a `shard=True` window, or of the FSDP2
    shards; (0, 1) for a whole window."""
    group = fsdp_group(params)
    if group is not None:
        return dist.get_rank(group), dist.get_world_size(group)
    return shard_position(shard)


# A per-process state entry's name in a state dict: the entry's own name and the shard it holds, so that a
# checkpoint of every process's state (DCP's) keeps them apart.
SHARD_MARK = "@shard"


def shard_entry_name(key: str, rank: int, world_size: int) -> str:
    return f"{key}{SHARD_MARK}{rank}of{world_size}"


def parse_shard_entry_name(name: str) -> tuple[str, Optional[tuple[int, int]]]:
    """(the entry's own name, (rank, number) of its shard, or None for an entry of a whole window)."""
    key, mark, shard = name.partition(SHARD_MARK)
    if not mark:
        return name, None
    rank, _, world_size = shard.partition("of")
    return key, (int(rank), int(world_size))


class OwnShard:
    """Picks a loaded state's entries of this process's window shard (rank `rank` of `world_size`), under their own
    names: entries named for another rank are left out, and for another number of processes refused (a window
    shard holds its process's columns: they cannot be split again)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.saved_shards: set[tuple[int, int]] = set()

    def entries(self, saved: dict) -> dict:
        own = {}
        for name, value in saved.items():
            key, shard = parse_shard_entry_name(name)
            if shard is None or shard == (self.rank, self.world_size):
                own[key] = value
            if shard is not None:
                self.saved_shards.add(shard)
                if shard[1] != self.world_size:
                    raise ValueError(f"MFAC: the optimizer state holds window shards of {shard[1]} processes, and "
                                     f"this process keeps shard {self.rank} of {self.world_size}: resume on "
                                     f"{shard[1]} processes, each loading its own shard")
        return own

    def check_found(self) -> None:
        if self.saved_shards and (self.rank, self.world_size) not in self.saved_shards:
            held = ", ".join(str(rank) for rank, _ in sorted(self.saved_shards))
            raise ValueError(f"MFAC: the optimizer state holds the window shards of rank(s) {held}, not this "
                             f"process's (rank {self.rank} of {self.world_size}): each process loads the state it "
                             "saved")


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
