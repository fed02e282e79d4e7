"""`MFAC`, the torch.optim plumbing: param groups and their hyperparameters, the state (kept as tensors in
`self.state`, so state_dict() round-trips it), flattening the gradients, momentum and the parameter update. The
window's arithmetic is in window.py, storage.py and algebra.py; offsets are the layout's (layout.py); sharding
across processes is in distributed.py.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from .algebra import GramSystem, accumulate_dtype
from .distributed import DirectionGather, check_shard_position, shard_position, sum_over_processes
from .hyperparameters import (GRAD_DTYPES, check_group_hyperparameters, check_window_settings, check_window_unchanged,
                              resolve_grad_dtype)
from .layout import Layout, nonzero_rows, row_sparse_pays
from .memory import optimizer_state_bytes
from .compressed import CompressedRows
from .storage import DenseRows, RowSparseRows
from .window import GradientWindow

# State entries the host reads every step (counters, the shard position, the λ the factor was made for): kept on
# the CPU, as torch.optim keeps "step".
HOST_ENTRIES = ("step", "skipped_steps", "shard_rank", "shard_world_size", "factor_damp", "refactorizations")


class MFAC(Optimizer):
    """M-FAC with a window of the last `num_grads` gradients over all parameters of all groups.

    Args:
        params: tensors or param-group dicts. `lr`, `weight_decay` and `momentum` may differ per group;
            `num_grads`, `damp`, `grad_dtype`, `density` and `shard` describe the one shared window and must not.
        lr: learning rate, read from the group at every step (LR schedulers work).
        num_grads: m, the number of gradients in the window. Besides the window, m costs 16·m² bytes of float64
            state (the Gram matrix and its Cholesky factor) and O(m²) work per step (algebra.py).
        damp: λ in F = λI + (1/m) GᵀG.
        momentum: μ of the exponential average v ← μv + (1 − μ)u of the directions (0 disables it).
        weight_decay: coupled L2: g ← g + weight_decay · p before g enters the window.
        grad_dtype: storage dtype of the window ("float32", "bfloat16", "float16" or the torch dtype). With a
            low-precision window the rounded gradient is the one preconditioned, so window and direction agree.
        density: the fraction of each error-fed gradient's entries the window keeps (top-k in each block of 32,768
            coordinates, with error feedback; compressed.py). 1.0 keeps the whole gradient (dense and row-sparse
            storage, no error buffer).
        shard: with an initialised default process group (torchrun, accelerate), each rank keeps 1/world_size of
            every parameter's rows in its window; the dot products are all-reduced and the direction all-gathered,
            so every rank takes the same step as one unsharded optimizer. Ranks must see the same gradients (as
            under DDP). Without a process group this changes nothing. State dicts are per rank.
    """

    def __init__(self, params: Iterable, *, lr: float = 1e-4, num_grads: int = 1024, damp: float = 1e-6,
                 momentum: float = 0.0, weight_decay: float = 0.0,
                 grad_dtype: Union[str, torch.dtype] = torch.float32, shard: bool = False,
                 density: float = 1.0) -> None:
        defaults = dict(lr=lr, num_grads=num_grads, damp=damp, momentum=momentum, weight_decay=weight_decay,
                        grad_dtype=resolve_grad_dtype(grad_dtype), shard=shard, density=density)
        check_group_hyperparameters(defaults)
        self._warned_nonfinite = False
        # (its state tensor, the dense columns' storage): reused across steps for its buffers
        self._dense_storage: Optional[tuple[Tensor, Union[DenseRows, CompressedRows]]] = None
        # Vectors rewritten at every step (_reused_buffer): the flat gradient, the direction, each row-sparse part's
        # scratch (under ("rows of", parameter index)).
        self._buffers: dict[Union[str, tuple[str, int]], Tensor] = {}
        self._gather = DirectionGather()
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        if "grad_dtype" in param_group:
            param_group["grad_dtype"] = resolve_grad_dtype(param_group["grad_dtype"])
        super().add_param_group(param_group)
        check_group_hyperparameters(self.param_groups[-1])
        check_window_settings(self.param_groups)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if len(devices) > 1:
            raise ValueError(f"MFAC needs all parameters on one device, got {sorted(map(str, devices))}")

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch.optim, except that state tensors keep their dtypes: torch would cast the float64 Gram matrix,
        a bf16 window and the fp32 momentum to each parameter's dtype."""
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        for index, param in zip(saved_ids, self._params()):
            if index in state_dict["state"]:
                self.state[param] = {key: value.to(device=param.device, copy=True) if key not in HOST_ENTRIES else value.clone()
                                     for key, value in state_dict["state"][index].items()}
        self._dense_storage = None
        if self._params() and "gram" in self._shared_state():
            if "factor" not in self._shared_state():  # saved before the Cholesky factor was kept
                self._add_empty_factor(self._shared_state())
            check_shard_position(self._shared_state(), self._stored_layout())

    def __setstate__(self, state: dict) -> None:
        """Param groups saved before a setting existed get its default (torch.optim's place for upgrades)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("shard", False)
            group.setdefault("density", 1.0)

    @staticmethod
    def _add_empty_factor(state: dict) -> None:
        """A factor made for no damp (NaN): the next step makes it from the Gram matrix, as when damp changes."""
        state.update(factor=torch.zeros_like(state["gram"]), factor_damp=torch.tensor(float("nan"), dtype=torch.float64),
                     refactorizations=torch.tensor(0, dtype=torch.int64))

    def memory_bytes(self) -> int:
        """Bytes of state this optimizer holds in this process (its shard of the window, the Gram matrix, momentum,
        row-sparse parts)."""
        return optimizer_state_bytes(self)

    @torch.no_grad()
    def stored_gradients(self) -> Tensor:
        """The window as float32 rows over all parameters in flat order (the parameters of all groups, flattened and
        concatenated): row j is slot j, and the gradient stored by step t (1-based, skipped steps not counted) is in
        slot (t − 1) mod num_grads. A sharded process fills its own columns, the others stay zero."""
        layout, state = self._stored_layout(), self._shared_state()
        if "gram" not in state:
            return torch.zeros(self.param_groups[0]["num_grads"], layout.total_size, device=self._params()[0].device)
        window = self._gradient_window(layout)
        return layout.to_flat(window.dense.to_dense(), {index: part.to_dense() for index, part in window.sparse.items()})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Performs one M-FAC step; `closure` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad = self._flat_gradient()
        # A sum is finite whenever all terms are, unless it overflows: only then is the full check needed. On a GPU
        # this is a host synchronisation the step needs: skipping it or not is the host's decision.
        if not torch.isfinite(grad.sum()) and not torch.isfinite(grad).all():
            self._skip_nonfinite()
            return loss
        check_window_settings(self.param_groups)
        layout = self._stored_layout()
        state = self._shared_state()
        if "gram" not in state:
            layout = self._make_state(layout, grad)
        check_window_unchanged(state, self.param_groups[0], layout.dense_size)
        check_shard_position(state, layout)
        sparse_grads, layout = self._row_sparse_gradients(layout, grad)
        window = self._gradient_window(layout)
        slot = int(state["step"]) % window.num_grads
        dense_direction, sparse_directions = window.insert_and_precondition(layout.dense_part(grad), sparse_grads, slot)
        params = self._params()
        for index, part in window.sparse.items():  # a part may have grown its capacity
            self.state[params[index]].update(part.state())
        state["step"] += 1
        direction = dense_direction if not sparse_directions else layout.assemble(
            dense_direction, sparse_directions, self._reused_buffer("direction", layout.local_size, grad.device))
        update = self._with_momentum(layout, direction)
        if layout.world_size > 1:
            update = self._gather(layout, update)
        self._update_params(layout, update)
        return loss

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _shared_state(self) -> dict:
        """The state of the one window (kept under the first parameter, as torch.optim.LBFGS does)."""
        return self.state[self._params()[0]]

    def _flat_gradient(self) -> Tensor:
        """g over all groups in order: each parameter's gradient (zeros if None) plus its group's wd · p."""
        pieces = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("MFAC does not support sparse gradients; use dense embedding gradients")
                grad = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
                if group["weight_decay"] != 0:
                    grad = grad.add(p.float(), alpha=group["weight_decay"])
                pieces.append(grad.reshape(-1))
        return torch.cat(pieces, out=self._reused_buffer("gradient", sum(piece.numel() for piece in pieces),
                                                         pieces[0].device))

    def _reused_buffer(self, name: Union[str, tuple[str, int]], size: int, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> Tensor:
        """A vector of `size` kept from step to step. A fresh allocation of d floats costs page faults at every
        step on the CPU: at bert-mini's size, once a 6 GiB window is allocated, 60 ms for the direction."""
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() != size or buffer.device != device or buffer.dtype != dtype:
            buffer = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buffer

    def _stored_layout(self) -> Layout:
        """This process's layout as the state records it: row-sparse parameters hold row indices."""
        params = self._params()
        rank, world_size = shard_position(self.param_groups[0]["shard"])
        return Layout(tuple(p.shape for p in params), rank, world_size,
                      frozenset(index for index, p in enumerate(params) if "row_indices" in self.state[p]))

    def _make_state(self, layout: Layout, grad: Tensor) -> Layout:
        """The window's state, on the first stored gradient: the shared part, and the row-sparse parts of the
        matrices where those pay, each in its parameter's state. Returns the layout with those parts."""
        params, state = self._params(), self._shared_state()
        first = self.param_groups[0]
        m, dtype = first["num_grads"], GRAD_DTYPES[first["grad_dtype"]]
        if first["density"] < 1:  # the compressed window covers every local coordinate
            state.update(CompressedRows.allocate(m, layout.local_size, first["density"], dtype, grad.device))
        else:
            layout = layout.with_row_sparse_where_it_pays(grad, torch.tensor([], dtype=dtype).element_size())
            state["window"] = torch.zeros(m, layout.dense_size, dtype=dtype, device=grad.device)
        for block in layout.sparse_blocks:
            rows = len(nonzero_rows(layout.matrix(grad, block)))
            indices, values = RowSparseRows.allocate(m, max(rows, 1), block.columns, dtype, grad.device)
            self.state[params[block.index]].update(row_indices=indices, row_values=values)
        state.update(
            step=torch.tensor(0, dtype=torch.int64),
            skipped_steps=state.get("skipped_steps", torch.tensor(0, dtype=torch.int64)),  # skips before this
            shard_rank=torch.tensor(layout.rank, dtype=torch.int64),
            shard_world_size=torch.tensor(layout.world_size, dtype=torch.int64),
            gram=torch.zeros(m, m, dtype=torch.float64, device=grad.device),
        )
        self._add_empty_factor(state)
        return layout

    def _row_sparse_gradients(self, layout: Layout, grad: Tensor) -> tuple[dict[int, tuple[Tensor, Tensor]], Layout]:
        """Parameter index -> (gradient block, its non-zero rows) for the row-sparse blocks. One whose rows would
        now take more room than dense storage (e.g. weight decay was turned on) moves to the dense part."""
        sparse = {}
        for block in layout.sparse_blocks:
            matrix = layout.matrix(grad, block)
            rows = nonzero_rows(matrix)  # on a GPU, a host synchronisation: the row count sizes the storage
            if row_sparse_pays(len(rows), block.rows, block.columns, self._shared_state()["window"].element_size()):
                sparse[block.index] = (matrix, rows)
            else:
                layout = self._move_to_dense(layout, block.index)
        return sparse, layout

    def _move_to_dense(self, layout: Layout, index: int) -> Layout:
        """Inserts a row-sparse block's window, made dense, at its place among the dense columns."""
        state, param_state = self._shared_state(), self.state[self._params()[index]]
        block = layout.blocks[index]
        part = RowSparseRows(param_state.pop("row_indices"), param_state.pop("row_values"), block.rows, torch.float32)
        layout = layout.without_row_sparse(index)
        column = layout.dense_column(index)
        window = state["window"]
        state["window"] = torch.cat([window[:, :column], part.to_dense(), window[:, column:]], dim=1)
        self._buffers.pop(("rows of", index), None)  # its scratch
        return layout

    def _gradient_window(self, layout: Layout) -> GradientWindow:
        """A view of the state tensors as a GradientWindow."""
        params, state, first = self._params(), self._shared_state(), self.param_groups[0]
        accumulate = accumulate_dtype(first["num_grads"], layout.total_size)
        sparse = {block.index: RowSparseRows(
            self.state[params[block.index]]["row_indices"], self.state[params[block.index]]["row_values"], block.rows,
            accumulate, self._reused_buffer(("rows of", block.index), block.size, state["gram"].device,
                                            accumulate).view(block.rows, block.columns))
                  for block in layout.sparse_blocks}
        sum_shards = sum_over_processes if layout.world_size > 1 else None
        system = GramSystem(state["gram"], state["factor"], state["factor_damp"], state["refactorizations"],
                              first["damp"])
        return GradientWindow(self._dense_columns(layout, accumulate), sparse, system, sum_shards)

    def _dense_columns(self, layout: Layout, accumulate: torch.dtype) -> Union[DenseRows, CompressedRows]:
        """The storage of the window's dense columns: the dense rows, or the compressed window. Reused (with its
        buffers) while its state tensor stays the same."""
        state = self._shared_state()
        stored = state.get("window", state.get("compressed_values"))
        if self._dense_storage is None or self._dense_storage[0] is not stored:
            storage = DenseRows(stored, accumulate) if "window" in state else CompressedRows(
                stored, state["compressed_offsets"], state["error"], layout.dense_size, self.param_groups[0]["density"],
                accumulate)
            self._dense_storage = (stored, storage)
        return self._dense_storage[1]

    def _skip_nonfinite(self) -> None:
        # Counted under the first parameter, where the window state will be made: before the first stored gradient
        # this is the only entry there, and state_dict() carries it like any other.
        state = self._shared_state()
        state["skipped_steps"] = state.get("skipped_steps", torch.tensor(0, dtype=torch.int64)) + 1
        if not self._warned_nonfinite:
            warnings.warn("MFAC: gradient contains NaN or Inf; step skipped (window and parameters unchanged)")
            self._warned_nonfinite = True

    def _with_momentum(self, layout: Layout, direction: Tensor) -> Tensor:
        """This rank's update: per group with momentum μ > 0, v ← μv + (1 − μ)u (kept for this rank's blocks),
        written over u; u itself elsewhere."""
        momenta = [group["momentum"] for group in self.param_groups for _ in group["params"]]
        if not any(momenta):
            return direction
        buffer = self._shared_state().setdefault("momentum_buffer", torch.zeros_like(direction))
        for block in layout.blocks:
            momentum = momenta[block.index]
            if momentum > 0:
                velocity = buffer[block.local]
                velocity.mul_(momentum).add_(direction[block.local], alpha=1 - momentum)
                direction[block.local] = velocity
        return direction

    def _update_params(self, layout: Layout, update: Tensor) -> None:
        """p ← p − lr · update, with each group's lr: one multi-tensor add per group, as torch.optim's foreach
        implementations do, rather than a kernel launch per parameter."""
        pieces = [update[flat] for _, flat in layout.param_slices()]
        start = 0
        for group in self.param_groups:
            params = group["params"]
            steps = [piece.view_as(p).to(p.dtype) for piece, p in zip(pieces[start:start + len(params)], params)]
            torch._foreach_add_(params, steps, alpha=-group["lr"])
            start += len(params)
