"""MFAC with torch.distributed.checkpoint (DCP). `get_state_dict` and `dcp.save` take MFAC's state as they take any
optimizer's; under sharding each process's entries are named with its shard (MFAC.state_dict), so all are kept.
Loading needs one thing more: DCP fills a template in place, and a fresh optimizer's template (it has no window
until its first gradient) cannot know the saved window's entries and shapes, which the saving run's gradients
decided (which matrices are row-sparse, how far their capacity grew). `MFACLoadPlanner` takes them from the
checkpoint's metadata:

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optimizer_state}, checkpoint_id=path,
             planner=MFACLoadPlanner(optimizer))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)

Each process loads its own window shard; a checkpoint of another number of shards is refused before anything is
read.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, Optional

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from .distributed import OwnShard
from .optimizer import MFAC

Path = tuple[Any, ...]  # a place in a nested state dict: the keys from its root


class MFACLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the state of every MFAC optimizer in the template (a mapping with "state" and
    "param_groups" whose groups have MFAC's "num_grads") replaced by the checkpoint's entries of this process's
    window shard, allocated at their saved shapes and dtypes."""

    def __init__(self, optimizer: MFAC, **options: Any) -> None:
        super().__init__(**options)
        if not self.flatten_state_dict:
            raise ValueError("MFACLoadPlanner: flatten_state_dict=False is not supported (it reads the template's "
                             "nested paths)")
        self.shard = optimizer.window_shard()

    def set_up_planner(self, state_dict: dict, metadata: Optional[Metadata] = None,
                       is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        if metadata is None:
            return
        own = OwnShard(*self.shard)
        for place in mfac_optimizer_places(self.original_state_dict):
            self._drop_template_state(place)
            self._take_saved_state(place, metadata, own)
        own.check_found()

    def _drop_template_state(self, place: Path) -> None:
        state = (*place, "state")
        for key, path in list(self.mappings.items()):
            if path[:len(state)] == state:
                del self.state_dict[key], self.mappings[key]
        for entries in node_at(self.original_state_dict, place)["state"].values():
            entries.clear()  # each trained parameter keeps its (empty) entry, which set_state_dict asks for

    def _take_saved_state(self, place: Path, metadata: Metadata, own: OwnShard) -> None:
        """The saved entries of this process's shard, empty at their saved shapes, for DCP to fill."""
        head = ".".join(map(str, (*place, "state"))) + "."
        state = node_at(self.original_state_dict, place)["state"]
        for key, item in metadata.state_dict_metadata.items():
            if not key.startswith(head) or not isinstance(item, TensorStorageMetadata):
                continue
            parameter, name = key[len(head):].rsplit(".", 1)
            if not own.entries({name: None}):  # another process's shard
                continue
            tensor = torch.empty(item.size, dtype=item.properties.dtype)
            state.setdefault(parameter, {})[name] = tensor
            self.state_dict[key], self.mappings[key] = tensor, (*place, "state", parameter, name)


def mfac_optimizer_places(root: Mapping, place: Path = ()) -> Iterator[Path]:
    """Where MFAC optimizer state dicts lie in a nested state dict."""
    groups = root.get("param_groups")
    if "state" in root and isinstance(groups, list) and groups and all(
            isinstance(group, Mapping) and "num_grads" in group for group in groups):
        yield place
        return
    for key, value in root.items():
        if isinstance(value, Mapping):
            yield from mfac_optimizer_places(value, (*place, key))


def node_at(root: Mapping, place: Path) -> Any:
    for key in place:
        root = root[key]
    return root
